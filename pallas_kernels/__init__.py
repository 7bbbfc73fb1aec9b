"""Pallas kernels for the Engram lookup (jax only; no flax, no engram_jax).

Public API:
  gather_rows(table, row_ids, *, impl, block_rows, backend, interpret) -> [N, H*d]
  gather_gate(table, row_ids, w_value, b_value, w_key, b_key, query_normed,
              key_norm_scale, *, gate, norm_eps, impl, ...) -> (u, gates)
  gather_rows_sparse_grad(row_ids, d_rows, num_rows, *, max_unique) -> SparseRowGrad
  reference: the pure-jnp versions ("xla" impl).
"""

from pallas_kernels import reference
from pallas_kernels.ops import IMPLS, check_row_ids, gather_gate, gather_rows, gather_rows_sparse_grad, resolve_impl
from pallas_kernels.sparse_grad import SparseRowGrad, sparse_row_grad

__all__ = [
  "IMPLS",
  "SparseRowGrad",
  "check_row_ids",
  "gather_gate",
  "gather_rows",
  "gather_rows_sparse_grad",
  "reference",
  "resolve_impl",
  "sparse_row_grad",
]
