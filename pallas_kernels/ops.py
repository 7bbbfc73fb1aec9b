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
dtype. `sparse_grad.gather_rows_sparse_grad` gives the same table gradient in sparse form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import common, reference

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


def check_row_ids(row_ids, num_rows: int) -> None:
  """Validates row_ids [N, H] (dtype, rank); the range [0, num_rows) too when concrete (not traced).

  Under jit the range is not checked: see README.md for what each impl does.
  """
  if row_ids.ndim != 2:
    raise ValueError(f"row_ids must be [N, H], got shape {row_ids.shape}")
  if not jnp.issubdtype(row_ids.dtype, jnp.integer):
    raise ValueError(f"row_ids must be integer, got {row_ids.dtype}")
  if isinstance(row_ids, jax.core.Tracer):
    return
  ids = np.asarray(row_ids)
  if ids.size and (ids.min() < 0 or ids.max() >= num_rows):
    bad = ids[(ids < 0) | (ids >= num_rows)]
    raise ValueError(f"row_ids out of range [0, {num_rows}): {bad.size} bad ids, e.g. {bad[:5].tolist()}")


def _resolve(table, row_ids, impl, backend, interpret):
  """Checks table [R, d] and row_ids; -> (impl, backend, interpret) resolved as the module docstring says."""
  if table.ndim != 2:
    raise ValueError(f"table must be [R, d], got shape {table.shape}")
  check_row_ids(row_ids, table.shape[0])
  impl = resolve_impl(impl)
  if impl == "xla":
    return impl, None, None
  if backend is None:
    backend = "gpu" if jax.default_backend() == "gpu" else "tpu"
  if backend not in ("gpu", "tpu"):
    raise ValueError(f"backend must be 'gpu', 'tpu' or None, got {backend!r}")
  if interpret is None and jax.default_backend() == "cpu":
    if backend == "tpu":
      from jax.experimental.pallas import tpu as pltpu

      interpret = pltpu.InterpretParams()
    else:
      from jax.experimental.pallas import mosaic_gpu as plgpu

      interpret = plgpu.InterpretGPUParams()
  return impl, backend, interpret


def _kernels(backend):
  """(gather_rows, gather_gate) kernels of `backend`."""
  if backend == "gpu":
    from pallas_kernels import gather_gpu

    return gather_gpu.gather_rows_gpu, gather_gpu.gather_gate_gpu
  from pallas_kernels import gather_tpu

  return gather_tpu.gather_rows_tpu, gather_tpu.gather_gate_tpu


def _gather_fwd_fn(impl, backend, block_rows, interpret):
  if impl == "xla":
    return reference.gather_rows
  return functools.partial(_kernels(backend)[0], block_rows=block_rows, interpret=interpret)


def _lookup_op(forward, gather_fn=None, gate_fn=None):
  """custom_vjp op(table, row_ids, *weights) = forward(...) with the backward of the module docstring
  (gather_fn gathers the rows again for the vjp of gate_fn(rows, *weights); no gate_fn: op is a gather)."""

  @jax.custom_vjp
  def op(table, row_ids, *weights):
    return forward(table, row_ids, *weights)

  def fwd(table, row_ids, *weights):
    return forward(table, row_ids, *weights), (table, row_ids, weights)

  def bwd(res, cot):
    table, row_ids, weights = res
    d_rows, d_weights = cot, ()
    if gate_fn is not None:
      _, vjp = jax.vjp(gate_fn, gather_fn(table, row_ids), *weights)
      d_rows, *d_weights = vjp(cot)
    d_table = reference.scatter_add_rows(d_rows, row_ids, table.shape[0], table.dtype)
    return (d_table, np.zeros(row_ids.shape, jax.dtypes.float0), *d_weights)

  op.defvjp(fwd, bwd)
  return op


@functools.lru_cache(maxsize=None)
def _gather_rows_op(impl, backend, block_rows, interpret):
  return _lookup_op(_gather_fwd_fn(impl, backend, block_rows, interpret))


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
  impl, backend, interpret = _resolve(table, row_ids, impl, backend, interpret)
  op = _gather_rows_op(impl, backend, block_rows, interpret)
  return op(table, row_ids.astype(jnp.int32))


@functools.lru_cache(maxsize=None)
def _gather_gate_op(impl, backend, gate, norm_eps, out_dtype, block_rows, block_d, interpret):
  options = dict(gate=gate, norm_eps=norm_eps, out_dtype=out_dtype)
  gate_fn = functools.partial(reference.gate_from_rows, **options)
  gather_fn = _gather_fwd_fn(impl, backend, block_rows, interpret)
  if impl == "xla":
    fused_fn = functools.partial(reference.gather_gate, **options)
  else:
    tiles = dict(block_rows=block_rows, block_d=block_d, interpret=interpret)
    fused_fn = functools.partial(_kernels(backend)[1], **tiles, **options)
  return _lookup_op(fused_fn, gather_fn, gate_fn)


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
  """Fused gather, value/key projections and gate (shapes and formula: reference.py, README.md).

  -> (u [N, G, D] in out_dtype (default result_type(table, w_value)), gates [N, G] float32).
  """
  if gate not in reference.GATES:
    raise ValueError(f"gate must be one of {reference.GATES}, got {gate!r}")
  impl, backend, interpret = _resolve(table, row_ids, impl, backend, interpret)
  if w_key.ndim != 3:
    raise ValueError(f"w_key must be [G, H*d, D], got shape {w_key.shape}")
  n, heads = row_ids.shape
  c = heads * table.shape[1]
  g, _, dim = w_key.shape
  weights = (w_value, b_value, w_key, b_key, query_normed, key_norm_scale)
  expected = ((c, dim), (dim,), (g, c, dim), (g, dim), (n, g, dim), (g, dim))
  for name, array, shape in zip(reference.GATE_WEIGHTS, weights, expected):
    if tuple(array.shape) != shape:
      raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {shape}")
  out_dtype = common.out_dtype_or_default(out_dtype, table, w_value)
  op = _gather_gate_op(impl, backend, gate, float(norm_eps), out_dtype, block_rows, block_d, interpret)
  return op(table, row_ids.astype(jnp.int32), *weights)
