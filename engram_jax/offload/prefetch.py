"""`RowPrefetcher`: gathers the Engram rows of batch t+1 while the caller computes batch t.

A background thread pulls batches from the input iterator, gathers every host-placed
layer's rows (`HostTable.gather` / `HotRowCache.lookup`), waits for the host-to-device
copies to finish, and hands (batch, {layer: rows}) to the consumer. At most `depth`
batches are gathered ahead of the one the consumer holds (depth=1: double buffering, one
batch in use while the next one is gathered, then the thread waits). Order is
the input order; an exception in the input or a gather is re-raised to the consumer at
the batch where it happened; `close()` (or leaving the `with` block) stops the thread.

Training: the rows of batch t+1 are read while step t runs, before step t's optimizer
update of the host table lands, so rows touched by both steps would be one update stale.
After applying step t's update, call `patch_updated_rows(rows_t1, flat_ids_t1,
updated_rows_t, table)`: it re-reads exactly those rows, making training equal to the
device-table model (tested). Rows outside step t's update are never written while the
thread reads them, so no torn reads. (This needs a NumPy host table, updated in place;
a jax.Array table is replaced and its buffers donated by each update.) Inference (fixed
tables) needs no patching.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.offload.host_table import HostTable
from engram_jax.offload.hot_cache import HotRowCache, _bucket
from engram_jax.offload.indexing import flat_rows_np

_END = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


def _gather_fn(source) -> Callable[[np.ndarray], jax.Array]:
  if isinstance(source, HotRowCache):
    return source.lookup
  if isinstance(source, HostTable):
    return source.gather
  if callable(source):
    return source
  raise ValueError(f"a row source must be a HostTable, HotRowCache or callable, got {type(source)}")


def patch_updated_rows(rows: jax.Array, flat_ids, updated_rows, table: HostTable) -> jax.Array:
  """Re-reads from `table` the rows of `flat_ids` that are in `updated_rows`.

  Args:
    rows: device rows gathered earlier for `flat_ids`: [..., H, d] or merged [..., H * d].
    flat_ids: flat row ids [..., H] (offsets added) of those rows.
    updated_rows: ids the optimizer changed since (e.g. `sparse_grad`'s unique rows;
      ids >= R, its padding, are ignored).
    table: the host table, already updated.
  Returns:
    rows with the same shape, equal to a fresh gather of `flat_ids`.
  """
  flat = np.asarray(flat_ids)
  updated = np.asarray(updated_rows).reshape(-1)
  stale = np.isin(flat, updated[updated < table.num_rows])
  if not stale.any():
    return rows
  fresh_ids, inverse = np.unique(flat[stale], return_inverse=True)
  index = np.zeros(flat.shape, np.int32)
  index[stale] = inverse.reshape(-1)
  padded = np.full(_bucket(fresh_ids.size, 64), fresh_ids[0], np.int64)  # few shapes to compile
  padded[: fresh_ids.size] = fresh_ids
  # the fresh rows go to every device holding part of `rows` (a batch split over a mesh)
  fresh = table.host_rows(padded) if table.method == "numpy" else table.gather(padded)
  fresh = jax.device_put(fresh, _replicated(rows.sharding))
  put = lambda x: jax.device_put(x, rows.sharding)
  return _patch(rows, put(stale), fresh, put(index))


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(), memory_kind=sharding.memory_kind)
  if len(sharding.device_set) == 1:
    return sharding
  raise ValueError(f"patch_updated_rows: rows with sharding {sharding} (a NamedSharding or one device expected)")


@jax.jit
def _patch(rows, stale, fresh, index):
  per_head = rows.reshape(stale.shape + (fresh.shape[-1],))
  out = jnp.where(stale[..., None], fresh.at[index].get(mode="promise_in_bounds"), per_head)
  return out.reshape(rows.shape)


def engram_row_ids(batch: Mapping[str, Any]) -> Mapping[int, np.ndarray]:
  """Default: the data pipeline's per-head rows, batch["engram_ids"] {layer: [B, T, H]}."""
  return batch["engram_ids"]


class RowPrefetcher:
  """Iterator of (batch, {layer_id: device rows}) with the gathers running one batch ahead.

  Args:
    batches: the input iterator (e.g. the grain train iterator).
    sources: {layer_id: HostTable | HotRowCache | callable(flat ids) -> device rows}.
    offsets: {layer_id: np.int64 [H]} head offsets added (in int64) to the per-head rows;
      None = the ids are already flat.
    row_ids: batch -> {layer_id: ids [..., H]}; default `engram_row_ids`.
    depth: batches gathered ahead of the one the consumer holds; >= 1 (1: double
      buffering).
    merge_heads: return rows [..., H * d] (what `Engram(engram_rows=...)` takes) instead of
      [..., H, d].
  """

  def __init__(
    self,
    batches: Iterable,
    sources: Mapping[int, Any],
    *,
    offsets: Mapping[int, np.ndarray] | None = None,
    row_ids: Callable[[Any], Mapping[int, np.ndarray]] = engram_row_ids,
    depth: int = 1,
    merge_heads: bool = True,
  ):
    if depth < 1:
      raise ValueError(f"RowPrefetcher depth must be >= 1, got {depth}")
    if offsets is not None and set(offsets) != set(sources):
      raise ValueError(f"offsets for layers {sorted(offsets)} but sources for {sorted(sources)}")
    self._gathers = {l: _gather_fn(s) for l, s in sources.items()}
    self._offsets = offsets
    self._row_ids = row_ids
    self._merge_heads = merge_heads
    self._queue: queue.Queue = queue.Queue()
    self._slots = threading.Semaphore(depth)  # batches gathered and not yet taken
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._produce, args=(iter(batches),), name="RowPrefetcher", daemon=True)
    self._thread.start()

  def gather(self, batch) -> dict[int, jax.Array]:
    """The rows of one batch, synchronously (what the thread does for every batch)."""
    ids_by_layer = self._row_ids(batch)
    out = {}
    for layer, gather in self._gathers.items():
      if layer not in ids_by_layer:
        raise KeyError(f"batch has no row ids for host-placed Engram layer {layer}")
      ids = np.asarray(ids_by_layer[layer])
      flat = flat_rows_np(ids, self._offsets[layer]) if self._offsets is not None else ids
      rows = gather(flat)
      if self._merge_heads:
        rows = rows.reshape(rows.shape[:-2] + (-1,))
      out[layer] = rows
    return out

  def _acquire_slot(self) -> bool:
    while not self._stop.is_set():
      if self._slots.acquire(timeout=0.05):
        return True
    return False

  def _produce(self, it: Iterator) -> None:
    try:
      while self._acquire_slot():
        try:
          batch = next(it)
        except StopIteration:
          self._queue.put(_END)
          return
        rows = self.gather(batch)
        jax.block_until_ready(rows)  # the copy happens here, overlapped with the consumer
        self._queue.put((batch, rows))
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
      self._queue.put(_Failure(e))

  def __iter__(self) -> Self:
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    self._slots.release()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    return item

  def close(self, timeout: float = 10.0) -> None:
    """Stops the thread (it finishes its current gather first) and drops queued batches."""
    self._stop.set()
    self._done = True
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)
    if self._thread.is_alive():
      raise RuntimeError(f"RowPrefetcher thread did not stop within {timeout}s")

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()
