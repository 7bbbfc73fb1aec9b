"""Host-resident Engram tables: placement, host gathers, prefetching, sparse Adam, hot-row cache.

Layering: kernel level (JAX + NumPy, no flax, no model). The model consumes the rows these
produce through `Engram(..., rows=...)`.
"""

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
    host_memory_kind,
    parse_placements,
    to_device,
    to_host,
)
from engram_jax.offload.prefetch import (
    RowPrefetcher,
    engram_row_ids,
    patch_updated_rows,
)
from engram_jax.offload.sparse_adam import SparseRowAdam, SparseRowState, sparse_grad

# Model-level integration (engram_jax.offload.model / .train_step import the model and the
# training code): resolved on first access, so importing this package stays kernel-level
# and engram_jax.train may import it without an import cycle.
_LAZY = {
    "OffloadedEngram": "engram_jax.offload.model",
    "apply_offloaded": "engram_jax.offload.model",
    "build_offloaded": "engram_jax.offload.host_init",
    "forward_with_host_tables": "engram_jax.offload.model",
    "split_tables": "engram_jax.offload.model",
    "HostTableOptimizer": "engram_jax.offload.train_step",
    "HostTableTrainer": "engram_jax.offload.train_step",
    "host_table_filter": "engram_jax.offload.train_step",
    "make_host_table_train_step": "engram_jax.offload.train_step",
    "split_params": "engram_jax.offload.train_step",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'engram_jax.offload' has no attribute {name!r}")


__all__ = [
    "PLACEMENTS",
    "HostTable",
    "HostTableOptimizer",
    "HostTableTrainer",
    "HotRowCache",
    "OffloadedEngram",
    "RowPrefetcher",
    "RowSharding",
    "SparseRowAdam",
    "SparseRowState",
    "TablePlacement",
    "analytic_zipf_hit_rate",
    "apply_offloaded",
    "build_offloaded",
    "check_int32_rows",
    "count_row_frequencies",
    "engram_row_ids",
    "flat_rows_np",
    "forward_with_host_tables",
    "head_offsets",
    "hit_rate_from_counts",
    "host_memory_kind",
    "host_table_filter",
    "join_hi_lo",
    "load_frequencies",
    "make_host_table_train_step",
    "measure_hit_rate",
    "parse_placements",
    "patch_updated_rows",
    "save_frequencies",
    "sparse_grad",
    "split_hi_lo",
    "split_params",
    "split_tables",
    "to_device",
    "to_host",
    "top_rows",
]
