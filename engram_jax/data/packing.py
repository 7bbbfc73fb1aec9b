"""Tokenize documents and pack them into fixed-length batches of rows.

Documents (each ending in <eos>) are concatenated and cut into rows of T + 1 tokens,
B rows at a time. This is grain's `ConcatThenSplitIterDataset` followed by `batch`, row for
row (the tests check it), but vectorized per batch: grain packs one row at a time in
Python, which at T = 128 costs more than tokenizing and hashing together. A document cut
by a row end continues in the next row as a new segment whose positions restart at 0.
Rows are full except at the end of a finite stream, where the last batch is completed
with padding (segment 0). Row r gives inputs r[:-1] and targets r[1:].

`BatchToExample` turns packed rows into (T = seq_len, leading dims [B] or none):
  tokens       int32 [T]   input ids (pad id where segment_ids == 0)
  targets      int32 [T]   next ids
  loss_mask    float32 [T] 1 where the target is the next token of the same segment
  segment_ids  int32 [T]   1..k per document segment of the row, 0 = padding
  positions    int32 [T]   0-based position within the segment
  target_bytes int32 [T]   UTF-8 bytes of the target token where loss_mask == 1, else 0
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

#: The keys of every example (and batch) the pipeline yields; shapes in the module docstring.
EXAMPLE_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "target_bytes")


def has_text(text: str) -> bool:
  """Keeps documents with at least one non-whitespace character."""
  return bool(text.strip())


class TokenizeDocument(grain.transforms.Map):
  """str -> int32 [L + 1]: the document's ids followed by <eos>."""

  def __init__(self, tokenizer, eos_id: int):
    self.tokenizer = tokenizer
    self.eos_id = int(eos_id)

  def map(self, text: str) -> np.ndarray:
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    out = np.empty(len(ids) + 1, np.int32)
    out[:-1] = ids
    out[-1] = self.eos_id
    return out


def segments_and_positions(doc_of_token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids and positions of packed rows from each token's document index.

  Args:
    doc_of_token: int [B, W], a running document index per token, -1 for padding.
  Returns:
    (segment_ids, positions), int32 [B, W]: segments count 1.. from each row's start and
    restart at every document change; padding has segment 0 and position 0.
  """
  valid = doc_of_token >= 0
  change = np.ones_like(valid)
  change[:, 1:] = doc_of_token[:, 1:] != doc_of_token[:, :-1]
  starts = change & valid
  segment_ids = np.cumsum(starts, axis=1, dtype=np.int32) * valid
  col = np.arange(doc_of_token.shape[1], dtype=np.int32)
  last_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
  positions = (col - last_start) * valid
  return segment_ids.astype(np.int32), positions.astype(np.int32)


class PackedBatchIterDataset(grain.IterDataset):
  """Documents (int32 ids [L]) -> {"ids", "segment_ids", "positions"}: int32 [B, T + 1].

  The state is (the parent's state before the partly used document, tokens of it already
  used), so restoring re-reads at most one document.
  """

  def __init__(self, parent: grain.IterDataset, *, batch_size: int, seq_len: int, pad_id: int):
    super().__init__(parent)
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.pad_id = int(pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedBatchIterator(self._parent.__iter__(), self.batch_size, self.seq_len + 1, self.pad_id)

  def __str__(self) -> str:
    return f"PackedBatchIterDataset(batch_size={self.batch_size}, seq_len={self.seq_len})"


class _PackedBatchIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, rows: int, width: int, pad_id: int):
    super().__init__(parent)
    self._rows, self._width, self._pad_id = rows, width, pad_id
    self._reset()

  def _reset(self) -> None:
    self._pending: list[tuple[Any, np.ndarray]] = []  # (parent state before it, ids)
    self._offset = 0  # tokens of _pending[0] already emitted
    self._available = 0
    self._exhausted = False

  def _pull(self) -> bool:
    state = self._parent.get_state()
    try:
      doc = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return False
    doc = np.asarray(doc, np.int32).reshape(-1)
    if doc.size:
      self._pending.append((state, doc))
      self._available += doc.size
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    need = self._rows * self._width
    while self._available < need and not self._exhausted:
      self._pull()
    if self._available == 0:
      raise StopIteration
    take = min(need, self._available)
    pieces, left, used_docs, offset = [], take, 0, self._offset
    for _, doc in self._pending:
      n = min(doc.size - offset, left)
      pieces.append(doc[offset : offset + n])
      left -= n
      if offset + n == doc.size:
        used_docs, offset = used_docs + 1, 0
      else:
        offset += n
      if left == 0:
        break
    del self._pending[:used_docs]
    self._offset = offset if self._pending else 0
    self._available -= take

    ids = np.full(need, self._pad_id, np.int32)
    ids[:take] = np.concatenate(pieces)
    doc_of_token = np.full(need, -1, np.int32)
    doc_of_token[:take] = np.repeat(np.arange(len(pieces), dtype=np.int32), [p.size for p in pieces])
    shape = (self._rows, self._width)
    segment_ids, positions = segments_and_positions(doc_of_token.reshape(shape))
    return {"ids": ids.reshape(shape), "segment_ids": segment_ids, "positions": positions}

  def get_state(self) -> dict[str, Any]:
    if self._pending:
      return {"parent": self._pending[0][0], "offset": self._offset}
    return {"parent": self._parent.get_state(), "offset": 0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._reset()
    if state["offset"]:
      if not self._pull() or not self._pending:
        raise ValueError(f"cannot restore packing state {state}: its document is gone")
      self._offset = int(state["offset"])
      self._available -= self._offset


class BatchToExample(grain.transforms.Map):
  """Packed rows (ids, segment_ids, positions: [..., T + 1]) -> the example dict of the
  module docstring ([..., T])."""

  def __init__(self, pad_id: int, byte_lengths: np.ndarray):
    self.pad_id = int(pad_id)
    self.byte_lengths = np.asarray(byte_lengths, np.int32)

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return row_to_example(packed["ids"], packed["segment_ids"], packed["positions"], self.pad_id, self.byte_lengths)


def row_to_example(
  ids: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, pad_id: int, byte_lengths: np.ndarray
) -> dict[str, np.ndarray]:
  """See `BatchToExample`. ids, segment_ids, positions: int [..., T + 1]."""
  ids = np.where(segment_ids == 0, pad_id, ids).astype(np.int32)
  seg = segment_ids.astype(np.int32)
  tokens, targets = ids[..., :-1], ids[..., 1:]
  same_doc = (seg[..., 1:] == seg[..., :-1]) & (seg[..., :-1] != 0)
  return {
    "tokens": tokens,
    "targets": targets,
    "loss_mask": same_doc.astype(np.float32),
    "segment_ids": seg[..., :-1],
    "positions": positions[..., :-1].astype(np.int32),
    "target_bytes": np.where(same_doc, byte_lengths[targets], 0).astype(np.int32),
  }


class InterleaveRowsIterDataset(grain.IterDataset):
  """Several batch streams -> one batch: the rows of each parent's next batch, in order.

  Each parent is an independent document stream packed into its own rows (see
  `make_train_dataset`), so a batch of S streams draws its rows from at least S
  documents. Every parent yields dicts of arrays with the same keys and row count [R, ...];
  the result has S * R rows. The state is the list of the parents' states.
  """

  def __init__(self, parents: list[grain.IterDataset]):
    if not parents:
      raise ValueError("InterleaveRowsIterDataset needs at least one stream")
    super().__init__(list(parents))

  def __iter__(self) -> grain.DatasetIterator:
    return _InterleaveRowsIterator([p.__iter__() for p in self.parents])

  def __str__(self) -> str:
    return f"InterleaveRowsIterDataset(streams={len(self.parents)})"


class _InterleaveRowsIterator(grain.DatasetIterator):
  def __init__(self, parents: list[grain.DatasetIterator]):
    super().__init__(parents)
    self._streams = list(parents)

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._streams]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"streams": [it.get_state() for it in self._streams]}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state["streams"]
    if len(saved) != len(self._streams):
      raise ValueError(
        f"data iterator state holds {len(saved)} document streams, this pipeline "
        f"has {len(self._streams)} (DataConfig.batch_size / rows_per_stream changed?)"
      )
    for it, s in zip(self._streams, saved):
      it.set_state(s)


def documents_in_batch(batch: dict[str, np.ndarray], rows_per_stream: int, eos_id: int) -> int:
  """Distinct documents a training batch draws from (rows of one stream are consecutive:
  a document running past the end of row r of a stream continues at the start of row
  r + 1 and is counted once). batch: tokens / targets / segment_ids / loss_mask [B, T]."""
  seg = np.asarray(batch["segment_ids"])
  segments = int(np.sum(seg.max(axis=1)))
  mask, targets = np.asarray(batch["loss_mask"]), np.asarray(batch["targets"])
  b = seg.shape[0]
  continued = 0
  for r in range(b - 1):
    if (r + 1) % rows_per_stream and mask[r, -1] > 0 and targets[r, -1] != eos_id:
      continued += 1
  return segments - continued
