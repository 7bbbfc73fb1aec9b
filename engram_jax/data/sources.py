"""Document sources: source specs, per-format readers, and the split/capped `Corpus`.

A source spec is a string:
  "stdlib"                      the interpreter's standard library (`corpus.stdlib_files`)
  "text:GLOB"                   one document per plain-text file
  "jsonl:GLOB[:FIELD]"          one document per JSON line, its FIELD (default "text")
  "arrayrecord:GLOB[:FIELD]"    one document per record: UTF-8 text, or with FIELD a JSON
                                object whose FIELD is the text

Text is decoded as strict UTF-8 (stdlib: each file's PEP 263 source encoding). `decode_errors`
(`DataConfig.decode_errors`) says what an undecodable file (or record) does:
  "error"    (default) ValueError naming the file, the byte offset and the fix
  "skip"     the file is left out (a warning with the count and the first such file)
  "replace"  undecodable bytes become U+FFFD (the old behaviour, on request only)
Binary files (a NUL byte in the first 8 KiB) are always left out, counted in the log. The
"stdlib" source always skips its undecodable files: the standard library ships one on
purpose (test/badsyntax_pep3120.py, a fixture for the tokenizer's error path).
Files are checked when a source is opened (text and jsonl files are read once for that).

Every document has a stable key (a path relative to the glob's fixed prefix, plus a line
or record number) that decides its split. A `Corpus` is a grain random-access data source
of document strings; it holds paths and offsets only and reopens files lazily, so it
pickles cheaply into grain worker processes.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob as globlib
import json
import logging
import os
import tokenize
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engram_jax.data import corpus as corpus_lib

KINDS = ("stdlib", "text", "jsonl", "arrayrecord")
DECODE_ERRORS = ("error", "skip", "replace")
_GLOB_CHARS = "*?["
_INDEX_CHUNK = 1 << 24
_BINARY_PROBE = 8192  # bytes looked at for a NUL (git's heuristic for binary files)

log = logging.getLogger(__name__)


def check_decode_errors(decode_errors: str) -> str:
  if decode_errors not in DECODE_ERRORS:
    raise ValueError(f"DataConfig.decode_errors must be one of {DECODE_ERRORS}, got {decode_errors!r}")
  return decode_errors


def undecodable_message(where: str, offset: int, encoding: str = "utf-8", reason: str = "") -> str:
  why = f" ({reason})" if reason else ""
  return (
    f"{where}: not valid {encoding} at byte offset {offset}{why}; fix or remove the file, or set "
    "DataConfig.decode_errors='skip' to leave such files out or 'replace' to train on U+FFFD "
    "replacement characters"
  )


def is_binary(head: bytes) -> bool:
  """A NUL byte in the first bytes of a file: binary (text in UTF-8 never holds one)."""
  return b"\x00" in head[:_BINARY_PROBE]


def _decode_offset(data: bytes, encoding: str) -> tuple[int, str] | None:
  """(byte offset, reason) of the first undecodable byte of `data`, or None."""
  try:
    data.decode(encoding)
  except UnicodeDecodeError as e:
    return e.start, e.reason
  return None


def _source_encoding(path: str) -> str:
  """A Python file's declared source encoding (PEP 263; UTF-8 without a declaration)."""
  with open(path, "rb") as f:
    try:
      return tokenize.detect_encoding(f.readline)[0]
    except SyntaxError:  # an unknown or contradictory declaration: read as UTF-8
      return "utf-8"


class _Skipped:
  """Counts the files a source leaves out, and logs them once per source."""

  def __init__(self, source: str, level: int = logging.WARNING):
    self.source, self.level, self.binary, self.undecodable = source, level, [], []

  def report(self) -> None:
    if self.binary:
      log.log(
        self.level,
        "source %s: skipped %d binary file(s) (a NUL byte in the first %d bytes), e.g. %s",
        self.source,
        len(self.binary),
        _BINARY_PROBE,
        self.binary[0],
      )
    if self.undecodable:
      log.log(
        self.level,
        "source %s: skipped %d undecodable file(s), e.g. %s",
        self.source,
        len(self.undecodable),
        self.undecodable[0],
      )


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
  if sep and head and tail and "/" not in tail and not any(c in tail for c in _GLOB_CHARS) and "." not in tail:
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
  """One document per file (stdlib, text).

  Args:
    entries: [(key, path)].
    encodings: per file, the encoding to decode it with (default UTF-8).
    errors: "strict", or "replace" (`decode_errors="replace"`) for files known to hold
      undecodable bytes.
  Use `checked` to build one that leaves out binary and (by policy) undecodable files.
  """

  def __init__(
    self,
    entries: Sequence[tuple[str, str | os.PathLike]],
    encodings: Sequence[str] | None = None,
    errors: str = "strict",
  ):
    self.keys = [k for k, _ in entries]
    self.paths = [str(p) for _, p in entries]
    self.encodings = list(encodings) if encodings is not None else ["utf-8"] * len(self.paths)
    self.errors = errors

  @classmethod
  def checked(
    cls,
    entries: Sequence[tuple[str, str | os.PathLike]],
    source: str,
    decode_errors: str = "error",
    *,
    python_sources: bool = False,
    log_level: int = logging.WARNING,
  ) -> "FileDocuments":
    """Reads every file once: binary files are left out (counted in the log), undecodable
    ones raise / are left out / are kept with replacement characters (`decode_errors`).
    python_sources: decode with each file's PEP 263 declaration (the stdlib source)."""
    check_decode_errors(decode_errors)
    skipped = _Skipped(source, log_level)
    kept, encodings = [], []
    for key, path in entries:
      with open(path, "rb") as f:
        data = f.read()
      if is_binary(data):
        skipped.binary.append(str(path))
        continue
      encoding = _source_encoding(str(path)) if python_sources else "utf-8"
      bad = _decode_offset(data, encoding)
      if bad is not None and decode_errors != "replace":
        if decode_errors == "skip":
          skipped.undecodable.append(f"{path} (byte {bad[0]})")
          continue
        raise ValueError(undecodable_message(f"source {source!r}: {path}", bad[0], encoding, bad[1]))
      kept.append((key, path))
      encodings.append(encoding)
    skipped.report()
    return cls(kept, encodings, "replace" if decode_errors == "replace" else "strict")

  def read(self, index: int) -> str:
    path = self.paths[index]
    with open(path, "rb") as f:
      data = f.read()
    try:
      return data.decode(self.encodings[index], errors=self.errors)
    except UnicodeDecodeError as e:  # the file changed after it was checked
      raise ValueError(undecodable_message(path, e.start, self.encodings[index], e.reason)) from None

  def nbytes(self, index: int) -> int:
    return os.path.getsize(self.paths[index])


def _line_spans(path: str, check: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, str] | None]:
  """(start, length) in bytes of every non-blank line of a file, int64, and (with check) the
  (byte offset, reason) of the file's first undecodable UTF-8 byte, or None."""
  starts, lengths = [], []
  pos = 0
  carry = b""
  bad = None
  decoder = codecs.getincrementaldecoder("utf-8")()
  with open(path, "rb") as f:
    while True:
      chunk = f.read(_INDEX_CHUNK)
      if not chunk:
        if check and bad is None:
          try:
            decoder.decode(b"", final=True)
          except UnicodeDecodeError as e:
            bad = (pos - len(e.object) + e.start, e.reason)
        break
      if check and bad is None:
        try:
          decoder.decode(chunk)
        except UnicodeDecodeError as e:  # e.object: the decoder's pending bytes + chunk
          bad = (pos + len(chunk) - len(e.object) + e.start, e.reason)
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
    return np.zeros(0, np.int64), np.zeros(0, np.int64), bad
  start, length = np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64)
  keep = length > 1  # drop empty lines ("" or "\r")
  return start[keep], length[keep], bad


class JsonlDocuments(DocumentSet):
  """One document per JSON line: the line's `field`, which must be a string."""

  def __init__(
    self, entries: Sequence[tuple[str, str]], field: str, decode_errors: str = "error", source: str = "jsonl"
  ):
    check_decode_errors(decode_errors)
    self.field = field
    self.errors = "replace" if decode_errors == "replace" else "strict"
    skipped = _Skipped(source)
    kept = []
    for key, path in entries:
      with open(path, "rb") as f:
        if is_binary(f.read(_BINARY_PROBE)):
          skipped.binary.append(path)
          continue
      kept.append((key, path))
    self.paths = []
    files, starts, lengths, keys = [], [], [], []
    for key, path in kept:
      start, length, bad = _line_spans(path, check=decode_errors != "replace")
      if bad is not None:
        if decode_errors == "skip":
          skipped.undecodable.append(f"{path} (byte {bad[0]})")
          continue
        raise ValueError(undecodable_message(f"source {source!r}: {path}", bad[0], reason=bad[1]))
      file_index = len(self.paths)
      self.paths.append(path)
      files.append(np.full(len(start), file_index, np.int32))
      starts.append(start)
      lengths.append(length)
      keys.extend(f"{key}:{i}" for i in range(len(start)))
    skipped.report()
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
      record = json.loads(line.decode("utf-8", errors=self.errors))
    except UnicodeDecodeError as e:  # the file changed after it was checked
      raise ValueError(undecodable_message(path, int(self.start[index]) + e.start, reason=e.reason)) from None
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

  def __init__(
    self,
    entries: Sequence[tuple[str, str]],
    field: str | None,
    decode_errors: str = "error",
    source: str = "arrayrecord",
  ):
    check_decode_errors(decode_errors)
    self.field = field
    self.errors = "replace" if decode_errors == "replace" else "strict"
    skipped = _Skipped(source)
    kept, counts = [], []
    for key, path in entries:
      reader = _open_array_record(path)
      n = reader.num_records()
      bad = None
      if decode_errors == "skip":  # only then are all records read up front
        for i in range(n):
          hit = _decode_offset(reader.read([i])[0], "utf-8")
          if hit is not None:
            bad = f"{path} (record {i}, byte {hit[0]})"
            break
      reader.close()
      if bad is not None:
        skipped.undecodable.append(bad)
        continue
      kept.append((key, path))
      counts.append(n)
    skipped.report()
    entries = kept
    self.paths = [p for _, p in entries]
    self.file_index = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    self.record_index = (
      np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if counts else np.zeros(0, np.int64)
    )
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
    where = f"{self.paths[f]} record {self.record_index[index]}"
    try:
      text = raw.decode("utf-8", errors=self.errors)
    except UnicodeDecodeError as e:
      raise ValueError(undecodable_message(where, e.start, reason=e.reason)) from None
    if self.field is None:
      return text
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where} is not valid JSON (field {self.field!r} requested): {e}") from e
    return _field_text(record, self.field, where)


def _open_array_record(path: str):
  from array_record.python import array_record_module  # optional dependency, only here

  return array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")


def open_source(
  spec: SourceSpec | str, *, stdlib_include_tests: bool = True, decode_errors: str = "error"
) -> DocumentSet:
  """Lists the documents of one source and checks its files (module docstring: binary
  files are left out, undecodable ones handled by `decode_errors`)."""
  spec = parse_source(spec) if isinstance(spec, str) else spec
  check_decode_errors(decode_errors)
  if spec.kind == "stdlib":
    return FileDocuments.checked(
      corpus_lib.stdlib_files(include_tests=stdlib_include_tests),
      "stdlib",
      "skip",
      python_sources=True,
      log_level=logging.INFO,
    )  # a known fixture
  entries = expand_glob(spec)
  if spec.kind == "text":
    return FileDocuments.checked([(k, p) for k, p in entries if os.path.getsize(p) > 0], str(spec), decode_errors)
  if spec.kind == "jsonl":
    return JsonlDocuments(entries, spec.field, decode_errors, str(spec))
  return ArrayRecordDocuments(entries, spec.field, decode_errors, str(spec))


class Corpus:
  """Grain random-access source of the selected documents (str) of several sources.

  Attributes:
    sets: the DocumentSets.
    set_index / doc_index: int arrays [num_docs], the documents in their fixed order.
  """

  def __init__(self, sets: Sequence[DocumentSet], set_index: np.ndarray, doc_index: np.ndarray, name: str = "corpus"):
    self.sets = list(sets)
    self.set_index = np.asarray(set_index, np.int32)
    self.doc_index = np.asarray(doc_index, np.int64)
    self.name = name

  def __len__(self) -> int:
    return len(self.doc_index)

  def __getitem__(self, index: int) -> str:
    return self.sets[self.set_index[index]].read(int(self.doc_index[index]))

  def key(self, index: int) -> str:
    """The stable key (source path or record id) of document `index`: what splits and seeds hash."""
    return self.sets[self.set_index[index]].keys[int(self.doc_index[index])]

  def keys(self) -> list[str]:
    """The keys of all documents, in index order."""
    return [self.key(i) for i in range(len(self))]

  def __repr__(self) -> str:
    return f"Corpus({self.name}, {len(self)} documents from {len(self.sets)} sources)"


def build_corpus(
  specs: Sequence[str],
  split: str | None,
  *,
  validation_fraction: float = 0.0,
  max_documents: int | None = None,
  max_bytes: int | None = None,
  stdlib_include_tests: bool = True,
  decode_errors: str = "error",
) -> Corpus:
  """The documents of `split` ("train", "validation", or None for all) of some sources.

  Documents are ordered by the stable hash of their key (a fixed pseudo-random order).
  Caps keep the longest prefix of that order with at most `max_documents` documents and
  `max_bytes` bytes (at least one document). `decode_errors`: see the module docstring.
  """
  if split is not None and split not in corpus_lib.SPLITS:
    raise ValueError(f"split must be one of {corpus_lib.SPLITS} or None, got {split!r}")
  sets = [open_source(s, stdlib_include_tests=stdlib_include_tests, decode_errors=decode_errors) for s in specs]
  scored = sorted((corpus_lib.stable_hash(k), si, di) for si, ds in enumerate(sets) for di, k in enumerate(ds.keys))
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
    raise ValueError(f"no {split or ''} documents in sources {list(specs)} (validation_fraction={validation_fraction})")
  arr = np.asarray(chosen, np.int64).reshape(-1, 2)
  return Corpus(sets, arr[:, 0], arr[:, 1], name=f"{'+'.join(specs)}/{split or 'all'}")
