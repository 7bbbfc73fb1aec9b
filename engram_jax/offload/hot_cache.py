"""`HotRowCache`: the most frequent rows of a host table, resident on the device.

n-gram frequencies are Zipfian, so a cache of the top C rows serves most lookups. A lookup
splits the ids into hits (read from the device cache) and misses (gathered from the
`HostTable`, only the distinct missing rows, padded to a power-of-two bucket so the
device-side combine compiles for few shapes) and combines them on the device. The result
equals a plain gather of the table, row for row.

Frequencies: dense np.int64 [R] counts, from `count_row_frequencies` over a stream of
flat row-id arrays or from an .npy file (`save_frequencies` / `load_frequencies`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.offload import placement as placement_lib
from engram_jax.offload.host_table import HostTable


def count_row_frequencies(stream: Iterable, num_rows: int) -> np.ndarray:
  """Counts every flat row id in a stream of integer arrays: np.int64 [num_rows]."""
  counts = np.zeros(num_rows, np.int64)
  for ids in stream:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num_rows):
      raise ValueError(f"row id outside [0, {num_rows}): min {ids.min()} max {ids.max()}")
    counts += np.bincount(ids, minlength=num_rows)
  return counts


def save_frequencies(path, counts: np.ndarray) -> None:
  """Writes row frequencies (int64 [R]) to an .npy file that `load_frequencies` reads back."""
  np.save(Path(path), np.asarray(counts, np.int64))


def load_frequencies(path, num_rows: int) -> np.ndarray:
  """Dense counts [num_rows] from an .npy: either dense [R] or (row, count) pairs [n, 2]."""
  arr = np.load(Path(path))
  if arr.ndim == 1:
    if arr.shape[0] != num_rows:
      raise ValueError(f"frequency file {path} has {arr.shape[0]} entries, the table {num_rows} rows")
    return arr.astype(np.int64)
  if arr.ndim == 2 and arr.shape[1] == 2:
    rows, cnt = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
      raise ValueError(f"frequency file {path} names rows outside [0, {num_rows})")
    return np.bincount(rows, weights=cnt, minlength=num_rows).astype(np.int64)
  raise ValueError(f"frequency file {path} must hold [R] counts or [n, 2] (row, count) pairs, got shape {arr.shape}")


def top_rows(counts: np.ndarray, capacity: int) -> np.ndarray:
  """The `capacity` most frequent rows (ties: lower row id first), sorted ascending: int64 [C]."""
  counts = np.asarray(counts)
  if not 1 <= capacity <= counts.shape[0]:
    raise ValueError(f"cache capacity must be in [1, {counts.shape[0]}], got {capacity}")
  order = np.argsort(-counts, kind="stable")[:capacity]
  return np.sort(order).astype(np.int64)


def _bucket(n: int, minimum: int) -> int:
  """The next power of two >= n (at least `minimum`): padded sizes, so jit compiles few shapes."""
  return max(minimum, 1 << max(0, int(n - 1).bit_length()))


@jax.jit
def _combine(cache_rows, slot, hit, miss_rows, miss_index):
  from_cache = cache_rows.at[jnp.maximum(slot, 0)].get(mode="promise_in_bounds")
  from_host = miss_rows.at[miss_index].get(mode="promise_in_bounds")
  return jnp.where(hit[..., None], from_cache, from_host)


@jax.jit
def _set_rows(cache_rows, slots, rows):
  return cache_rows.at[slots].set(rows, mode="promise_in_bounds")


class HotRowCache:
  """Device copy of the rows `hot_rows` of `table`.

  Attributes:
    table: the `HostTable` behind the cache (the source of misses).
    hot_rows: np.int64 [C], cached flat row ids, ascending (slot i holds hot_rows[i]).
    rows: device array [C, d].
    lookups, hits: counters over every `lookup` / `remap(count=True)` call.
  """

  def __init__(self, table: HostTable, hot_rows, *, min_miss_bucket: int = 64):
    hot = np.asarray(hot_rows, np.int64).reshape(-1)
    if hot.size == 0:
      raise ValueError("HotRowCache needs at least one hot row")
    if (np.diff(hot) <= 0).any():
      raise ValueError("hot_rows must be strictly ascending (distinct)")
    if hot[0] < 0 or hot[-1] >= table.num_rows:
      raise ValueError(f"hot rows must lie in [0, {table.num_rows}), got [{hot[0]}, {hot[-1]}]")
    self.table = table
    self.hot_rows = hot
    self.min_miss_bucket = min_miss_bucket
    self.rows = table.gather(hot)
    self.lookups = 0
    self.hits = 0

  @classmethod
  def from_frequencies(
    cls, table: HostTable, counts: np.ndarray, *, capacity: int | None = None, fraction: float | None = None, **kwargs
  ) -> HotRowCache:
    """Caches the top `capacity` rows (or `fraction` of all rows) by `counts`."""
    if (capacity is None) == (fraction is None):
      raise ValueError("give exactly one of capacity or fraction")
    if counts.shape != (table.num_rows,):
      raise ValueError(f"counts {counts.shape} must have one entry per row ({table.num_rows})")
    if capacity is None:
      if not 0 < fraction <= 1:
        raise ValueError(f"cache fraction must be in (0, 1], got {fraction}")
      capacity = max(1, round(fraction * table.num_rows))
    return cls(table, top_rows(counts, capacity), **kwargs)

  @property
  def capacity(self) -> int:
    """Rows held on the device."""
    return int(self.hot_rows.shape[0])

  @property
  def hit_rate(self) -> float:
    """Fraction of the looked-up rows found on the device since the last `reset_stats` (NaN before any lookup)."""
    return self.hits / self.lookups if self.lookups else float("nan")

  def reset_stats(self) -> None:
    """Zeroes the lookup and hit counters."""
    self.lookups = self.hits = 0

  def remap(self, flat_row_ids, *, count: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Host: flat ids [...] -> (slot int32 [...] (-1 on a miss), hit bool [...])."""
    ids = np.asarray(flat_row_ids)
    pos = np.searchsorted(self.hot_rows, ids)
    hit = self.hot_rows[np.minimum(pos, self.capacity - 1)] == ids
    if count:
      self.lookups += ids.size
      self.hits += int(hit.sum())
    return np.where(hit, pos, -1).astype(np.int32), hit

  def lookup(self, flat_row_ids) -> jax.Array:
    """Flat ids [...] -> device rows [..., d]; equal to `table.gather(ids)`."""
    ids = np.asarray(flat_row_ids)
    if self.table.check_ids:
      self.table._validate(ids)
    slot, hit = self.remap(ids)
    missing, inverse = np.unique(ids[~hit], return_inverse=True)
    miss_index = np.zeros(ids.shape, np.int32)
    miss_index[~hit] = inverse.reshape(-1)
    padded = np.zeros(_bucket(missing.size, self.min_miss_bucket), np.int64)
    padded[: missing.size] = missing  # padding reads row 0, never selected
    miss_rows = self.table.gather(padded)
    put = lambda x: jax.device_put(x, placement_lib.sharding_for("device", self.table.device))
    return _combine(self.rows, put(slot), put(hit), miss_rows, put(miss_index))

  def refresh(self, updated_rows=None) -> None:
    """Re-reads cached rows from the host table after an optimizer step on it.

    Args:
      updated_rows: the rows the step changed (e.g. `sparse_grad`'s unique rows; ids >= R
        are ignored); only the cached ones among them are re-read. None: all C rows.
    """
    if updated_rows is None:
      self.rows = self.table.gather(self.hot_rows)
      return
    updated = np.asarray(updated_rows).reshape(-1)
    slot, hit = self.remap(updated[updated < self.table.num_rows], count=False)
    slot = slot[hit]
    if slot.size == 0:
      return
    padded = np.full(_bucket(slot.size, self.min_miss_bucket), slot[0], np.int32)
    padded[: slot.size] = slot  # repeats of slot[0] write the same row: harmless
    fresh = self.table.gather(self.hot_rows[padded])
    self.rows = _set_rows(self.rows, jax.device_put(padded, self.rows.sharding), fresh)
