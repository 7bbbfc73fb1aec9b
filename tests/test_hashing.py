"""N-gram hashing: bit-exact with the reference (host and device), properties, constants."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_jax import EngramConfig, NgramHasher
from engram_jax.hashing import is_prime, next_prime
from tests.conftest import engram_config_from_meta, load_golden

GOLDEN, META = load_golden("engram_reference_hashes")


@pytest.mark.parametrize("name", sorted(META))
def test_host_hash_matches_reference(name):
  meta = META[name]
  hasher = NgramHasher(engram_config_from_meta(meta), meta["compressed_vocab"])
  out = hasher.hash(GOLDEN[f"{name}/input_ids"])
  assert sorted(out) == sorted(meta["layer_ids"])
  for lid in meta["layer_ids"]:
    np.testing.assert_array_equal(hasher.multipliers[lid], GOLDEN[f"{name}/multipliers_layer{lid}"])
    np.testing.assert_array_equal(hasher.table_sizes[lid], GOLDEN[f"{name}/table_sizes_layer{lid}"])
    assert out[lid].dtype == np.int64
    np.testing.assert_array_equal(out[lid], GOLDEN[f"{name}/hashes_layer{lid}"])


@pytest.mark.parametrize("name", sorted(META))
def test_device_hash_matches_reference_without_x64(name):
  meta = META[name]
  assert not jax.config.jax_enable_x64
  hasher = NgramHasher(engram_config_from_meta(meta), meta["compressed_vocab"])
  ids = GOLDEN[f"{name}/input_ids"].astype(np.int32)
  out = jax.jit(hasher.hash_jax)(ids)
  for lid in meta["layer_ids"]:
    assert out[lid].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(out[lid]), GOLDEN[f"{name}/hashes_layer{lid}"])


def test_paper_default_multipliers_exceed_int32():
  meta = META["paper_default"]
  hasher = NgramHasher(engram_config_from_meta(meta), meta["compressed_vocab"])
  assert max(int(m) for m in hasher.multipliers[1]) > 2**31


def test_offsets_are_prefix_sums_and_primes_distinct():
  cfg = EngramConfig(vocab_sizes=(100, 200), n_embed_per_ngram=8, n_head_per_ngram=4, layer_ids=(1, 2))
  hasher = NgramHasher(cfg, 50, pad_id=0)
  all_primes = np.concatenate([hasher.table_sizes[l] for l in cfg.layer_ids])
  assert len(set(all_primes.tolist())) == all_primes.size
  assert all(is_prime(int(p)) for p in all_primes)
  for lid in cfg.layer_ids:
    np.testing.assert_array_equal(hasher.offsets[lid], np.cumsum(hasher.table_sizes[lid]) - hasher.table_sizes[lid])
    assert hasher.total_rows(lid) == int(hasher.table_sizes[lid].sum())
  # order 2 heads start just above 100, order 3 just above 200
  assert hasher.table_sizes[1][0] == 101 and hasher.table_sizes[1][4] == 211


def test_prime_search_is_fast_and_exact_for_64bit():
  assert is_prime(2**61 - 1) and not is_prime(2**61 + 1)
  assert is_prime(18446744073709551557)  # largest prime below 2^64
  assert not is_prime(3215031751)  # strong pseudoprime to bases 2, 3, 5, 7
  assert next_prime(646399, {646403}) > 646403
  import time

  t0 = time.perf_counter()
  NgramHasher(EngramConfig(vocab_sizes=(2_262_400, 2_262_400), layer_ids=(2, 15)), 100_000)
  assert time.perf_counter() - t0 < 1.0


def test_bad_ids_raise_with_position():
  hasher = NgramHasher(EngramConfig(vocab_sizes=(50, 50), n_embed_per_ngram=8, n_head_per_ngram=2), 10)
  with pytest.raises(ValueError, match=r"compressed id 10 at position \(0, 2\)"):
    hasher.hash(np.array([[1, 2, 10]]))
  with pytest.raises(ValueError, match="compressed id -1"):
    hasher.hash(np.array([[1, -1, 3]]))
  with pytest.raises(ValueError, match=r"\[batch, seq\]"):
    hasher.hash(np.array([1, 2, 3]))
  with pytest.raises(ValueError, match="compressed id 12"):
    hasher.hash_jax(np.array([[1, 12]]))
  with pytest.raises(ValueError, match="pad id"):
    NgramHasher(EngramConfig(vocab_sizes=(50, 50), n_embed_per_ngram=8, n_head_per_ngram=2, pad_id=20), 10)


def test_segment_ids_stop_ngrams_at_document_boundaries():
  cfg = EngramConfig(vocab_sizes=(97, 97), n_embed_per_ngram=8, n_head_per_ngram=2, pad_id=0)
  hasher = NgramHasher(cfg, 30)
  doc_a, doc_b = [5, 6, 7, 8], [9, 10, 11]
  packed = np.array([doc_a + doc_b])
  seg = np.array([[1] * 4 + [2] * 3])
  rows = hasher.hash(packed, seg)[1]
  alone = hasher.hash(np.array([doc_b]))[1]
  np.testing.assert_array_equal(rows[:, 4:], alone)  # doc b hashes as if it started a row
  np.testing.assert_array_equal(rows[:, :4], hasher.hash(np.array([doc_a]))[1])
  np.testing.assert_array_equal(np.asarray(hasher.hash_jax(packed, seg)[1]), rows)
  assert not np.array_equal(hasher.hash(packed)[1][:, 4:], alone)


def test_constants_roundtrip_and_mismatch_detection():
  cfg = EngramConfig(vocab_sizes=(1000, 2000), n_embed_per_ngram=16, n_head_per_ngram=4, layer_ids=(1, 3), seed=3)
  hasher = NgramHasher(cfg, 777, pad_id=4)
  import json

  constants = json.loads(json.dumps(hasher.constants()))
  again = NgramHasher.from_constants(constants)
  ids = np.random.default_rng(0).integers(0, 777, (2, 9))
  for lid in cfg.layer_ids:
    np.testing.assert_array_equal(again.hash(ids)[lid], hasher.hash(ids)[lid])
  other = NgramHasher(cfg.replace(seed=4), 777, pad_id=4)
  diff = hasher.diff_constants(other.constants())
  assert any("multipliers" in d for d in diff) and any("seed" in d for d in diff)
  tampered = dict(constants, table_sizes={"1": [1] * 8, "3": constants["table_sizes"]["3"]})
  with pytest.raises(ValueError, match="table_sizes differ for layers \\['1'\\]"):
    NgramHasher.from_constants(tampered)


@st.composite
def _config_and_ids(draw):
  n = draw(st.integers(2, 4))
  k = draw(st.integers(1, 3))
  vocab = draw(st.integers(2, 5000))
  sizes = tuple(draw(st.integers(2, 100_000)) for _ in range(n - 1))
  cfg = EngramConfig(
    vocab_sizes=sizes,
    max_ngram_size=n,
    n_embed_per_ngram=2 * k,
    n_head_per_ngram=k,
    layer_ids=(draw(st.integers(1, 40)),),
    pad_id=draw(st.integers(0, vocab - 1)),
    seed=draw(st.integers(0, 2**31)),
  )
  b, t = draw(st.integers(1, 3)), draw(st.integers(1, 12))
  ids = np.asarray(draw(st.lists(st.integers(0, vocab - 1), min_size=b * t, max_size=b * t))).reshape(b, t)
  return cfg, vocab, ids


@settings(max_examples=25, deadline=None)
@given(_config_and_ids())
def test_properties_rows_in_range_context_determines_row_host_equals_device(case):
  cfg, vocab, ids = case
  hasher = NgramHasher(cfg, vocab)
  lid = cfg.layer_ids[0]
  rows = hasher.hash(ids)[lid]
  sizes = hasher.table_sizes[lid]
  assert rows.shape == ids.shape + (cfg.num_heads,)
  assert ((rows >= 0) & (rows < sizes)).all()
  np.testing.assert_array_equal(np.asarray(hasher.hash_jax(ids)[lid]), rows)
  # Equal n-gram contexts give equal rows: the same sequence placed after a different
  # prefix of length >= N-1 hashes identically once its own context is full.
  n = cfg.max_ngram_size
  prefix = (ids[:, :1] + 1) % vocab
  shifted = np.concatenate([np.repeat(prefix, n - 1, axis=1), ids, ids], axis=1)
  rows2 = hasher.hash(shifted)[lid]
  t = ids.shape[1]
  np.testing.assert_array_equal(rows2[:, n - 1 + t + n - 1 :], rows2[:, n - 1 + n - 1 : n - 1 + t])
