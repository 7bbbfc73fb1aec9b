"""Where Engram rows live and how they are updated: row stores (device / host / cached,
`row_store`), the one id -> flat row mapping (`RowIndex`), placements, host gathers,
prefetching, sparse Adam, hot-row cache, and the disk tier (`DiskTable`: memory-mapped table
and optimizer state, DRAM cache of warm rows).

Layering: kernel level (JAX + NumPy, no flax, no model); it imports nothing above itself.
The model-level parts live above it: `engram_jax.models.offloaded` (split a model's tables
off, forward with host rows), `engram_jax.models.host_init` (`build_offloaded`) and
`engram_jax.train.host_trainer` (`HostTableTrainer`).
"""

from engram_jax.offload.disk_table import DiskTable, WarmRowCache
from engram_jax.offload.hit_rate import (
  analytic_zipf_hit_rate,
  hit_rate_from_counts,
  measure_hit_rate,
)
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.hot_cache import (
  HotRowCache,
  count_row_frequencies,
  load_frequencies,
  save_frequencies,
  top_rows,
)
from engram_jax.offload.indexing import (
  RowIndex,
  RowSharding,
  check_int32_rows,
  flat_rows_np,
  head_offsets,
  join_hi_lo,
  split_hi_lo,
)
from engram_jax.offload.placement import (
  PLACEMENTS,
  TablePlacement,
  format_placements,
  host_memory_kind,
  layer_placements,
  parse_placements,
  to_device,
  to_host,
)
from engram_jax.offload.prefetch import (
  RowPrefetcher,
  engram_row_ids,
  patch_updated_rows,
)
from engram_jax.offload.row_store import CachedRowStore, DeviceRowStore, HostRowStore, RowStore, as_stores, row_stores
from engram_jax.offload.sparse_adam import CatchupState, SparseRowAdam, SparseRowState, apply_row_adam, sparse_grad

__all__ = [
  "CatchupState",
  "PLACEMENTS",
  "CachedRowStore",
  "DeviceRowStore",
  "DiskTable",
  "HostRowStore",
  "RowIndex",
  "RowStore",
  "as_stores",
  "row_stores",
  "HostTable",
  "HotRowCache",
  "RowPrefetcher",
  "RowSharding",
  "SparseRowAdam",
  "SparseRowState",
  "TablePlacement",
  "WarmRowCache",
  "analytic_zipf_hit_rate",
  "apply_row_adam",
  "check_int32_rows",
  "count_row_frequencies",
  "engram_row_ids",
  "flat_rows_np",
  "head_offsets",
  "hit_rate_from_counts",
  "host_memory_kind",
  "join_hi_lo",
  "load_frequencies",
  "measure_hit_rate",
  "format_placements",
  "layer_placements",
  "parse_placements",
  "patch_updated_rows",
  "save_frequencies",
  "sparse_grad",
  "split_hi_lo",
  "to_device",
  "to_host",
  "top_rows",
]
