"""Packing invariants: rows, segment ids, positions, targets, loss mask, target bytes, state."""

import grain
import numpy as np
import pytest
from grain.experimental import ConcatThenSplitIterDataset

from engram_jax.data.packing import BatchToExample, PackedBatchIterDataset

SEQ_LEN = 8
ROWS = 2
PAD = 0
LENGTHS = [3, 10, 1, 7, 25, 4, 9, 30]  # 89 tokens: 9 full rows of 9 and a last row of 8
BYTES = (np.arange(1000) % 5 + 1).astype(np.int32)


def doc_of(token):
  return token // 100  # doc d holds ids d*100 + i: every token names its document


def documents():
  docs = [np.arange(n, dtype=np.int32) + 100 * d for d, n in enumerate(LENGTHS, 1)]
  return grain.MapDataset.source(docs).to_iter_dataset()


def packed(rows=ROWS):
  return PackedBatchIterDataset(documents(), batch_size=rows, seq_len=SEQ_LEN, pad_id=PAD)


def examples():
  """All rows of all batches, as a list of per-row example dicts."""
  out = []
  for batch in packed().map(BatchToExample(PAD, BYTES)):
    out.extend({k: v[r] for k, v in batch.items()} for r in range(ROWS))
  return out


def test_batches_equal_grain_concat_then_split_then_batch():
  # The vectorized packer is grain's ConcatThenSplit (+ batch), row for row.
  ref = ConcatThenSplitIterDataset(documents().map(lambda ids: {"ids": ids}), length_struct={"ids": SEQ_LEN + 1})
  ref_rows = list(ref)
  ours = list(packed())
  assert len(ours) == 5 and len(ref_rows) == 10
  for b, batch in enumerate(ours):
    for key in ("ids", "segment_ids", "positions"):
      assert batch[key].shape == (ROWS, SEQ_LEN + 1) and batch[key].dtype == np.int32
    for r in range(ROWS):
      want = ref_rows[ROWS * b + r]
      np.testing.assert_array_equal(batch["ids"][r], want["ids"])
      np.testing.assert_array_equal(batch["segment_ids"][r], want["ids_segment_ids"])
      np.testing.assert_array_equal(batch["positions"][r], want["ids_positions"])


def test_rows_concatenate_the_documents():
  rows = examples()
  stream = np.concatenate([np.arange(n) + 100 * d for d, n in enumerate(LENGTHS, 1)])
  # Row r covers stream[9r : 9r + 9]: tokens are its first 8 ids, targets its last 8.
  for r, ex in enumerate(rows):
    chunk = stream[9 * r : 9 * r + 9]
    n = len(chunk)
    assert np.array_equal(ex["tokens"][:n], chunk[:SEQ_LEN][:n])
    assert np.array_equal(ex["targets"][: n - 1], chunk[1:])
    for key, dtype in [
      ("tokens", np.int32),
      ("targets", np.int32),
      ("loss_mask", np.float32),
      ("segment_ids", np.int32),
      ("positions", np.int32),
      ("target_bytes", np.int32),
    ]:
      assert ex[key].shape == (SEQ_LEN,) and ex[key].dtype == dtype, key


def test_segment_ids_and_positions():
  for ex in examples():
    seg, pos, tok = ex["segment_ids"], ex["positions"], ex["tokens"]
    real = seg > 0
    assert real[0] and np.all(np.diff(real.astype(int)) <= 0)  # padding only at the end
    assert np.all(np.diff(seg[real]) >= 0) and np.all(np.diff(seg[real]) <= 1)
    assert np.array_equal(np.unique(seg[real]), np.arange(1, seg.max() + 1))
    starts = np.r_[True, seg[1:] != seg[:-1]]
    assert np.all(pos[real & starts] == 0)  # positions restart at each document
    inner = real[1:] & ~starts[1:]
    assert np.all(pos[1:][inner] == pos[:-1][inner] + 1)
    # A segment is one document; a new segment is a new (or a continued, cut) document.
    docs = doc_of(tok)
    assert np.all(docs[1:][inner] == docs[:-1][inner])
    assert np.all(tok[~real] == PAD)


def test_targets_never_cross_documents_and_mask_is_exact():
  rows = examples()
  for ex in rows:
    seg, tok, tgt, mask = ex["segment_ids"], ex["tokens"], ex["targets"], ex["loss_mask"]
    assert np.all(doc_of(tgt[mask == 1]) == doc_of(tok[mask == 1]))
    assert np.all(tgt[mask == 1] == tok[mask == 1] + 1)  # the next id of the same document
    # Documents start at 1 and padding is id 0, so this covers every position.
    assert np.array_equal(mask, ((doc_of(tgt) == doc_of(tok)) & (seg > 0)).astype(np.float32))
    assert np.array_equal(ex["target_bytes"], np.where(mask == 1, BYTES[tgt], 0))
  boundaries = sum(
    int(((ex["segment_ids"][1:] != ex["segment_ids"][:-1]) & (ex["segment_ids"][1:] > 0)).sum()) for ex in rows
  )
  masked = sum(int(((ex["loss_mask"][:-1] == 0) & (ex["segment_ids"][1:] > 0)).sum()) for ex in rows)
  assert boundaries == masked > 0


def test_last_partial_row_is_padded_and_masked():
  last = examples()[-1]
  assert list(last["segment_ids"]) == [1] * 8
  assert list(last["loss_mask"]) == [1] * 7 + [0]  # 8 tokens give 7 targets
  assert last["targets"][-1] == PAD
  batch_size = 4  # 10 rows -> the third batch has 2 rows of data and 2 empty rows
  final = list(packed(rows=batch_size).map(BatchToExample(PAD, BYTES)))[-1]
  assert final["tokens"].shape == (batch_size, SEQ_LEN)
  assert final["segment_ids"][2:].sum() == 0 and final["loss_mask"][2:].sum() == 0
  assert np.all(final["tokens"][2:] == PAD)


@pytest.mark.parametrize("skip", [0, 1, 2, 3])
def test_state_restores_mid_document(skip):
  it = iter(packed())
  for _ in range(skip):
    next(it)
  state = it.get_state()
  rest = list(it)
  again = iter(packed())
  again.set_state(state)
  restored = list(again)
  assert len(restored) == len(rest) == 5 - skip
  for a, b in zip(rest, restored):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
