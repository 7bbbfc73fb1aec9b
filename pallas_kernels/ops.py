"""Public ops: dispatch between the XLA reference and the Pallas kernels, with
custom VJPs whose table gradient is a scatter-add of row gradients.

impl: "xla" (reference.py), "pallas" (Mosaic GPU kernel on GPU, Mosaic TPU
kernel on TPU, the TPU kernel in interpret mode on CPU), "auto" (pallas on GPU
and TPU, xla on CPU).

backend: which kernel "pallas" runs: None (from jax.default_backend()), "tpu"
or "gpu". interpret: None (True on CPU: pltpu.InterpretParams() for the TPU
kernel, plgpu.InterpretGPUParams() for the GPU kernel), or an explicit value
passed to pallas_call.

Backward (all impls): the rows are gathered again (by the same impl), the
projections and gate are differentiated with the XLA reference, and the table
gradient is a float32 scatter-add (duplicate ids accumulate) cast to the table
dtype. `gather_rows_sparse_grad` gives the same table gradient in sparse form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference
from pallas_kernels.sparse_grad import SparseRowGrad, sparse_row_grad

#: The `impl=` values of every op: "xla" (the pure-jnp reference), "pallas" (the kernels) and
#: "auto" (Pallas on GPU and TPU, XLA elsewhere).
IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str) -> str:
  """The implementation `impl` selects here: "xla" or "pallas" ("auto" by backend); ValueError otherwise."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
  return impl


def _resolve_backend(backend):
  if backend is None:
    backend = "gpu" if jax.default_backend() == "gpu" else "tpu"
  if backend not in ("gpu", "tpu"):
    raise ValueError(f"backend must be 'gpu', 'tpu' or None, got {backend!r}")
  return backend


def _resolve_interpret(interpret, backend):
  if interpret is not None or jax.default_backend() != "cpu":
    return interpret
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()
  from jax.experimental.pallas import mosaic_gpu as plgpu

  return plgpu.InterpretGPUParams()


def check_row_ids(row_ids, num_rows: int, heads: int | None = None) -> None:
  """Validates row_ids [N, H] (dtype, rank, heads); the range [0, num_rows) too when concrete (not traced).

  Under jit the range is not checked: see README.md for what each impl does.
  """
  if row_ids.ndim != 2:
    raise ValueError(f"row_ids must be [N, H], got shape {row_ids.shape}")
  if heads is not None and row_ids.shape[1] != heads:
    raise ValueError(f"row_ids has {row_ids.shape[1]} heads, expected {heads}")
  if not jnp.issubdtype(row_ids.dtype, jnp.integer):
    raise ValueError(f"row_ids must be integer, got {row_ids.dtype}")
  if isinstance(row_ids, jax.core.Tracer):
    return
  ids = np.asarray(row_ids)
  if ids.size and (ids.min() < 0 or ids.max() >= num_rows):
    bad = ids[(ids < 0) | (ids >= num_rows)]
    raise ValueError(f"row_ids out of range [0, {num_rows}): {bad.size} bad ids, e.g. {bad[:5].tolist()}")


def _gather_fwd_fn(impl, backend, block_rows, interpret):
  if impl == "xla":
    return reference.gather_rows
  if backend == "gpu":
    from pallas_kernels import gather_gpu

    return functools.partial(gather_gpu.gather_rows_gpu, block_rows=block_rows, interpret=interpret)
  from pallas_kernels import gather_tpu

  return functools.partial(gather_tpu.gather_rows_tpu, block_rows=block_rows, interpret=interpret)


@functools.lru_cache(maxsize=None)
def _gather_rows_op(impl, backend, block_rows, interpret):
  fwd_fn = _gather_fwd_fn(impl, backend, block_rows, interpret)

  @jax.custom_vjp
  def op(table, row_ids):
    return fwd_fn(table, row_ids)

  def fwd(table, row_ids):
    return fwd_fn(table, row_ids), (table, row_ids)

  def bwd(res, g):
    table, row_ids = res
    d_table = reference.scatter_add_rows(g, row_ids, table.shape[0], table.dtype)
    return d_table, np.zeros(row_ids.shape, jax.dtypes.float0)

  op.defvjp(fwd, bwd)
  return op


def gather_rows(
  table: jax.Array,
  row_ids: jax.Array,
  *,
  impl: str = "auto",
  block_rows: int | None = None,
  backend: str | None = None,
  interpret=None,
) -> jax.Array:
  """table [R, d], row_ids [N, H] int (offsets included) -> [N, H*d] table.dtype.

  block_rows: tokens per kernel block (None: the backend's default; see
  gather_tpu / gather_gpu). Ignored by impl="xla".
  """
  if table.ndim != 2:
    raise ValueError(f"table must be [R, d], got shape {table.shape}")
  check_row_ids(row_ids, table.shape[0])
  impl = resolve_impl(impl)
  backend = _resolve_backend(backend) if impl == "pallas" else None
  interpret = _resolve_interpret(interpret, backend) if impl == "pallas" else None
  op = _gather_rows_op(impl, backend, block_rows, interpret)
  return op(table, row_ids.astype(jnp.int32))


def gather_rows_sparse_grad(
  row_ids: jax.Array, d_rows: jax.Array, num_rows: int, *, max_unique: int | None = None
) -> SparseRowGrad:
  """Sparse table gradient of gather_rows for cotangent d_rows [N, H*d].

  -> SparseRowGrad(row_ids [M] unique ascending, padded with num_rows;
  grads [M, d] f32 summed per row; count). M = max_unique (default N*H).
  """
  return sparse_row_grad(row_ids, d_rows, num_rows, max_unique)


@functools.lru_cache(maxsize=None)
def _gather_gate_op(impl, backend, gate, norm_eps, out_dtype, block_rows, block_d, interpret):
  gate_fn = functools.partial(reference.gate_from_rows, gate=gate, norm_eps=norm_eps, out_dtype=out_dtype)
  gather_fn = _gather_fwd_fn(impl, backend, block_rows, interpret)
  if impl == "xla":
    fused_fn = lambda table, ids, *w: gate_fn(gather_fn(table, ids), *w)
  elif backend == "gpu":
    from pallas_kernels import gather_gpu

    fused_fn = functools.partial(
      gather_gpu.gather_gate_gpu,
      gate=gate,
      norm_eps=norm_eps,
      out_dtype=out_dtype,
      block_rows=block_rows,
      block_d=block_d,
      interpret=interpret,
    )
  else:
    from pallas_kernels import gather_tpu

    fused_fn = functools.partial(
      gather_tpu.gather_gate_tpu,
      gate=gate,
      norm_eps=norm_eps,
      out_dtype=out_dtype,
      block_rows=block_rows,
      block_d=block_d,
      interpret=interpret,
    )

  @jax.custom_vjp
  def op(table, row_ids, *weights):
    return fused_fn(table, row_ids, *weights)

  def fwd(table, row_ids, *weights):
    return fused_fn(table, row_ids, *weights), (table, row_ids, weights)

  def bwd(res, cot):
    table, row_ids, weights = res
    rows = gather_fn(table, row_ids)
    _, vjp = jax.vjp(gate_fn, rows, *weights)
    d_rows, *d_weights = vjp(cot)
    d_table = reference.scatter_add_rows(d_rows, row_ids, table.shape[0], table.dtype)
    return (d_table, np.zeros(row_ids.shape, jax.dtypes.float0), *d_weights)

  op.defvjp(fwd, bwd)
  return op


def gather_gate(
  table,
  row_ids,
  w_value,
  b_value,
  w_key,
  b_key,
  query_normed,
  key_norm_scale,
  *,
  gate: str = "reference",
  norm_eps: float = 1e-6,
  out_dtype=None,
  impl: str = "auto",
  block_rows: int | None = None,
  block_d: int | None = None,
  backend: str | None = None,
  interpret=None,
) -> tuple[jax.Array, jax.Array]:
  """Fused gather, value/key projections and gate.

  table [R, d], row_ids [N, H], w_value [H*d, D], b_value [D], w_key [G, H*d, D],
  b_key [G, D], query_normed [N, G, D], key_norm_scale [G, D]
  -> (u [N, G, D] in out_dtype (default result_type(table, w_value)),
      gates [N, G] float32).
  """
  if gate not in reference.GATES:
    raise ValueError(f"gate must be one of {reference.GATES}, got {gate!r}")
  if table.ndim != 2:
    raise ValueError(f"table must be [R, d], got shape {table.shape}")
  check_row_ids(row_ids, table.shape[0])
  n, heads = row_ids.shape
  c = heads * table.shape[1]
  if w_key.ndim != 3:
    raise ValueError(f"w_key must be [G, H*d, D], got shape {w_key.shape}")
  g, _, dim = w_key.shape
  expected = {
    "w_value": (c, dim),
    "b_value": (dim,),
    "w_key": (g, c, dim),
    "b_key": (g, dim),
    "query_normed": (n, g, dim),
    "key_norm_scale": (g, dim),
  }
  got = {
    "w_value": w_value.shape,
    "b_value": b_value.shape,
    "w_key": w_key.shape,
    "b_key": b_key.shape,
    "query_normed": query_normed.shape,
    "key_norm_scale": key_norm_scale.shape,
  }
  for name, shape in expected.items():
    if tuple(got[name]) != shape:
      raise ValueError(f"{name} has shape {tuple(got[name])}, expected {shape}")
  impl = resolve_impl(impl)
  backend = _resolve_backend(backend) if impl == "pallas" else None
  interpret = _resolve_interpret(interpret, backend) if impl == "pallas" else None
  out_dtype = jnp.dtype(out_dtype or jnp.result_type(table.dtype, w_value.dtype))
  op = _gather_gate_op(impl, backend, gate, float(norm_eps), out_dtype, block_rows, block_d, interpret)
  return op(table, row_ids.astype(jnp.int32), w_value, b_value, w_key, b_key, query_normed, key_norm_scale)
