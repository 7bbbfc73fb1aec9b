"""Row stores: where one Engram layer's rows live, how a step gathers them, how their
gradients are applied, and what a checkpoint keeps of them.

  placement  store            rows gathered                      row gradients applied
  device     DeviceRowStore   by the layer inside the jitted     in the step: dense Adam on the table
                              step (a mesh that splits the       (optax, the reference) or row-sparse
                              table by rows: the all_to_all      Adam (TrainConfig.table_optimizer);
                              route, `distributed.sharded_gather`) checkpointed inside the TrainState
  host       HostRowStore     on the host (NumPy) from the       on the host: `SparseRowAdam` in place
                              table, copied to the device        (m, v, per-row count beside the table)
  cached     CachedRowStore   hot rows from a device cache       as host, then the cached copies of the
                              (`HotRowCache`), misses as host    updated rows are refreshed

Every store maps hashed per-head ids to flat rows with its layer's `RowIndex` (the one
function for fold, offsets, padding). A host store holds any table with `HostTable`'s
interface (`gather`, `host_rows`, `numpy`, `apply_update`, `num_rows`, `dim`, `dtype`,
`method`, `array`), so another backing (e.g. a memory-mapped file) plugs in unchanged.
`row_stores` is the one place that turns `{layer: TablePlacement}` (from
`placement.parse_placements`, the one parser of placement flags) into `{layer: store}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from engram_jax.offload.disk_table import DiskTable
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.hot_cache import HotRowCache, load_frequencies
from engram_jax.offload.indexing import RowIndex
from engram_jax.offload.placement import TablePlacement
from engram_jax.offload.sparse_adam import SparseRowAdam, SparseRowState

# rows' shape [..., H, d_h] -> where the gathered rows go (e.g. split over the batch on a
# data-parallel mesh); None: the table's device
RowPlacement = Callable[[tuple[int, ...]], jax.sharding.Sharding]


class DeviceRowStore:
  """A layer whose table is a device array inside the model (the layer gathers its rows;
  the train step updates the table with the model's optimizer)."""

  on_host = False

  def __init__(self, layer: int, index: RowIndex, placement: TablePlacement | None = None):
    self.layer, self.index = int(layer), index
    self.placement = placement or TablePlacement()


class HostRowStore:
  """A layer's table [R, d_h] in host memory, gathered on the host, updated by row-sparse Adam.

  Attributes:
    table: the `HostTable` (or an object with its interface), the master copy.
    index: the layer's `RowIndex`.
    adam, opt_state: the `SparseRowAdam` and its `SparseRowState` (None until
      `init_optimizer`: inference stores hold no optimizer state).
  """

  on_host = True

  def __init__(self, layer: int, table: HostTable, index: RowIndex, placement: TablePlacement | None = None):
    if table.num_rows != index.num_rows:
      raise ValueError(
        f"host table of Engram layer {layer} has {table.num_rows} rows, its row index {index.num_rows} "
        "(ModelConfig.engram_row_multiple / engram_fold_rows differ from the table's)"
      )
    self.layer, self.table, self.index = int(layer), table, index
    self.placement = placement or TablePlacement("host")
    self.adam: SparseRowAdam | None = None
    self.opt_state: SparseRowState | None = None

  def flat_ids(self, engram_ids) -> np.ndarray:
    """Hashed per-head ids [..., H] -> flat rows np.int64 [..., H] (checked, `RowIndex.flat_np`)."""
    return self.index.flat_np(engram_ids, f"Engram layer {self.layer}")

  def gather(self, flat_ids, sharding: RowPlacement | None = None) -> jax.Array:
    """Flat row ids [..., H] -> device rows [..., H, d_h], placed by `sharding` (or on the
    table's device)."""
    if sharding is None:
      return self.table.gather(flat_ids)
    target = sharding(tuple(np.shape(flat_ids)) + (self.table.dim,))
    if self.table.method == "numpy":
      return jax.device_put(self.table.host_rows(flat_ids), target)  # each device takes its part
    return jax.device_put(self.table.gather(flat_ids), target)  # the compute_on gather, then moved

  def init_optimizer(self, adam: SparseRowAdam) -> None:
    """Creates the row-sparse Adam state (m, v, per-row counts) beside the table; needs a NumPy-gathered table."""
    if self.table.method != "numpy":
      # a jax.Array table is replaced (donated) by every update while the prefetch thread
      # may read it; the NumPy master is updated in place (see prefetch.py)
      raise ValueError(
        f"training needs host_gather='numpy' tables; Engram layer {self.layer} uses {self.table.method!r}"
      )
    # beside the table: NumPy in host RAM, or memmaps on disk for a DiskTable
    self.adam, self.opt_state = adam, self.table.init_state(adam)

  def apply(self, unique, summed, count, lr: float) -> np.ndarray:
    """One row-sparse Adam step with `sparse_grad`'s outputs (host arrays); returns the
    updated flat row ids."""
    count = int(count)
    if count > unique.shape[0]:
      raise ValueError(
        f"Engram layer {self.layer}: {count} distinct rows overflow sparse_size={unique.shape[0]}; raise sparse_size"
      )
    self.opt_state = self.table.apply_update(self.adam, self.opt_state, unique, summed, count, lr=lr)
    return np.asarray(unique[:count])

  def state_dict(self) -> dict[str, np.ndarray]:
    """{"table", "m", "v", "count"} NumPy views, what a checkpoint keeps of the layer."""
    m, v, c = self.opt_state
    return {"table": self.table.numpy(), "m": m, "v": v, "count": c}

  def load_state_dict(self, saved: Mapping[str, np.ndarray]) -> None:
    """Restores what `state_dict` returned (e.g. from a checkpoint)."""
    if tuple(saved["table"].shape) != self.table.shape:
      raise ValueError(f"Engram layer {self.layer}: saved table {saved['table'].shape} != {self.table.shape}")
    self.opt_state = self.table.load_state(saved)  # own copies (a DiskTable: into its files)


class CachedRowStore(HostRowStore):
  """A host store with its most frequent rows on the device (`HotRowCache`); equal rows."""

  def __init__(self, layer: int, cache: HotRowCache, index: RowIndex, placement: TablePlacement):
    super().__init__(layer, cache.table, index, placement)
    self.cache = cache

  def gather(self, flat_ids, sharding: RowPlacement | None = None) -> jax.Array:
    """Rows of flat ids [..., H]: hot rows from the device cache, misses from the host table; placed by `sharding` when given."""
    rows = self.cache.lookup(flat_ids)  # the combine runs on the table's device; then moved
    return rows if sharding is None else jax.device_put(rows, sharding(tuple(rows.shape)))

  def apply(self, unique, summed, count, lr: float) -> np.ndarray:
    """One row-sparse Adam step on the host table (as `HostRowStore.apply`), then refreshes the cached copies of the updated rows."""
    updated = super().apply(unique, summed, count, lr)
    self.cache.refresh(updated)
    return updated

  def load_state_dict(self, saved: Mapping[str, np.ndarray]) -> None:
    """Restores the host table and its Adam state, then reloads the device cache from it."""
    super().load_state_dict(saved)
    self.cache.refresh()


#: Any layer's row store (a `CachedRowStore` is a `HostRowStore`).
RowStore = DeviceRowStore | HostRowStore


def row_stores(
  placements: Mapping[int, TablePlacement],
  indexes: Mapping[int, RowIndex],
  host_table: Callable[[int, TablePlacement], Any],
  frequencies: Mapping[int, np.ndarray] | None = None,
) -> dict[int, RowStore]:
  """{layer: store} for every Engram layer of `placements` (from `parse_placements`): a
  `DeviceRowStore` for device layers, else a host store over `host_table(layer, placement)`
  (called once per host layer); "cached" caches the top rows by `frequencies[layer]` or
  the placement's frequency_file."""
  out: dict[int, RowStore] = {}
  for l, p in sorted(placements.items()):
    if not p.on_host:
      out[l] = DeviceRowStore(l, indexes[l], p)
      continue
    table = host_table(l, p)
    if p.kind != "cached":
      out[l] = HostRowStore(l, table, indexes[l], p)
      continue
    if frequencies and l in frequencies:
      counts = np.asarray(frequencies[l], np.int64)
    elif p.frequency_file:
      counts = load_frequencies(p.frequency_file, table.num_rows)
    else:
      raise ValueError(
        f"Engram layer {l} is placed 'cached' but has no row frequencies: "
        "pass frequencies={layer: counts} or set the placement's frequency_file"
      )
    cache = HotRowCache.from_frequencies(table, counts, fraction=p.cache_fraction)
    if isinstance(table, DiskTable):  # device-hot rows stay out of the DRAM tier
      table.exclude_from_cache(cache.hot_rows)
    out[l] = CachedRowStore(l, cache, indexes[l], p)
  return out


def as_stores(tables: Mapping[int, Any], indexes: Mapping[int, RowIndex]) -> dict[int, RowStore]:
  """{layer: store} over already-built tables ({layer: HostTable (or its interface) |
  HotRowCache}); the Engram layers of `indexes` not in `tables` get device stores."""
  out: dict[int, RowStore] = {}
  for l, index in sorted(indexes.items()):
    t = tables.get(l)
    if isinstance(t, HotRowCache):
      fraction = min(t.capacity / t.table.num_rows, 0.999)  # what TablePlacement accepts
      out[l] = CachedRowStore(l, t, index, TablePlacement("cached", cache_fraction=fraction))
    else:
      out[l] = DeviceRowStore(l, index) if t is None else HostRowStore(l, t, index)
  return out
