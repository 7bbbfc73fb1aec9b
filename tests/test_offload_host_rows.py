"""In-program reads of host-memory tables: the compute_on gather and the hot-row cache
in front of it return exactly the table's rows, inside jit and a while loop, and the
cached read copies only the misses (up to its capacity) from the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.offload import HostTable, HotRowCache
from engram_jax.offload import host_rows as hr

R, D = 500, 6


@pytest.fixture(scope="module")
def table():
  return np.random.default_rng(0).normal(size=(R, D)).astype(np.float32)


def test_host_memory_table_is_in_host_memory_and_not_copied_twice(table):
  ok, kind = hr.can_read_in_program()
  assert ok and kind in ("pinned_host", "unpinned_host")
  host = HostTable(table, method="compute_on")
  assert hr.host_memory_table(host) is host.array
  copied = hr.host_memory_table(HostTable(table))  # NumPy master: one copy
  assert copied.sharding.memory_kind == kind
  np.testing.assert_array_equal(np.asarray(copied), table)


def test_gather_host_rows_in_a_while_loop_equals_numpy(table):
  host = hr.host_memory_table(HostTable(table, method="compute_on"))

  @jax.jit
  def walk(t, ids):
    def body(c):
      i, ids, out = c
      rows = hr.gather_host_rows(t, ids)  # [2, 3, D] on the device
      return i + 1, (ids * 7 + 3) % R, out.at[i].set(rows)

    out = jnp.zeros((4,) + ids.shape + (D,), jnp.float32)
    return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, ids, out))[2]

  ids = np.arange(6, dtype=np.int32).reshape(2, 3) * 41
  got = np.asarray(walk(host, jnp.asarray(ids)))
  for i in range(4):
    np.testing.assert_array_equal(got[i], table[ids])
    ids = (ids * 7 + 3) % R


def test_cached_rows_equal_the_table_and_count_host_reads(table):
  host = HostTable(table, method="compute_on")
  cache = HotRowCache(host, np.arange(0, R, 2))  # even rows on the device
  hot_ids, hot_rows = hr.hot_arrays(cache)
  t = hr.host_memory_table(host)
  read = jax.jit(hr.gather_cached_rows, static_argnums=4)
  # 2 misses (odd ids) of 8, capacity 3: the compact path reads 3 rows.
  few = np.asarray([[0, 2, 5, 8], [10, 7, 12, 498]], np.int32)
  rows, stats = read(hot_ids, hot_rows, t, jnp.asarray(few), 3)
  np.testing.assert_array_equal(np.asarray(rows), table[few])
  assert {k: int(v) for k, v in stats.items()} == {"lookups": 8, "hits": 6, "host_rows": 3}
  # 6 misses > capacity 3: every id is read from the host, still exact.
  many = np.asarray([[1, 3, 5, 8], [9, 7, 12, 499]], np.int32)
  rows, stats = read(hot_ids, hot_rows, t, jnp.asarray(many), 3)
  np.testing.assert_array_equal(np.asarray(rows), table[many])
  assert {k: int(v) for k, v in stats.items()} == {"lookups": 8, "hits": 2, "host_rows": 8}
  # The cache really serves the hits: zeroed cache rows show up exactly at the hits.
  rows, _ = read(hot_ids, hot_rows * 0, t, jnp.asarray(few), 3)
  hit = few % 2 == 0
  np.testing.assert_array_equal(np.asarray(rows)[hit], 0 * table[few][hit])
  np.testing.assert_array_equal(np.asarray(rows)[~hit], table[few][~hit])
  with pytest.raises(ValueError, match="miss_capacity must be >= 1"):
    hr.gather_cached_rows(hot_ids, hot_rows, t, jnp.asarray(few), 0)
