"""Tokenizer compression (ENGRAM_SPEC.md §2): a surjection raw id -> canonical id.

Ids whose decoded text normalizes to the same key (NFKC, NFD, strip accents, lowercase,
collapse whitespace, strip) share one compressed id, so 'Apple', ' apple' and 'APPLE'
hash to the same n-gram rows. Built once per tokenizer; NumPy only at use time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

_SENTINEL = "\ue000"  # private-use char: protects a lone space from Strip()


def _reference_normalizer():
  from tokenizers import Regex, normalizers  # local import: only needed to build the table

  return normalizers.Sequence(
    [
      normalizers.NFKC(),
      normalizers.NFD(),
      normalizers.StripAccents(),
      normalizers.Lowercase(),
      normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
      normalizers.Replace(Regex(r"^ $"), _SENTINEL),
      normalizers.Strip(),
      normalizers.Replace(_SENTINEL, " "),
    ]
  )


def load_tokenizer_file(path: str | os.PathLike, what: str = "tokenizer file") -> Any:
  """A `tokenizers.Tokenizer` from a `tokenizer.json`, with errors naming the file and the problem.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is empty, not UTF-8, not JSON (e.g. truncated: the message gives
      the line, column and file size), JSON that is not a tokenizer (no "model"), or a
      tokenizer the `tokenizers` library rejects (its reason appended).
  """
  from tokenizers import Tokenizer  # local import: only needed to build the table

  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"{what} {path} does not exist")
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{what} {path} is not a tokenizer.json: not UTF-8 text (byte offset {e.start})") from None
  if not text.strip():
    raise ValueError(f"{what} {path} is empty; expected a tokenizers tokenizer.json")
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; the file has "
      f"{len(raw)} bytes: truncated or corrupt?)"
    ) from None
  if not isinstance(data, dict) or "model" not in data:
    found = sorted(data)[:8] if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    raise ValueError(f"{what} {path} is JSON but not a tokenizers tokenizer.json: no 'model' entry (found {found})")
  try:
    return Tokenizer.from_str(text)
  except Exception as e:  # the tokenizers library raises a bare Exception
    raise ValueError(f"{what} {path} is not a valid tokenizer.json: {e}") from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """sha256 of the tokenizer's canonical JSON: identifies the vocabulary a table came from."""
  text = tokenizer.to_str()
  canonical = json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def build_lookup_table(tokenizer: Any) -> tuple[np.ndarray, int]:
  """The reference algorithm: returns (lookup_table int64 [V], num_compressed)."""
  normalizer = _reference_normalizer()
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  key_to_new: dict[str, int] = {}
  lookup = np.empty(vocab_size, dtype=np.int64)
  for tid in range(vocab_size):
    text = tokenizer.decode([tid], skip_special_tokens=False)
    if "\ufffd" in text:  # partial UTF-8: the raw token string is the only faithful key
      key = tokenizer.id_to_token(tid)
    else:
      norm = normalizer.normalize_str(text)
      key = norm if norm else text
    lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
  return lookup, len(key_to_new)


class TokenizerCompressor:
  """Maps raw token ids to compressed ids.

  Attributes:
    lookup_table: np.int64 [V], raw id -> compressed id.
    num_compressed: V', the number of distinct compressed ids.
    fingerprint: sha256 of the tokenizer the table was built from (or None if unknown).
  """

  def __init__(self, lookup_table: np.ndarray, num_compressed: int | None = None, fingerprint: str | None = None):
    table = np.asarray(lookup_table)
    if table.ndim != 1 or table.size == 0:
      raise ValueError(f"lookup_table must be a non-empty 1-D array, got shape {table.shape}")
    if not np.issubdtype(table.dtype, np.integer):
      raise ValueError(f"lookup_table must hold integers, got dtype {table.dtype}")
    table = table.astype(np.int64)
    derived = int(table.max()) + 1
    if num_compressed is None:
      num_compressed = derived
    if table.min() < 0 or derived != num_compressed:
      raise ValueError(
        f"lookup_table values must lie in [0, num_compressed={num_compressed}) and use the "
        f"largest id; got range [{table.min()}, {table.max()}]"
      )
    self.lookup_table = table
    self.num_compressed = int(num_compressed)
    self.fingerprint = fingerprint

  # -- construction -------------------------------------------------------------------
  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> "TokenizerCompressor":
    """From a `tokenizers.Tokenizer` (HF fast tokenizers also expose `.backend_tokenizer`)."""
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
    table, num = build_lookup_table(tokenizer)
    return cls(table, num, tokenizer_fingerprint(tokenizer))

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "TokenizerCompressor":
    """From a `tokenizer.json` file (errors name the file and the problem: `load_tokenizer_file`)."""
    return cls.from_tokenizer(load_tokenizer_file(path))

  @classmethod
  def identity(cls, vocab_size: int) -> "TokenizerCompressor":
    """No compression (the ablation, and the reference test data)."""
    return cls(np.arange(vocab_size, dtype=np.int64), vocab_size, fingerprint=None)

  # -- use --------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    """V, the raw tokenizer vocabulary size: ids in [0, V) can be compressed."""
    return int(self.lookup_table.shape[0])

  @property
  def reduction(self) -> float:
    """Fraction of ids removed by compression."""
    return 1.0 - self.num_compressed / self.vocab_size

  def __len__(self) -> int:
    return self.num_compressed

  def __call__(self, ids: Any, *, pad_negative: bool = False) -> np.ndarray:
    """Compresses raw ids (any shape) to int64 compressed ids.

    Args:
      ids: integer array-like of raw token ids.
      pad_negative: treat negative ids as padding and pass them through unchanged (the
        reference's behaviour). By default a negative id is an error.
    Raises:
      ValueError naming the first offending id and its position.
    """
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    too_big = arr >= self.vocab_size
    negative = arr < 0
    bad = too_big | (negative if not pad_negative else np.zeros_like(negative))
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      val = int(arr[pos])
      hint = " (pass pad_negative=True to keep negative padding ids)" if val < 0 else ""
      raise ValueError(
        f"token id {val} at position {pos} is outside the tokenizer vocabulary [0, {self.vocab_size}){hint}"
      )
    if pad_negative and negative.any():
      out = arr.copy()
      keep = ~negative
      out[keep] = self.lookup_table[arr[keep]]
      return out
    return self.lookup_table[arr]

  # -- persistence ---------------------------------------------------------------------------
  def save(self, path: str | os.PathLike) -> None:
    """Writes the table as .npz (or .json when the suffix is .json)."""
    path = Path(path)
    if path.suffix == ".json":
      path.write_text(
        json.dumps(
          {
            "lookup_table": self.lookup_table.tolist(),
            "num_compressed": self.num_compressed,
            "fingerprint": self.fingerprint,
          }
        )
      )
    else:
      with open(path, "wb") as f:
        np.savez(
          f,
          lookup_table=self.lookup_table,
          num_compressed=self.num_compressed,
          fingerprint=np.array(self.fingerprint or ""),
        )

  @classmethod
  def load(cls, path: str | os.PathLike, *, expected_fingerprint: str | None = None) -> "TokenizerCompressor":
    """Reads a table written by `save`; checks the tokenizer fingerprint when given."""
    path = Path(path)
    if path.suffix == ".json":
      d = json.loads(path.read_text())
      table, num, fp = np.asarray(d["lookup_table"], np.int64), d["num_compressed"], d["fingerprint"]
    else:
      with np.load(path) as d:
        table, num, fp = d["lookup_table"], int(d["num_compressed"]), str(d["fingerprint"]) or None
    if expected_fingerprint is not None and fp != expected_fingerprint:
      raise ValueError(
        f"compression table {path} was built from tokenizer {fp!r}, not the expected {expected_fingerprint!r}"
      )
    return cls(table, num, fp)
