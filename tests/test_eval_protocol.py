"""The measurement protocol: mixed batches, the validation set, standard errors, planted facts."""

import math

import numpy as np
import pytest

from engram_jax.config import EngramConfig
from engram_jax.data import (
  DataConfig,
  build_corpus,
  eval_corpus,
  load_or_train_tokenizer,
  make_train_iterator,
  special_ids,
  train_corpus,
)
from engram_jax.data.eval_set import select_eval_rows
from engram_jax.data.facts import FactMixedCorpus, facts_for, make_facts
from engram_jax.data.packing import documents_in_batch
from engram_jax.data.pipeline import make_eval_batches
from engram_jax.hashing import TokenizerCompressor
from engram_jax.train import evaluation, stats

CFG = DataConfig(
  seq_len=32,
  batch_size=8,
  max_bytes=300_000,
  bpe_vocab_size=512,
  tokenizer_train_bytes=300_000,
  validation_fraction=0.05,
  stdlib_include_tests=False,
  eval_tokens=4096,
  prefetch_buffer_size=0,
)
ENGRAM = EngramConfig(
  vocab_sizes=(1009, 997), max_ngram_size=3, n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=(1,), pad_id=0
)


@pytest.fixture(scope="module")
def tok():
  return load_or_train_tokenizer(CFG)


# ---------------------------------------------------------------------------- statistics
def test_clustered_se_equals_a_direct_computation():
  rng = np.random.default_rng(0)
  counts = rng.integers(1, 60, 200).astype(float)
  sums = counts * rng.normal(4.0, 0.7, 200) + rng.normal(0, 3, 200)
  mean, se = stats.clustered_mean_se(sums, counts)
  assert mean == pytest.approx(sums.sum() / counts.sum())
  # the linearised (ratio-estimator) variance, written out term by term
  c, total = len(counts), counts.sum()
  var = sum((s - mean * n) ** 2 for s, n in zip(sums, counts)) * c / (c - 1) / total**2
  assert se == pytest.approx(math.sqrt(var))
  # equal cluster sizes: the plain standard error of the per-cluster means
  eq = np.full(50, 10.0)
  per = rng.normal(5.0, 1.0, 50)
  m2, se2 = stats.clustered_mean_se(per * eq, eq)
  assert m2 == pytest.approx(per.mean())
  assert se2 == pytest.approx(per.std(ddof=1) / math.sqrt(50))
  # empty clusters are not units
  m3, se3 = stats.clustered_mean_se(np.append(per * eq, 0.0), np.append(eq, 0.0))
  assert (m3, se3) == pytest.approx((m2, se2))


def test_clustered_se_is_calibrated():
  # Over many simulated validation sets the SE matches the spread of the mean.
  rng = np.random.default_rng(1)
  means, ses = [], []
  for _ in range(400):
    counts = rng.integers(5, 40, 100).astype(float)
    difficulty = rng.normal(0, 0.5, 100)  # shared by a cluster's tokens
    sums = np.array([rng.normal(4 + d, 1.0, int(n)).sum() for d, n in zip(difficulty, counts)])
    m, s = stats.clustered_mean_se(sums, counts)
    means.append(m)
    ses.append(s)
  assert np.mean(ses) == pytest.approx(np.std(means), rel=0.15)


def test_paired_difference_cancels_shared_difficulty():
  rng = np.random.default_rng(2)
  counts = np.full(300, 20.0)
  difficulty = rng.normal(0, 1.0, 300) * counts
  a = difficulty + rng.normal(0, 0.5, 300) + 0.02 * counts
  b = difficulty + rng.normal(0, 0.5, 300)
  d, se = stats.paired_difference(a, b, counts)
  direct = (a - b) / counts
  assert d == pytest.approx(direct.mean())
  assert se == pytest.approx(direct.std(ddof=1) / math.sqrt(300))
  _, se_a = stats.clustered_mean_se(a, counts)
  assert se < se_a / 5
  with pytest.raises(ValueError, match="different sets"):
    stats.paired_difference(a, b[:-1], counts)


def test_replicate_rules():
  m, se = stats.mean_se([0.03, 0.05, 0.04])
  assert m == pytest.approx(0.04) and se == pytest.approx(0.01 / math.sqrt(3))
  assert stats.clears(m, se) and not stats.clears(0.01, 0.01)
  assert not stats.clears(0.5, float("nan"))
  assert stats.minimum_detectable_effect(0.01) == pytest.approx(0.0284)
  assert stats.fit_slope([1, 2, 3], [3, 5, 7]) == pytest.approx(2.0)


def test_paired_rows_refuse_different_tokens():
  rows = {"loss_sum": np.ones(3), "tokens": np.full(3, 2.0), "correct": np.zeros(3), "bytes": np.ones(3)}
  with pytest.raises(ValueError, match="different tokens"):
    evaluation.paired(rows, {"fingerprint": "a"}, rows, {"fingerprint": "b"})
  assert evaluation.paired(rows, {"fingerprint": "a"}, rows, {"fingerprint": "a"})[0] == 0.0


# ---------------------------------------------------------------------------- mixing
def test_batches_mix_documents(tok):
  eos = special_ids(tok).eos

  def mean_docs(cfg):
    it = make_train_iterator(cfg, tok, None)
    try:
      return np.mean([documents_in_batch(next(it), cfg.rows_per_stream, eos) for _ in range(20)])
    finally:
      it.close()

  mixed = mean_docs(CFG)
  single = mean_docs(CFG.replace(rows_per_stream=CFG.batch_size))
  assert mixed >= CFG.batch_size  # every row its own document stream
  assert single < 3  # one stream: consecutive rows of ~1 file
  assert mean_docs(CFG.replace(rows_per_stream=2)) >= CFG.batch_size // 2
  with pytest.raises(ValueError, match="not a multiple of rows_per_stream"):
    CFG.replace(rows_per_stream=3)


def test_documents_in_batch_counts_continuations():
  # 2 streams of 2 rows: stream 0 holds one document over both rows; stream 1 two documents.
  seg = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 2], [1, 1, 1]])
  targets = np.array([[5, 5, 5], [5, 5, 9], [5, 9, 5], [5, 5, 9]])
  mask = np.ones((4, 3))
  mask[2, 1] = 0
  assert documents_in_batch({"segment_ids": seg, "targets": targets, "loss_mask": mask}, 2, 9) == 3


def test_mixed_iterator_resumes_exactly(tok):
  cfg = CFG.replace(rows_per_stream=2)
  it = make_train_iterator(cfg, tok, ENGRAM)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert len(state["streams"]) == 4
  expected = [next(it) for _ in range(3)]
  it.close()
  fresh = make_train_iterator(cfg, tok, ENGRAM)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(3)]
  fresh.close()
  for x, y in zip(got, expected):
    for key in ("tokens", "targets", "segment_ids", "positions", "loss_mask"):
      np.testing.assert_array_equal(x[key], y[key])
    np.testing.assert_array_equal(x["engram_ids"][1], y["engram_ids"][1])
  other = make_train_iterator(CFG, tok, None)  # 8 streams cannot take a 4-stream state
  with pytest.raises(ValueError, match="4 document streams"):
    other.set_state(state)
  other.close()


# ---------------------------------------------------------------------------- validation set
def test_eval_set_size_coverage_and_identity(tok):
  corpus = eval_corpus(CFG)
  sel = select_eval_rows(corpus, tok, CFG)
  assert sel.scored_tokens >= CFG.eval_tokens
  assert sel.scored_tokens - CFG.eval_tokens < CFG.seq_len  # the shortest such prefix
  assert sel.num_documents == len(corpus) > 3
  assert set(sel.doc_index.tolist()) == set(range(len(corpus)))  # every file contributes
  # each row is a contiguous piece of its document starting at a line start
  for r in range(0, len(sel.lengths), 7):
    doc = corpus[int(sel.doc_index[r])]
    ids = tok.encode(doc, add_special_tokens=False).ids + [special_ids(tok).eos]
    s, n = int(sel.start[r]), int(sel.lengths[r])
    assert list(sel.ids[r, :n]) == ids[s : s + n]
    if s:
      assert tok.decode(ids[:s]).endswith("\n") or tok.decode([ids[s]]).startswith("\n")
  # independent of the data seed; every model gets the same batches
  a = make_eval_batches(CFG, tok, ENGRAM)
  b = make_eval_batches(CFG.replace(seed=7, batch_size=8), tok, ENGRAM)
  assert evaluation.tokens_fingerprint(a) == evaluation.tokens_fingerprint(b)
  assert sum(float(x["loss_mask"].sum()) for x in a) == sel.scored_tokens
  assert all(x["tokens"].shape == (8, 32) for x in a)
  np.testing.assert_array_equal(a[0]["segment_ids"][:, 0], 1)
  capped = make_eval_batches(CFG.replace(num_eval_batches=2), tok, ENGRAM)
  assert len(capped) == 2
  bigger = select_eval_rows(corpus, tok, CFG.replace(eval_tokens=None))
  assert bigger.scored_tokens > sel.scored_tokens


def test_eval_selection_is_reused_only_for_identical_inputs(tok, monkeypatch):
  import collections

  from tokenizers import Tokenizer

  from engram_jax.data import eval_set

  monkeypatch.setattr(eval_set, "_SELECTIONS", collections.OrderedDict())
  computed = []
  real = eval_set._select_eval_rows
  monkeypatch.setattr(eval_set, "_select_eval_rows", lambda *a: computed.append(a[2]) or real(*a))
  texts = [doc for doc in eval_corpus(CFG)][:8]  # a few documents: each selection is quick
  first = select_eval_rows(texts, tok, CFG)
  assert len(computed) == 1
  # the data seed and batch size are no inputs of the selection: the kept one is returned,
  # and it equals a fresh computation with them changed
  other = CFG.replace(seed=7, batch_size=4)
  assert select_eval_rows(texts, tok, other) is first and len(computed) == 1
  fresh = real(texts, tok, other)
  for name in ("ids", "lengths", "doc_index", "start"):
    np.testing.assert_array_equal(getattr(fresh, name), getattr(first, name))
  with pytest.raises(ValueError, match="read-only"):
    first.ids[0, 0] = 1  # a caller cannot change the kept selection
  # any real input changed: selected afresh
  edited = [texts[0] + "\nx = 1\n"] + texts[1:]
  grown = Tokenizer.from_str(tok.to_str())
  grown.add_tokens(["<zz_extra>"])
  for args in (
    (texts, tok, CFG.replace(seq_len=16)),
    (texts, tok, CFG.replace(eval_seed=CFG.eval_seed + 1)),
    (texts, tok, CFG.replace(eval_tokens=2048)),
    (edited, tok, CFG),
    (texts, grown, CFG),
  ):
    before = len(computed)
    assert select_eval_rows(*args) is not first and len(computed) == before + 1
  assert len(eval_set._SELECTIONS) == eval_set._MAX_SELECTIONS  # oldest dropped
  assert select_eval_rows(texts, tok, CFG) is not first  # `first` was the oldest


def test_micro_and_tiny_configs_hold_128k_validation_tokens():
  from experiments.configs import common, micro, tiny

  for module in (tiny, micro):
    data = common.data_config(module.get_config())
    assert data.eval_set == "chunks" and data.eval_tokens >= 128 * 1024
    assert data.num_eval_batches is None


# ---------------------------------------------------------------------------- planted facts
def test_fact_generator(tok):
  facts = make_facts(tok, 40, 40, seed=3)
  compressor = TokenizerCompressor.from_tokenizer(tok)
  lut = np.asarray(compressor.lookup_table)
  every = facts.trained + facts.held_out
  assert len(facts.trained) == len(facts.held_out) == 40
  suffixes = {(int(lut[f.key[-2]]), int(lut[f.key[-1]])) for f in every}
  assert len(suffixes) == len(every)  # keys unique after compression
  assert len({f.key for f in every}) == len(every)
  for f in every:
    assert tok.encode(f.text, add_special_tokens=False).ids == list(f.ids)
    assert len(tok.encode(tok.decode([f.value]), add_special_tokens=False).ids) == 1
  assert make_facts(tok, 40, 40, seed=3) == facts  # deterministic
  with pytest.raises(ValueError, match="distinct compressed"):
    make_facts(tok, 10**6, 0)


def test_held_out_facts_never_reach_training(tok):
  cfg = CFG.replace(num_facts=16, fact_repeats=40, held_out_facts=16)
  facts = facts_for(cfg, tok)
  base = train_corpus(cfg)
  mixed = FactMixedCorpus(base, facts.trained, cfg.fact_repeats)
  assert len(mixed) == len(base) + 16 * 40
  texts = [mixed[i] for i in range(len(mixed))]
  held = {f.text for f in facts.held_out}
  assert not held & set(texts)
  assert not any(h in t for h in held for t in texts[: len(base)])
  assert sum(t in {f.text for f in facts.trained} for t in texts) == 16 * 40
  # the training stream carries the planted facts, never the held-out ones
  it = make_train_iterator(cfg, tok, None)
  seen = set()
  try:
    for _ in range(60):
      b = next(it)
      for row in np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1):
        for f in facts.trained + facts.held_out:
          n = len(f.ids)
          for s in np.flatnonzero(row[: len(row) - n + 1] == f.key[0]):
            if tuple(row[s : s + n]) == f.ids:
              seen.add(f)
  finally:
    it.close()
  assert seen and seen <= set(facts.trained)


def test_all_chunks_of_a_document_do_not_overlap(tmp_path):
  for i in range(3):
    (tmp_path / f"v{i}.txt").write_text("".join(f"line {i} {j}\n" for j in range(200)))
  corpus = build_corpus([f"text:{tmp_path}/*.txt"], None)
  tok = load_or_train_tokenizer(CFG)
  sel = select_eval_rows(corpus, tok, CFG.replace(eval_tokens=None))
  assert sorted(set(sel.doc_index.tolist())) == [0, 1, 2]
  # all chunks: starts strictly increase per document, and the chunks do not overlap
  for d in range(3):
    starts = np.sort(sel.start[sel.doc_index == d])
    lens = sel.lengths[sel.doc_index == d][np.argsort(sel.start[sel.doc_index == d])]
    assert (starts[1:] >= starts[:-1] + lens[:-1]).all()


def test_sweep_paired_summary_over_seeds(tmp_path):
  from experiments import sweep_lib

  rng = np.random.default_rng(4)
  counts = np.full(50, 10.0)
  rows = []
  for seed in range(3):
    base = rng.normal(50, 5, 50)
    for name, shift in (("ref", 0.0), ("better", -0.05 * 10), ("same", 0.0)):
      d = tmp_path / f"{name}{seed}"
      d.mkdir()
      loss = base + shift + (rng.normal(0, 0.1, 50) if name != "ref" else 0)
      evaluation.save_rows(
        d / evaluation.ROWS_FILE,
        {"loss_sum": loss, "tokens": counts, "correct": counts * 0, "bytes": counts},
        step=1,
        fingerprint="fp",
      )
      rows.append(
        {"name": name, "seed": seed, "data_seed": seed, "run_dir": str(d), "val_loss": float(loss.sum() / counts.sum())}
      )
  summary = {
    s["group"]: s
    for s in sweep_lib.paired_summary(rows, group=lambda r: r["name"], is_ref=lambda r: r["name"] == "ref")
  }
  better = summary["better"]
  per_seed = [p["diff"] for p in better["per_seed"]]
  assert len(per_seed) == 3 and better["seeds"] == [0, 1, 2]
  assert better["diff_mean"] == pytest.approx(np.mean(per_seed))
  assert better["diff_se"] == pytest.approx(np.std(per_seed, ddof=1) / math.sqrt(3))
  assert better["diff_mean"] == pytest.approx(-0.05, abs=0.01) and better["claim"]
  assert sweep_lib.verdict(better).startswith("better")
  assert sweep_lib.verdict(summary["ref"]) == "reference"
  same = summary["same"]
  assert not same["claim"] and sweep_lib.verdict(same).startswith("not detectable")
  assert same["mde"] == pytest.approx(2.84 * same["diff_se"])
  table = sweep_lib.paired_table(list(summary.values()), "variant")
  assert table.count("\n") == 4 and "clears 2 SE" in table
