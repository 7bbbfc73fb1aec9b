"""Mosaic GPU (Hopper) Pallas kernel for the row gather.

UNTESTED ON HARDWARE: written against jax 0.11's pallas.mosaic_gpu API and
checked on CPU only in GPU interpret mode (plgpu.InterpretGPUParams) where that
mode supports it; see README.md.

Design: a persistent kernel with one CTA per SM (`num_ctas`). Token blocks of
`block_rows` tokens are dealt round-robin to CTAs. For each block, one TMA copy
per (token, head) row goes from the table in GMEM to a shared-memory stage of
shape [block_rows*H, d]; all copies of a stage arrive on one barrier
(num_arrivals = block_rows*H). `stages` stages are in flight, so the gathers
of the next blocks overlap the TMA store of the current one. Rows whose size is
a multiple of 128 bytes sit contiguously in the stage and leave in one TMA
store per block; other rows get a 128-byte padded stride (TMA wants aligned
shared-memory addresses) and leave in one TMA store per row. The output is
written as [N_pad*H, d] rows (free reshape to [N, H*d]).

Shapes: table [R, d] (d*itemsize a multiple of 16 bytes, the TMA granule),
row_ids [N, H] int32 -> [N, H*d].

Out-of-range ids under jit: TMA zero-fills reads outside the tensor box, so on
hardware such rows would come back as zeros (not checked; ops.py rejects
concrete bad ids).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import gather_gate_gpu as fused
from pallas_kernels import reference
from pallas_kernels.common import pad_tokens, smem_row_elems

TMA_GRANULE_BYTES = 16
SMEM_BUDGET_BYTES = 200 * 1024  # of the 227 KiB an H100/H200 CTA can use


def max_block_rows(heads: int, d: int, dtype, stages: int = 2) -> int:
  """Largest power-of-two block_rows whose stages fit SMEM_BUDGET_BYTES."""
  per_token = stages * heads * smem_row_elems(d, dtype) * jnp.dtype(dtype).itemsize
  rows = 1
  while 2 * rows * per_token <= SMEM_BUDGET_BYTES:
    rows *= 2
  return rows


def check_row_width(table) -> None:
  row_bytes = table.shape[1] * jnp.dtype(table.dtype).itemsize
  if row_bytes % TMA_GRANULE_BYTES:
    raise ValueError(
      f"GPU kernel needs rows of a multiple of {TMA_GRANULE_BYTES} bytes; "
      f"table row is {table.shape[1]} x {jnp.dtype(table.dtype).name} = {row_bytes} bytes"
    )


def _gather_body(ids_gmem, table_gmem, out_gmem, buf, barriers, *, num_blocks, num_ctas, rows_per_block, stages):
  cta = lax.axis_index("cta")
  d = table_gmem.shape[1]
  padded = buf.shape[-1] != d
  blocks_per_cta = pl.cdiv(num_blocks, num_ctas)

  def issue(k, slot):
    block = cta + k * num_ctas
    base = block * rows_per_block

    @pl.when((k < blocks_per_cta) & (block < num_blocks))
    def _():
      @pl.loop(0, rows_per_block)
      def _(r):
        row = ids_gmem[base + r]
        plgpu.copy_gmem_to_smem(table_gmem.at[pl.ds(row, 1)], buf.at[slot, pl.ds(r, 1), pl.ds(0, d)], barriers.at[slot])

  for s in range(stages):
    issue(s, s)

  @pl.loop(0, blocks_per_cta)
  def _(k):
    block = cta + k * num_ctas
    slot = k % stages

    @pl.when(block < num_blocks)
    def _():
      plgpu.barrier_wait(barriers.at[slot])
      first = block * rows_per_block
      if padded:
        # Padded stage stride: one TMA store per row.
        @pl.loop(0, rows_per_block)
        def _(r):
          plgpu.copy_smem_to_gmem(buf.at[slot, pl.ds(r, 1), pl.ds(0, d)], out_gmem.at[pl.ds(first + r, 1)])
      else:
        plgpu.copy_smem_to_gmem(buf.at[slot], out_gmem.at[pl.ds(first, rows_per_block)])
      # The stage is refilled only once the store has read it.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      issue(k + stages, slot)

  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("block_rows", "stages", "num_ctas", "interpret"))
def gather_rows_gpu(
  table, row_ids, *, block_rows: int | None = None, stages: int = 2, num_ctas: int = 132, interpret=None
):
  """table [R, d], row_ids [N, H] int32 -> [N, H*d] (table.dtype).

  block_rows: tokens per block (None: the most that fit SMEM, at most 64).
  num_ctas: persistent CTAs (132 = SMs of an H100/H200 SXM).
  """
  check_row_width(table)
  n, heads = row_ids.shape
  d = table.shape[1]
  if block_rows is None:
    block_rows = min(64, max_block_rows(heads, d, table.dtype, stages))
  n_pad, ids = pad_tokens(block_rows, row_ids)
  num_blocks = n_pad // block_rows
  rows_per_block = block_rows * heads
  num_ctas = max(1, min(num_ctas, num_blocks))
  d_smem = smem_row_elems(d, table.dtype)
  smem_bytes = stages * rows_per_block * d_smem * jnp.dtype(table.dtype).itemsize
  if smem_bytes > SMEM_BUDGET_BYTES:
    raise ValueError(
      f"shared-memory stages need {smem_bytes} bytes > {SMEM_BUDGET_BYTES}: lower "
      f"block_rows={block_rows} (max_block_rows gives "
      f"{max_block_rows(heads, d, table.dtype, stages)}) or stages={stages}"
    )
  body = functools.partial(
    _gather_body, num_blocks=num_blocks, num_ctas=num_ctas, rows_per_block=rows_per_block, stages=stages
  )
  out = plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((n_pad * heads, d), table.dtype),
    scratch_types=[
      plgpu.SMEM((stages, rows_per_block, d_smem), table.dtype),
      plgpu.Barrier(num_arrivals=rows_per_block, num_barriers=stages),
    ],
    grid=(num_ctas,),
    grid_names=("cta",),
    interpret=interpret,
  )(ids.reshape(-1), table)
  return out.reshape(n_pad, heads * d)[:n]


def gather_gate_gpu(table, row_ids, *weights, block_rows=None, block_d=None, interpret=None, **options):
  """GPU gather_gate: the fused Hopper kernel (gather_gate_gpu.py) where `gather_gate_gpu.fused_plan`
  accepts the shapes, else this gather + the XLA gate (the rows [N, H*d] make one round trip through HBM).

  weights and options (gate, norm_eps, out_dtype) as in reference.gate_from_rows. The fused kernel's
  token block is fixed (64, the wgmma M): block_rows only applies to the fallback gather; a block_d
  the fused kernel cannot use where the default would fuse is a ValueError.
  """
  w_value, _, w_key, _, query_normed, _ = weights
  plan_args = (table, row_ids, w_value, w_key, query_normed)
  out_dtype = options.get("out_dtype")
  plan = fused.fused_plan(*plan_args, out_dtype=out_dtype, block_d=block_d)
  if not isinstance(plan, str):
    return fused.gather_gate_fused_gpu(table, row_ids, *weights, block_d=block_d, interpret=interpret, **options)
  if block_d is not None and not isinstance(fused.fused_plan(*plan_args, out_dtype=out_dtype), str):
    raise ValueError(f"block_d={block_d} does not suit the fused GPU kernel: {plan}")
  rows = gather_rows_gpu(table, row_ids, block_rows=block_rows, interpret=interpret)
  return reference.gate_from_rows(rows, *weights, **options)
