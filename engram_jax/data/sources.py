"""Document sources: source specs, per-format readers, and the split/capped `Corpus`.

A source spec is a string:
  "stdlib"                      the interpreter's standard library (`corpus.stdlib_files`)
  "text:GLOB"                   one document per plain-text file
  "jsonl:GLOB[:FIELD]"          one document per JSON line, its FIELD (default "text")
  "arrayrecord:GLOB[:FIELD]"    one document per record: UTF-8 text, or with FIELD a JSON
                                object whose FIELD is the text

Every document has a stable key (a path relative to the glob's fixed prefix, plus a line
or record number) that decides its split. A `Corpus` is a grain random-access data source
of document strings; it holds paths and offsets only and reopens files lazily, so it
pickles cheaply into grain worker processes.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engram_jax.data import corpus as corpus_lib

KINDS = ("stdlib", "text", "jsonl", "arrayrecord")
_GLOB_CHARS = "*?["
_INDEX_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  kind: str
  pattern: str | None = None
  field: str | None = None

  def __str__(self) -> str:
    parts = [self.kind] + [p for p in (self.pattern, self.field) if p is not None]
    return ":".join(parts)


def parse_source(spec: str) -> SourceSpec:
  """Parses a source spec string (see the module docstring); ValueError if malformed."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"source spec must be a non-empty string, got {spec!r}")
  kind, _, rest = spec.partition(":")
  if kind not in KINDS:
    raise ValueError(f"unknown source scheme {kind!r} in {spec!r}; known schemes: {KINDS}")
  if kind == "stdlib":
    if rest:
      raise ValueError(f"the stdlib source takes no arguments, got {spec!r}")
    return SourceSpec("stdlib")
  if not rest:
    raise ValueError(f"source {spec!r} needs a file glob: '{kind}:/path/to/files*'")
  if kind == "text":
    return SourceSpec("text", rest)
  pattern, field = rest, None
  head, sep, tail = rest.rpartition(":")
  # The last ':'-part is a field name unless it looks like part of a path.
  if sep and head and tail and "/" not in tail and not any(c in tail for c in _GLOB_CHARS) \
      and "." not in tail:
    pattern, field = head, tail
  if kind == "jsonl" and field is None:
    field = "text"
  return SourceSpec(kind, pattern, field)


def _glob_base(pattern: str) -> str:
  """The directory prefix of a glob before its first wildcard (keys are relative to it)."""
  parts = Path(pattern).parts
  fixed = []
  for p in parts[:-1]:
    if any(c in p for c in _GLOB_CHARS):
      break
    fixed.append(p)
  return str(Path(*fixed)) if fixed else "."


def expand_glob(spec: SourceSpec) -> list[tuple[str, str]]:
  """Sorted [(key, path)] of the files a spec names; ValueError if there are none."""
  pattern = os.path.expanduser(spec.pattern)
  paths = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ValueError(f"source {str(spec)!r}: no files match {pattern!r}")
  base = _glob_base(pattern)
  return [(os.path.relpath(p, base).replace(os.sep, "/"), p) for p in paths]


class DocumentSet:
  """Documents of one source. Subclasses set `keys` (list[str]) and implement `read`."""

  keys: list[str]

  def read(self, index: int) -> str:
    raise NotImplementedError

  def nbytes(self, index: int) -> int:
    """Size of a document in bytes (before decoding), for byte caps."""
    return len(self.read(index).encode("utf-8"))

  def __len__(self) -> int:
    return len(self.keys)


class FileDocuments(DocumentSet):
  """One document per file (stdlib, text). Undecodable bytes become U+FFFD."""

  def __init__(self, entries: Sequence[tuple[str, str | os.PathLike]]):
    self.keys = [k for k, _ in entries]
    self.paths = [str(p) for _, p in entries]

  def read(self, index: int) -> str:
    with open(self.paths[index], "rb") as f:
      return f.read().decode("utf-8", errors="replace")

  def nbytes(self, index: int) -> int:
    return os.path.getsize(self.paths[index])


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(start, length) in bytes of every non-blank line of a file, int64."""
  starts, lengths = [], []
  pos = 0
  carry = b""
  with open(path, "rb") as f:
    while True:
      chunk = f.read(_INDEX_CHUNK)
      if not chunk:
        break
      buf = carry + chunk
      base = pos - len(carry)
      ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == ord("\n"))
      line_starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
      starts.append(line_starts + base)
      lengths.append(ends - line_starts)
      last = int(ends[-1]) + 1 if len(ends) else 0
      carry = buf[last:]
      pos += len(chunk)
  if carry:
    starts.append(np.asarray([pos - len(carry)]))
    lengths.append(np.asarray([len(carry)]))
  if not starts:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  start, length = np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64)
  keep = length > 1  # drop empty lines ("" or "\r")
  return start[keep], length[keep]


class JsonlDocuments(DocumentSet):
  """One document per JSON line: the line's `field`, which must be a string."""

  def __init__(self, entries: Sequence[tuple[str, str]], field: str):
    self.field = field
    self.paths = [p for _, p in entries]
    files, starts, lengths, keys = [], [], [], []
    for file_index, (key, path) in enumerate(entries):
      start, length = _line_spans(path)
      files.append(np.full(len(start), file_index, np.int32))
      starts.append(start)
      lengths.append(length)
      keys.extend(f"{key}:{i}" for i in range(len(start)))
    self.keys = keys
    self.file_index = np.concatenate(files) if files else np.zeros(0, np.int32)
    self.start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self.length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)

  def read(self, index: int) -> str:
    path = self.paths[self.file_index[index]]
    with open(path, "rb") as f:
      f.seek(int(self.start[index]))
      line = f.read(int(self.length[index]))
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line at byte {self.start[index]} is not valid JSON: {e}") from e
    return _field_text(record, self.field, f"{path} (line at byte {self.start[index]})")

  def nbytes(self, index: int) -> int:
    return int(self.length[index])


def _field_text(record: object, field: str, where: str) -> str:
  if not isinstance(record, dict) or field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: record has no field {field!r} (has {keys})")
  text = record[field]
  if not isinstance(text, str):
    # Bad data, not a bad argument: ValueError like every other malformed record.
    raise ValueError(f"{where}: field {field!r} is {type(text).__name__}, not a string")  # noqa: TRY004
  return text


class ArrayRecordDocuments(DocumentSet):
  """One document per ArrayRecord record: UTF-8 text, or a JSON object's `field`."""

  def __init__(self, entries: Sequence[tuple[str, str]], field: str | None):
    self.field = field
    self.paths = [p for _, p in entries]
    counts = []
    for path in self.paths:
      reader = _open_array_record(path)
      counts.append(reader.num_records())
      reader.close()
    self.file_index = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    self.record_index = np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) \
        if counts else np.zeros(0, np.int64)
    self.keys = [f"{k}:{i}" for (k, _), c in zip(entries, counts) for i in range(c)]
    self._readers: dict[int, object] = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = {}  # open readers do not pickle; each process reopens its own
    return state

  def read(self, index: int) -> str:
    f = int(self.file_index[index])
    if f not in self._readers:
      self._readers[f] = _open_array_record(self.paths[f])
    raw = self._readers[f].read([int(self.record_index[index])])[0]
    text = raw.decode("utf-8", errors="replace")
    if self.field is None:
      return text
    where = f"{self.paths[f]} record {self.record_index[index]}"
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where} is not valid JSON (field {self.field!r} requested): {e}") from e
    return _field_text(record, self.field, where)


def _open_array_record(path: str):
  from array_record.python import array_record_module  # optional dependency, only here

  return array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")


def open_source(spec: SourceSpec | str, *, stdlib_include_tests: bool = True) -> DocumentSet:
  """Lists the documents of one source (reads file indexes, not the documents)."""
  spec = parse_source(spec) if isinstance(spec, str) else spec
  if spec.kind == "stdlib":
    return FileDocuments(corpus_lib.stdlib_files(include_tests=stdlib_include_tests))
  entries = expand_glob(spec)
  if spec.kind == "text":
    return FileDocuments([(k, p) for k, p in entries if os.path.getsize(p) > 0])
  if spec.kind == "jsonl":
    return JsonlDocuments(entries, spec.field)
  return ArrayRecordDocuments(entries, spec.field)


class Corpus:
  """Grain random-access source of the selected documents (str) of several sources.

  Attributes:
    sets: the DocumentSets.
    set_index / doc_index: int arrays [num_docs], the documents in their fixed order.
  """

  def __init__(self, sets: Sequence[DocumentSet], set_index: np.ndarray, doc_index: np.ndarray,
               name: str = "corpus"):
    self.sets = list(sets)
    self.set_index = np.asarray(set_index, np.int32)
    self.doc_index = np.asarray(doc_index, np.int64)
    self.name = name

  def __len__(self) -> int:
    return len(self.doc_index)

  def __getitem__(self, index: int) -> str:
    return self.sets[self.set_index[index]].read(int(self.doc_index[index]))

  def key(self, index: int) -> str:
    return self.sets[self.set_index[index]].keys[int(self.doc_index[index])]

  def keys(self) -> list[str]:
    return [self.key(i) for i in range(len(self))]

  def __repr__(self) -> str:
    return f"Corpus({self.name}, {len(self)} documents from {len(self.sets)} sources)"


def build_corpus(specs: Sequence[str], split: str | None, *, validation_fraction: float = 0.0,
                 max_documents: int | None = None, max_bytes: int | None = None,
                 stdlib_include_tests: bool = True) -> Corpus:
  """The documents of `split` ("train", "validation", or None for all) of some sources.

  Documents are ordered by the stable hash of their key (a fixed pseudo-random order).
  Caps keep the longest prefix of that order with at most `max_documents` documents and
  `max_bytes` bytes (at least one document).
  """
  if split is not None and split not in corpus_lib.SPLITS:
    raise ValueError(f"split must be one of {corpus_lib.SPLITS} or None, got {split!r}")
  sets = [open_source(s, stdlib_include_tests=stdlib_include_tests) for s in specs]
  scored = sorted((corpus_lib.stable_hash(k), si, di)
                  for si, ds in enumerate(sets) for di, k in enumerate(ds.keys))
  threshold = validation_fraction * 2.0**64
  chosen: list[tuple[int, int]] = []
  total = 0
  for h, si, di in scored:
    if split is not None and (corpus_lib.VALIDATION if h < threshold else corpus_lib.TRAIN) != split:
      continue
    if max_documents is not None and len(chosen) >= max_documents:
      break
    if max_bytes is not None:
      size = sets[si].nbytes(di)
      if chosen and total + size > max_bytes:
        break
      total += size
    chosen.append((si, di))
  if not chosen:
    raise ValueError(
        f"no {split or ''} documents in sources {list(specs)} "
        f"(validation_fraction={validation_fraction})")
  arr = np.asarray(chosen, np.int64).reshape(-1, 2)
  return Corpus(sets, arr[:, 0], arr[:, 1], name=f"{'+'.join(specs)}/{split or 'all'}")
