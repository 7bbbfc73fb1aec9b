"""Shape bookkeeping shared by the kernel wrappers (gather_tpu, gather_gpu, gather_gate_gpu)."""

from __future__ import annotations

import jax.numpy as jnp

#: TMA copies want 128-byte aligned shared-memory addresses: GPU rows whose size is not a
#: multiple of this get a padded stride in shared memory.
SMEM_ALIGN_BYTES = 128


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def gate_options(gate: str = "reference", norm_eps: float = 1e-6, out_dtype=None) -> tuple:
  """The options of the gather_gate kernels, with the defaults of reference.gate_from_rows.

  -> (gate, norm_eps, out_dtype); an unknown option is a TypeError that names it.
  """
  return gate, norm_eps, out_dtype


def out_dtype_or_default(out_dtype, table, w_value) -> jnp.dtype:
  """`out_dtype`, or gather_gate's default result_type(table, w_value)."""
  return jnp.dtype(jnp.result_type(table.dtype, w_value.dtype) if out_dtype is None else out_dtype)


def pad_tokens(block_rows: int, row_ids, *token_arrays):
  """Pads the token axis (0) of row_ids (cast to int32) and of token_arrays to a multiple of block_rows.

  -> (n_pad, ids, *padded). Padding tokens read row 0 (always valid) with zero inputs; the
  callers slice their outputs back to N. Inputs whose N is a multiple already are not copied.
  """
  n = row_ids.shape[0]
  n_pad = round_up(n, block_rows)
  pad = lambda x: x if n_pad == n else jnp.pad(x, [(0, n_pad - n)] + [(0, 0)] * (x.ndim - 1))
  return (n_pad, pad(row_ids.astype(jnp.int32)), *map(pad, token_arrays))


def smem_row_elems(d: int, dtype) -> int:
  """Row stride (elements) of a GPU shared-memory staging buffer: d rounded up to SMEM_ALIGN_BYTES."""
  return round_up(d, SMEM_ALIGN_BYTES // jnp.dtype(dtype).itemsize)
