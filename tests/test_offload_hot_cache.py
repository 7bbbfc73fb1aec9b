"""Hot-row cache: lookups equal a plain gather; hit rate on a Zipf stream as predicted."""

import numpy as np
import pytest

from engram_jax import EngramConfig, NgramHasher
from engram_jax.offload.hit_rate import analytic_zipf_hit_rate, measure_hit_rate
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.hot_cache import (
  HotRowCache,
  count_row_frequencies,
  load_frequencies,
  save_frequencies,
  top_rows,
)

R, D = 2000, 4
TABLE = np.random.default_rng(0).normal(size=(R, D)).astype(np.float32)
ZIPF_S = 1.1


def _zipf_stream(seed, batches, shape=(8, 64)):
  """Row ids with P(rank k) ~ k^-s; rank k is row PERM[k] (frequent rows are scattered)."""
  rng = np.random.default_rng(seed)
  p = np.arange(1, R + 1, dtype=np.float64) ** -ZIPF_S
  perm = np.random.default_rng(99).permutation(R)
  return [perm[rng.choice(R, size=shape, p=p / p.sum())] for _ in range(batches)]


@pytest.mark.parametrize("method", ["numpy", "compute_on"])
def test_lookup_equals_plain_gather(method):
  table = HostTable(TABLE, method=method)
  counts = count_row_frequencies(_zipf_stream(0, 4), R)
  cache = HotRowCache.from_frequencies(table, counts, fraction=0.05)
  assert cache.capacity == 100
  for ids in _zipf_stream(1, 2, shape=(3, 7, 5)):
    np.testing.assert_array_equal(np.asarray(cache.lookup(ids)), TABLE[ids])
  assert 0 < cache.hits < cache.lookups == 2 * 3 * 7 * 5
  # all hits and all misses
  hot = cache.hot_rows[:6].reshape(2, 3)
  np.testing.assert_array_equal(np.asarray(cache.lookup(hot)), TABLE[hot])
  cold = np.setdiff1d(np.arange(R), cache.hot_rows)[:6].reshape(2, 3)
  np.testing.assert_array_equal(np.asarray(cache.lookup(cold)), TABLE[cold])


def test_remap_slots_and_hit_mask():
  cache = HotRowCache(HostTable(TABLE), np.array([3, 10, 500]))
  slot, hit = cache.remap(np.array([[10, 4], [500, 3]]))
  np.testing.assert_array_equal(slot, [[1, -1], [2, 0]])
  np.testing.assert_array_equal(hit, [[True, False], [True, True]])
  assert cache.hit_rate == 0.75
  with pytest.raises(ValueError, match="strictly ascending"):
    HotRowCache(HostTable(TABLE), np.array([4, 3]))
  with pytest.raises(ValueError, match=r"row id 2000 outside"):
    cache.lookup(np.array([R]))


def test_refresh_picks_up_host_updates():
  table = HostTable(TABLE)
  cache = HotRowCache(table, np.array([1, 2]))
  table.array[1] += 1.0  # e.g. a SparseRowAdam step on the host table
  assert not np.array_equal(np.asarray(cache.lookup(np.array([1]))), table.array[[1]])
  cache.refresh()
  np.testing.assert_array_equal(np.asarray(cache.lookup(np.array([1]))), table.array[[1]])
  before = table.array[1].copy()
  table.array[1:3] -= 5.0
  cache.refresh(np.array([2, 7, R]))  # only row 2 reported (7 is not cached, R is padding)
  got = np.asarray(cache.lookup(np.array([1, 2])))
  np.testing.assert_array_equal(got[1], table.array[2])
  np.testing.assert_array_equal(got[0], before)  # not reported: the cache keeps the old row


def test_hit_rate_on_zipf_stream_matches_analytic(tmp_path):
  counts = count_row_frequencies(_zipf_stream(2, 40), R)  # rank on one stream ...
  save_frequencies(tmp_path / "freq.npy", counts)
  counts = load_frequencies(tmp_path / "freq.npy", R)
  cache = HotRowCache.from_frequencies(HostTable(TABLE), counts, capacity=200)
  for ids in _zipf_stream(3, 20):  # ... measure on another
    cache.remap(ids)
  expected = analytic_zipf_hit_rate(R, 200, ZIPF_S)
  assert abs(cache.hit_rate - expected) < 0.02, (cache.hit_rate, expected)
  assert cache.hit_rate > 0.5  # 10% of the rows serve most lookups


def test_frequency_file_formats(tmp_path):
  np.save(tmp_path / "pairs.npy", np.array([[5, 3], [7, 1], [5, 2]]))
  counts = load_frequencies(tmp_path / "pairs.npy", 10)
  assert counts[5] == 5 and counts[7] == 1 and counts.sum() == 6
  np.testing.assert_array_equal(top_rows(counts, 2), [5, 7])
  with pytest.raises(ValueError, match="has 10 entries"):
    save_frequencies(tmp_path / "d.npy", counts)
    load_frequencies(tmp_path / "d.npy", 11)


def test_measure_hit_rate_per_order():
  config = EngramConfig(
    vocab_sizes=(101, 103), max_ngram_size=3, n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=(1,), pad_id=0
  )
  hasher = NgramHasher(config, compressed_vocab_size=50)
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 6, size=200) for _ in range(5)]  # 5 symbols: few distinct n-grams
  rates = measure_hit_rate(docs, hasher, [0.05, 0.5, 1.0])
  assert set(rates) == {"order 2", "order 3", "all"}
  for r in rates.values():
    assert 0 < r[0.05] <= r[0.5] <= r[1.0] == 1.0
  # Order-2 n-grams of 5 symbols (+pad) occupy at most 30 per head of ~101 rows: a 50% cache
  # holds every one of them.
  assert rates["order 2"][0.5] == 1.0
  assert rates["order 3"][0.05] < rates["order 2"][0.05] + 1e-9
