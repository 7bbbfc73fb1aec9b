"""The grain pipeline: batch contents, host Engram hashing, determinism, checkpointable state."""

import numpy as np
import pytest

from engram_jax.config import EngramConfig
from engram_jax.data import (
  DataConfig,
  EngramRowHasher,
  batch_spec,
  checkpoint_args,
  load_or_train_tokenizer,
  make_eval_batches,
  make_train_iterator,
)
from engram_jax.data.packing import row_to_example
from engram_jax.hashing import NgramHasher, TokenizerCompressor

CFG = DataConfig(
  seq_len=32,
  batch_size=4,
  max_bytes=300_000,
  bpe_vocab_size=512,
  tokenizer_train_bytes=300_000,
  num_eval_batches=3,
  validation_fraction=0.05,
  stdlib_include_tests=False,
)
ENGRAM = EngramConfig(
  vocab_sizes=(1009, 997), max_ngram_size=3, n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=(1, 3), pad_id=0
)


@pytest.fixture(scope="module")
def tok():
  return load_or_train_tokenizer(CFG)


@pytest.fixture(scope="module")
def compressor(tok):
  return TokenizerCompressor.from_tokenizer(tok)


def take(config, tok, n, engram=ENGRAM, state=None):
  it = make_train_iterator(config, tok, engram)
  try:
    if state is not None:
      it.set_state(state)
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      if key == "engram_ids":
        assert x[key].keys() == y[key].keys()
        for layer in x[key]:
          np.testing.assert_array_equal(x[key][layer], y[key][layer])
      else:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_matches_the_spec(tok):
  batch = take(CFG, tok, 1)[0]
  spec = batch_spec(CFG, ENGRAM)
  assert set(batch) == set(spec)
  for key, (shape, dtype) in spec.items():
    if key != "engram_ids":
      assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert set(batch["engram_ids"]) == {1, 3}
  for layer, (shape, dtype) in spec["engram_ids"].items():
    assert batch["engram_ids"][layer].shape == shape == (4, 32, 4)
    assert batch["engram_ids"][layer].dtype == dtype
  # Training rows are always full: the stream never ends.
  assert (batch["segment_ids"] > 0).all()
  assert batch["loss_mask"].mean() > 0.9
  assert np.array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])


def test_without_engram_config_rows_are_empty(tok):
  batch = take(CFG, tok, 1, engram=None)[0]
  assert batch["engram_ids"] == {}
  assert batch_spec(CFG)["engram_ids"] == {}


def test_engram_rows_equal_the_hasher_on_compressed_tokens(tok, compressor):
  hasher = NgramHasher.from_compressor(ENGRAM, compressor)
  for batch in take(CFG, tok, 2):
    expected = hasher.hash(compressor(batch["tokens"]), batch["segment_ids"])
    assert set(expected) == set(batch["engram_ids"])
    for layer, rows in expected.items():
      np.testing.assert_array_equal(batch["engram_ids"][layer], rows.astype(np.int32))
      assert (rows < hasher.table_sizes[layer]).all()


def test_no_ngram_crosses_a_document_boundary(tok, compressor):
  # Two documents packed in one row: the second one's rows must equal those of the second
  # document hashed alone, whatever precedes it; unsegmented hashing would differ.
  doc_a = tok.encode("import os\nprint(os.getcwd())\n").ids + [2]
  doc_b = tok.encode("x = [i * i for i in range(10)]\n").ids + [2]
  ids = np.asarray(doc_a + doc_b + [0], np.int32)
  seg = np.asarray([1] * len(doc_a) + [2] * len(doc_b) + [0], np.int32)
  pos = np.concatenate([np.arange(len(doc_a)), np.arange(len(doc_b)), [0]]).astype(np.int32)
  ex = row_to_example(ids, seg, pos, 0, np.ones(512, np.int32))
  batch = {k: v[None] for k, v in ex.items()}
  hashed = EngramRowHasher.build(ENGRAM, tok, 0, compressor)(batch)["engram_ids"]
  hasher = NgramHasher.from_compressor(ENGRAM, compressor)
  alone_b = hasher.hash(compressor(np.asarray([doc_b])))
  after_other_doc = hasher.hash(compressor(ids[None, :-1]))  # no segment ids
  start = len(doc_a)
  for layer in ENGRAM.layer_ids:
    np.testing.assert_array_equal(hashed[layer][0, start : start + len(doc_b)], alone_b[layer][0])
    # Sanity of the construction: without segments the first positions of doc_b differ.
    assert not np.array_equal(after_other_doc[layer][0, start], alone_b[layer][0, 0])
    # The first token of a document sees only pads before it: equal to a lone token.
    lone = hasher.hash(compressor(np.asarray([[doc_b[0]]])))[layer][0, 0]
    np.testing.assert_array_equal(hashed[layer][0, start], lone)


def test_engram_pad_must_be_the_tokenizer_pad(tok):
  with pytest.raises(ValueError, match="pad_id=2 is not the tokenizer's pad token id 0"):
    make_train_iterator(CFG, tok, ENGRAM.replace(pad_id=2))


def test_order_is_deterministic_for_a_seed(tok):
  first = take(CFG, tok, 3)
  assert_batches_equal(first, take(CFG, tok, 3))
  other = take(CFG.replace(seed=1), tok, 3)
  assert not np.array_equal(first[0]["tokens"], other[0]["tokens"])


def test_state_restores_exactly(tok):
  it = make_train_iterator(CFG, tok, ENGRAM)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  it.close()
  assert_batches_equal(take(CFG, tok, 4, state=state), expected)


def test_state_round_trips_through_an_orbax_checkpoint(tok, tmp_path):
  import orbax.checkpoint as ocp

  it = make_train_iterator(CFG, tok, ENGRAM)
  for _ in range(2):
    next(it)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(2, args=ocp.args.Composite(data=checkpoint_args(it)))
    manager.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  it.close()
  fresh = make_train_iterator(CFG, tok, ENGRAM)
  with ocp.CheckpointManager(tmp_path) as manager:
    restored = manager.restore(2, args=ocp.args.Composite(data=checkpoint_args(fresh, restore=True))).data
  assert restored is fresh
  assert_batches_equal([next(fresh) for _ in range(2)], expected)
  fresh.close()


def test_multiprocess_workers_are_deterministic_and_restorable(tok):
  # Worker processes are slow to start: one run, then a second one restored mid-way.
  cfg = CFG.replace(num_workers=2)
  it = make_train_iterator(cfg, tok, ENGRAM)
  try:
    head = [next(it) for _ in range(2)]
    state = it.get_state()
    tail = [next(it) for _ in range(2)]
  finally:
    it.close()
  assert not np.array_equal(head[0]["tokens"], head[1]["tokens"])
  hasher = NgramHasher.from_compressor(ENGRAM, TokenizerCompressor.from_tokenizer(tok))
  rows = hasher.hash(hasher_ids(tok, tail[0]["tokens"]), tail[0]["segment_ids"])
  np.testing.assert_array_equal(tail[0]["engram_ids"][3], rows[3])
  assert_batches_equal(take(cfg, tok, 2, state=state), tail)


def test_eval_batches_are_fixed(tok):
  first = make_eval_batches(CFG, tok, ENGRAM)
  assert len(first) == 3
  assert_batches_equal(first, make_eval_batches(CFG, tok, ENGRAM))
  for batch in first:
    assert batch["tokens"].shape == (4, 32)
    assert set(batch["engram_ids"]) == {1, 3}
  every = make_eval_batches(CFG.replace(num_eval_batches=None, eval_batch_size=64, eval_set="packed"), tok)
  assert every[-1]["tokens"].shape == (64, 32)
  assert every[-1]["loss_mask"][-1].sum() == 0  # padded to shape, padding masked
  with pytest.raises(ValueError, match="no validation data"):
    make_eval_batches(CFG.replace(validation_fraction=0.0), tok)


def hasher_ids(tok, tokens):
  return TokenizerCompressor.from_tokenizer(tok)(tokens)


def test_eval_sources_replace_the_split(tok, tmp_path):
  (tmp_path / "held_out.txt").write_text("def held_out():\n    return 42\n" * 40)
  cfg = CFG.replace(eval_sources=(f"text:{tmp_path}/*.txt",), num_eval_batches=None)
  file_text = (tmp_path / "held_out.txt").read_text()
  for batch in make_eval_batches(cfg, tok):  # the default "chunks" set: pieces of that file
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
      if seg.any():
        assert tok.decode([int(i) for i in tokens[seg > 0]]) in file_text
  batches = make_eval_batches(cfg.replace(eval_set="packed"), tok)  # the whole file, in order
  ids = []
  for batch in batches:
    for tokens, targets, seg in zip(batch["tokens"], batch["targets"], batch["segment_ids"]):
      ids.extend(tokens[seg > 0])
      if seg[-1] > 0 and targets[-1] != 0:  # a full row's last id is only a target
        ids.append(targets[-1])
  text = tok.decode([int(i) for i in ids])
  assert text.startswith("def held_out():")
  assert text.count("return 42") == 40


def complete_documents(batches):
  """Token tuples of documents that lie wholly inside one row (start after col 0, end with eos)."""
  docs = set()
  for batch in batches:
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
      for s in np.unique(seg[seg > 0]):
        cols = np.flatnonzero(seg == s)
        if cols[0] > 0 and tokens[cols[-1]] == 2 and cols[-1] < len(tokens) - 1:
          docs.add(tuple(tokens[cols]))
  return docs


def test_hosts_read_disjoint_shards(tok, tmp_path):
  for i in range(24):
    (tmp_path / f"d{i}.txt").write_text(f"value_{i} = {i * 7}\n")
  from engram_jax.data import build_corpus

  corpus = build_corpus([f"text:{tmp_path}/*.txt"], None)
  cfg = CFG.replace(prefetch_buffer_size=0)
  seen = []
  for index in range(2):
    it = make_train_iterator(cfg, tok, None, corpus=corpus, shard=(index, 2))
    seen.append(complete_documents([next(it) for _ in range(3)]))
    it.close()
  # ~4 epochs of a 12-document shard: (nearly) all of them appear whole, none of the other.
  assert 9 <= len(seen[0]) <= 12 and 9 <= len(seen[1]) <= 12
  assert not seen[0] & seen[1]
  with pytest.raises(ValueError, match="0 <= index < count"):
    make_train_iterator(cfg, tok, None, corpus=corpus, shard=(2, 2))
