"""Pallas kernels for the Engram lookup (jax only; no flax, no engram_jax); see README.md.

Public API: gather_rows and gather_gate (ops.py), gather_rows_sparse_grad (sparse_grad.py) and
reference (the pure-jnp versions, the "xla" impl)."""

from pallas_kernels import reference
from pallas_kernels.ops import IMPLS, check_row_ids, gather_gate, gather_rows, resolve_impl
from pallas_kernels.sparse_grad import SparseRowGrad, gather_rows_sparse_grad

__all__ = [
  "IMPLS",
  "SparseRowGrad",
  "check_row_ids",
  "gather_gate",
  "gather_rows",
  "gather_rows_sparse_grad",
  "reference",
  "resolve_impl",
]
