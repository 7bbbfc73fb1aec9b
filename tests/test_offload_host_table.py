"""HostTable placement and gathers, placement parsing, and the RowPrefetcher."""

import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.offload import placement
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.indexing import flat_rows_np, head_offsets
from engram_jax.offload.prefetch import RowPrefetcher

R, D = 97, 8
TABLE = np.random.default_rng(0).normal(size=(R, D)).astype(np.float32)


def test_cpu_exposes_host_memory_kinds():
  kinds = placement.memory_kinds()
  assert {"device", "pinned_host"} <= set(kinds)
  assert placement.host_memory_kind() == "pinned_host"
  assert placement.to_host(TABLE).sharding.memory_kind == "pinned_host"


@pytest.mark.parametrize("method", ["numpy", "compute_on"])
def test_gather_equals_device_take(method):
  table = HostTable(TABLE, method=method)
  if method == "compute_on":
    assert table.array.sharding.memory_kind == "pinned_host"
  ids = np.random.default_rng(1).integers(0, R, size=(2, 5, 3))
  for given in (ids, jnp.asarray(ids, jnp.int32)):
    rows = table.gather(given)
    assert rows.shape == (2, 5, 3, D)
    assert rows.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(jnp.take(jnp.asarray(TABLE), ids, axis=0)))
  with pytest.raises(ValueError, match=r"row id 97 outside"):
    table.gather(np.array([0, R]))
  with pytest.raises(ValueError, match="integers"):
    table.gather(np.array([0.5]))


def test_host_table_rejects_bad_shapes_and_methods():
  with pytest.raises(ValueError, match=r"flat table \[R, d\]"):
    HostTable(TABLE[0])
  with pytest.raises(ValueError, match="method"):
    HostTable(TABLE, method="magic")


def test_placement_parsing():
  assert placement.parse_placements("host", [1, 3]) == {
    1: placement.TablePlacement("host"),
    3: placement.TablePlacement("host"),
  }
  got = placement.parse_placements("3:cached@0.05", [1, 3])
  assert got[1].kind == "device" and got[3].kind == "cached" and got[3].cache_fraction == 0.05
  with pytest.raises(ValueError, match="not an Engram layer"):
    placement.parse_placements("2:host", [1, 3])
  with pytest.raises(ValueError, match="0 < cache_fraction < 1"):
    placement.parse_placements("cached", [1])
  with pytest.raises(ValueError, match="must be one of"):
    placement.parse_placements("nvme", [1])  # ("disk" is a placement: tests/test_disk_table.py)


SIZES = [31, 37, 29]  # three heads, R = 97
OFFSETS = head_offsets(SIZES)


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  for i in range(n):
    rows = np.stack([rng.integers(0, s, size=(2, 4)) for s in SIZES], -1).astype(np.int32)
    yield {"step": i, "engram_ids": {1: rows}}


def test_prefetcher_yields_batches_in_order_with_their_rows():
  table = HostTable(TABLE)
  with RowPrefetcher(_batches(6), {1: table}, offsets={1: OFFSETS}) as pf:
    out = list(pf)
  assert [b["step"] for b, _ in out] == list(range(6))
  for batch, rows in out:
    flat = flat_rows_np(batch["engram_ids"][1], OFFSETS)
    assert rows[1].shape == (2, 4, 3 * D)  # heads merged: what Engram(engram_rows=...) takes
    np.testing.assert_array_equal(np.asarray(rows[1]), TABLE[flat].reshape(2, 4, -1))


def test_prefetcher_runs_ahead_of_the_consumer():
  gathered = []

  def slow_gather(ids):
    gathered.append(time.perf_counter())
    return jnp.zeros(ids.shape + (D,))

  with RowPrefetcher(_batches(3), {1: slow_gather}, offsets={1: OFFSETS}, depth=1) as pf:
    next(pf)
    deadline = time.time() + 5
    while len(gathered) < 2 and time.time() < deadline:  # batch 1 is gathered while we hold 0
      time.sleep(0.01)
    assert len(gathered) == 2
    time.sleep(0.1)
    assert len(gathered) == 2  # depth=1: batch 2 waits until the consumer takes batch 1
    next(pf)
    deadline = time.time() + 5
    while len(gathered) < 3 and time.time() < deadline:
      time.sleep(0.01)
    assert len(gathered) == 3


def test_prefetcher_propagates_errors_at_the_failing_batch():
  def gather(ids):
    if int(ids[0, 0, 0]) < 0:
      raise RuntimeError("host gather exploded")
    return jnp.zeros(ids.shape + (D,))

  def batches():
    yield from _batches(2)
    yield {"step": 2, "engram_ids": {1: -np.ones((2, 4, 3), np.int32)}}

  pf = RowPrefetcher(batches(), {1: gather}, offsets=None)
  assert [next(pf)[0]["step"] for _ in range(2)] == [0, 1]
  with pytest.raises(RuntimeError, match="exploded"):
    next(pf)
  with pytest.raises(StopIteration):
    next(pf)
  pf.close()


def test_prefetcher_close_stops_an_endless_stream():
  def endless():
    i = 0
    while True:
      yield {"step": i, "engram_ids": {1: np.zeros((1, 2, 3), np.int32)}}
      i += 1

  before = threading.active_count()
  pf = RowPrefetcher(endless(), {1: HostTable(TABLE)}, offsets={1: OFFSETS}, depth=2)
  assert next(pf)[0]["step"] == 0
  pf.close()
  assert not pf._thread.is_alive()
  assert threading.active_count() <= before
  with pytest.raises(StopIteration):
    next(pf)


def test_prefetcher_checks_arguments():
  with pytest.raises(ValueError, match="depth"):
    RowPrefetcher([], {1: HostTable(TABLE)}, depth=0)
  with pytest.raises(ValueError, match="offsets for layers"):
    RowPrefetcher([], {1: HostTable(TABLE)}, offsets={2: OFFSETS})


class _FakeDevice:
  def __init__(self, *kinds):
    self.kinds = kinds

  def addressable_memories(self):
    return [type("Memory", (), {"kind": k})() for k in self.kinds]


def test_host_memory_kind_falls_back_to_unpinned_with_a_log(caplog):
  with caplog.at_level("WARNING"):
    assert placement.host_memory_kind(_FakeDevice("device", "unpinned_host")) == "unpinned_host"
  assert "no pinned_host memory" in caplog.text
  with pytest.raises(ValueError, match="no host memory kind"):
    placement.host_memory_kind(_FakeDevice("device"))
