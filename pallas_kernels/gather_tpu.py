"""TPU Pallas kernels: row gather and fused gather-gate (paged-attention pattern).

Row ids are scalar-prefetched into SMEM (the wrapper cuts long inputs into
chunks of `ids_per_call` tokens so the ids fit SMEM). The table stays in HBM
(memory_space=ANY); each grid step owns `block_rows` tokens and issues one
async DMA per (token, head) row into a VMEM buffer. The buffer is
double-buffered: step i starts the DMAs of block i+1 before waiting on block i,
so the grid is sequential ("arbitrary").

Shapes:
  table [R, d] (HBM), row_ids [N, H] int32 -> SMEM as [N*H]
  gather_rows_tpu -> [N, H*d]
  gather_gate_tpu -> u [N, G, D] (out_dtype), gates [N, G] f32

VMEM buffer layout is [2, H, block_rows, d]: each head's rows form one
(block_rows, d) tile, so every DMA lands on a sublane of a lane-dense tile and
the projection is a sum over heads of (block_rows, d) @ (d, block_d) matmuls.
block_rows must be a multiple of 8 and block_d a multiple of 128 (or equal to
D) to satisfy the (8, 128) tiling rules.

Out-of-range ids: the wrapper in ops.py rejects concrete ones. Under jit they
are not checked: on TPU the DMA reads outside the table (a runtime bounds error
or garbage); in interpret mode the interpreter raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common, reference


def _prefetch_and_wait(ids_ref, table_hbm, buf, sem, i, nblocks, *, block_rows, heads):
  """Double buffering: start block i+1, then wait for block i. -> slot of i."""
  slot = i % 2

  def for_each_row(copy):  # copy(token, head) for every row of a block
    def body(t, carry):
      for h in range(heads):
        copy(t, h)
      return carry

    lax.fori_loop(0, block_rows, body, 0)

  def row_copy(slot, row, t, h):
    return pltpu.make_async_copy(table_hbm.at[pl.ds(row, 1)], buf.at[slot, h, pl.ds(t, 1)], sem.at[slot])

  def start(block, slot):
    base = block * block_rows * heads
    for_each_row(lambda t, h: row_copy(slot, ids_ref[base + t * heads + h], t, h).start())

  @pl.when(i == 0)
  def _():
    start(0, 0)

  @pl.when(i + 1 < nblocks)
  def _():
    start(i + 1, 1 - slot)

  # A wait only needs the semaphore and the transfer size: any row will do.
  for_each_row(lambda t, h: row_copy(slot, 0, t, h).wait())
  return slot


def _gather_kernel(ids_ref, table_hbm, out_ref, buf, sem, *, block_rows, heads):
  i = pl.program_id(0)
  slot = _prefetch_and_wait(ids_ref, table_hbm, buf, sem, i, pl.num_programs(0), block_rows=block_rows, heads=heads)
  d = buf.shape[-1]
  for h in range(heads):
    out_ref[:, h * d : (h + 1) * d] = buf[slot, h].astype(out_ref.dtype)


def _check_block_rows(block_rows, ids_per_call) -> int:
  """block_rows (None: 8) after the checks of the TPU tiling and of ids_per_call."""
  block_rows = 8 if block_rows is None else block_rows
  if block_rows <= 0 or block_rows % 8:
    raise ValueError(f"block_rows must be a positive multiple of 8 (TPU sublane tiling), got {block_rows}")
  if ids_per_call < block_rows:
    raise ValueError(f"ids_per_call={ids_per_call} must be >= block_rows={block_rows}")
  return block_rows


def _call_in_chunks(
  kernel,
  table,
  row_ids,
  *weights,
  tokens=(),
  block_rows,
  ids_per_call,
  interpret,
  grid=(),
  in_specs=(),
  out_specs,
  outs,
  scratch=(),
):
  """Runs kernel(ids, table, *weights, *tokens, *outputs, rows buffer, DMA semaphores, *scratch) with N
  padded to block_rows, one pallas_call per chunk of ids_per_call tokens (their ids fit SMEM).

  weights go whole, tokens [N, ...] by chunk; the grid is (token block, *grid); in_specs: those of
  weights and tokens; outs: (shape after N, dtype) of each output. -> the outputs [N, ...].
  """
  n, heads = row_ids.shape
  n_pad, ids, *tokens = common.pad_tokens(block_rows, row_ids, *tokens)
  step = ids_per_call // block_rows * block_rows
  rows_scratch = [pltpu.VMEM((2, heads, block_rows, table.shape[1]), table.dtype), pltpu.SemaphoreType.DMA((2,))]
  chunk_outs = []
  for start in range(0, n_pad, step):
    size = min(step, n_pad - start)
    call = pl.pallas_call(
      functools.partial(kernel, block_rows=block_rows, heads=heads),
      grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(size // block_rows, *grid),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), *in_specs],
        out_specs=out_specs,
        scratch_shapes=rows_scratch + list(scratch),
      ),
      out_shape=[jax.ShapeDtypeStruct((size, *shape), dtype) for shape, dtype in outs],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",) * (1 + len(grid))),
      interpret=interpret,
    )
    chunk_outs.append(
      call(ids[start : start + size].reshape(-1), table, *weights, *(t[start : start + size] for t in tokens))
    )
  return tuple((parts[0] if len(parts) == 1 else jnp.concatenate(parts))[:n] for parts in zip(*chunk_outs))


@functools.partial(jax.jit, static_argnames=("block_rows", "ids_per_call", "interpret"))
def gather_rows_tpu(table, row_ids, *, block_rows: int | None = None, ids_per_call: int = 2048, interpret=None):
  """table [R, d], row_ids [N, H] int32 -> [N, H*d] (table.dtype).

  block_rows: tokens per grid step, a multiple of 8 (None: 8).
  ids_per_call: tokens whose ids go to SMEM in one pallas_call.
  """
  block_rows = _check_block_rows(block_rows, ids_per_call)
  c = row_ids.shape[1] * table.shape[1]
  (out,) = _call_in_chunks(
    _gather_kernel,
    table,
    row_ids,
    block_rows=block_rows,
    ids_per_call=ids_per_call,
    interpret=interpret,
    out_specs=[pl.BlockSpec((block_rows, c), lambda i, ids: (i, 0))],
    outs=[((c,), table.dtype)],
  )
  return out


def _gather_gate_kernel(ids_ref, table_hbm, *refs, block_rows, heads, dim, gate, norm_eps):
  """Grid (token block i, phase p, D tile j).

  Phase 0 walks the D tiles of the key projections, accumulating per (token,
  branch) sum(k^2) and sum(q * scale * k); RMSNorm and the dot product only
  need these two sums. Phase 1 walks the D tiles of the value projection and
  writes u = alpha * v. The gathered rows stay in VMEM across all (p, j).
  """
  wv_ref, bv_ref, wk_ref, bk_ref, scale_ref, q_ref, u_ref, gates_ref, buf, sem, ssq, qk, alpha = refs
  i, p, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  f32 = jnp.float32
  num_branches = ssq.shape[1]

  @pl.when((p == 0) & (j == 0))
  def _():
    _prefetch_and_wait(ids_ref, table_hbm, buf, sem, i, pl.num_programs(0), block_rows=block_rows, heads=heads)
    ssq[...] = jnp.zeros_like(ssq)
    qk[...] = jnp.zeros_like(qk)

  slot = i % 2

  def project(w_of_head):
    acc = None
    for h in range(heads):
      part = jnp.dot(buf[slot, h], w_of_head(h), preferred_element_type=f32)
      acc = part if acc is None else acc + part
    return acc

  @pl.when(p == 0)
  def _():
    for g in range(num_branches):
      k = project(lambda h: wk_ref[g, h]) + bk_ref[g : g + 1, :].astype(f32)
      qs = q_ref[:, g, :].astype(f32) * scale_ref[g : g + 1, :].astype(f32)
      ssq[:, g : g + 1] += jnp.sum(k * k, axis=1, keepdims=True)
      qk[:, g : g + 1] += jnp.sum(qs * k, axis=1, keepdims=True)

  @pl.when((p == 1) & (j == 0))
  def _():
    s = qk[...] * lax.rsqrt(ssq[...] / dim + norm_eps) / jnp.sqrt(f32(dim))
    if gate == "reference":
      s = reference.signed_sqrt(s)
    a = jax.nn.sigmoid(s)
    alpha[...] = a
    gates_ref[...] = a

  @pl.when(p == 1)
  def _():
    v = project(lambda h: wv_ref[h]) + bv_ref[...].astype(f32)
    for g in range(num_branches):
      u_ref[:, g, :] = (alpha[:, g : g + 1] * v).astype(u_ref.dtype)


@functools.partial(
  jax.jit, static_argnames=("gate", "norm_eps", "out_dtype", "block_rows", "block_d", "ids_per_call", "interpret")
)
def gather_gate_tpu(
  table, row_ids, *weights, block_rows=None, block_d=None, ids_per_call=2048, interpret=None, **options
):
  """Fused gather + projections + gate; weights and options (gate, norm_eps, out_dtype) as in
  reference.gather_gate. -> (u [N, G, D], gates [N, G] f32).

  block_rows: tokens per grid step, a multiple of 8 (None: 8).
  block_d: D tile of the projections, a multiple of 128 dividing D (None: the
    largest of 512, 256, 128 dividing D, else D). The key-weight tile
    [G, H*d, block_d] is the biggest VMEM block: at the paper's shapes (G=4,
    H*d=1280, bf16) 512 gives 5 MiB, double-buffered 10 MiB.
  """
  gate, norm_eps, out_dtype = common.gate_options(**options)
  w_value, b_value, w_key, b_key, query_normed, key_norm_scale = weights
  block_rows = _check_block_rows(block_rows, ids_per_call)
  heads, d = row_ids.shape[1], table.shape[1]
  num_branches, _, dim = w_key.shape
  if block_d is None:
    block_d = next((b for b in (512, 256, 128) if dim % b == 0), dim)
  if dim % block_d or (block_d != dim and block_d % 128):
    raise ValueError(f"block_d={block_d} must divide D={dim} and be a multiple of 128")
  nd = dim // block_d
  weights = (w_value.reshape(heads, d, dim), b_value.reshape(1, dim), w_key.reshape(num_branches, heads, d, dim))

  # Phase 0 uses key tiles j, phase 1 value tiles j; the other operand keeps
  # its last block index so it is not fetched again.
  def key_tile(p, j):
    return j * (1 - p) + (nd - 1) * p

  per_token = (block_rows, num_branches)
  return _call_in_chunks(
    functools.partial(_gather_gate_kernel, dim=dim, gate=gate, norm_eps=norm_eps),
    table,
    row_ids,
    *weights,
    b_key,
    key_norm_scale,
    tokens=(query_normed,),
    block_rows=block_rows,
    ids_per_call=ids_per_call,
    interpret=interpret,
    grid=(2, nd),
    in_specs=[
      pl.BlockSpec((heads, d, block_d), lambda i, p, j, ids: (0, 0, j * p)),
      pl.BlockSpec((1, block_d), lambda i, p, j, ids: (0, j * p)),
      pl.BlockSpec((num_branches, heads, d, block_d), lambda i, p, j, ids: (0, 0, 0, key_tile(p, j))),
      pl.BlockSpec((num_branches, block_d), lambda i, p, j, ids: (0, key_tile(p, j))),
      pl.BlockSpec((num_branches, block_d), lambda i, p, j, ids: (0, key_tile(p, j))),
      pl.BlockSpec((*per_token, block_d), lambda i, p, j, ids: (i, 0, key_tile(p, j))),
    ],
    out_specs=[
      pl.BlockSpec((*per_token, block_d), lambda i, p, j, ids: (i, 0, j * p)),
      pl.BlockSpec(per_token, lambda i, p, j, ids: (i, 0)),
    ],
    outs=[
      ((num_branches, dim), common.out_dtype_or_default(out_dtype, table, w_value)),
      ((num_branches,), jnp.float32),
    ],
    scratch=[pltpu.VMEM(per_token, jnp.float32)] * 3,
  )
