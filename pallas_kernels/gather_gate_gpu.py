"""Fused gather + projections + gate: Mosaic GPU (Hopper, wgmma) kernel.

UNTESTED ON HARDWARE: written against jax 0.11's pallas.mosaic_gpu API (default
Warpgroup lowering semantics) and checked on CPU only, in GPU interpret mode
(plgpu.InterpretGPUParams, with its race detector) and by lowering to a Mosaic
GPU custom call for a Hopper target (layout inference, wgmma shape and
shared-memory checks); see README.md.

Shapes (as in reference.py), C = H*d:
  table [R, d], row_ids [N, H] int32, w_value [C, D], b_value [D],
  w_key [G, C, D], b_key [G, D], query_normed [N, G, D], key_norm_scale [G, D]
  -> u [N, G, D] (out_dtype), gates [N, G] float32.

Design: one warpgroup per CTA; persistent, `num_ctas` CTAs take blocks of
TOKENS_PER_BLOCK = 64 tokens (the wgmma M) round-robin. Per block:
  1. Gather. Per head h, one TMA copy per token row from the table into a
     staging buffer whose rows are padded to 128 bytes (TMA wants 128-byte
     aligned shared-memory destinations; the paper's 160-byte rows get 256),
     double-buffered over heads. Each staged head goes through registers into
     columns [h*d, (h+1)*d) of the resident left operand A [64, C] in shared
     memory, tiled (8, swizzle/itemsize) and swizzled for wgmma. The swizzle
     is the largest of 128/64/32 bytes dividing the row (32 for 160-byte rows),
     so every head starts on a tile.
  2. Phase 0, per branch g and D tile j (`block_d` columns): acc [64, block_d]
     = A @ w_key[g][:, tile] by wgmma, with weight chunks [block_k, block_d]
     streamed by TMA through `stages` shared-memory slots (a barrier ring; a
     slot is refilled once the wgmma that read it has retired). The epilogue
     adds b_key and accumulates per token S2 = sum(k^2) and S1 = sum(q * scale
     * k) (q, b_key and scale tiles by TMA). Then alpha = sigmoid(signed_sqrt(
     S1 * rsqrt(S2/D + eps) / sqrt(D))) (gate="paper": no signed_sqrt): the
     gates of the block.
  3. Phase 1, per D tile j: v = A @ w_value[:, tile] + b_value, and
     u[:, g, tile] = alpha[:, g] * v for every g, by TMA stores from two
     alternating shared-memory tiles.
The weight-chunk stream is the same for every block, so the ring prefetches
the next block's first chunks during the current block's gather. Neither the
gathered rows nor k and v reach device memory.

Shared memory: A (64*C*itemsize: 160 KiB at the paper's C = 1280 in bf16),
the union of the gather staging and the q/out tiles, and the weight slots.
`plan` picks block_d/block_k/stages that fit 227 KiB, or says why nothing does;
gather_gpu.gather_gate_gpu then takes the unfused path. With 64 tokens per
CTA, every block streams all weights from L2 (C*D*(G+1) elements per 64
tokens), which bounds the arithmetic intensity; see README.md.

f32 tables: wgmma runs f32 operands as tf32 (10-bit mantissa; XLA's default
f32 matmul precision on GPU does too), and tf32 wgmma wants the B operand
K-major, so the wrapper passes the weights transposed ([D, C]; one extra pass
over the weights per call).

Out-of-range ids under jit: as in gather_gpu.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common, reference

TOKENS_PER_BLOCK = 64  # wgmma M of one warpgroup
SMEM_BUDGET_BYTES = 227 * 1024  # what an H100/H200 CTA can use (Mosaic checks the same)
SMEM_RESERVE_BYTES = 4096  # barriers, Mosaic's reduction scratch, alignment
SWIZZLES = (128, 64, 32)  # wgmma shared-memory swizzles (bytes), largest first
OPERAND_DTYPES = tuple(map(jnp.dtype, (jnp.bfloat16, jnp.float16, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static tiling of one fused call (independent of N)."""

  heads: int
  d: int  # row width
  dim: int  # D
  branches: int  # G
  dtype: jnp.dtype  # table and weight dtype (the wgmma operands)
  swizzle: int  # bytes; A and the weight slots share it (a wgmma rule)
  block_d: int  # N tile of the projections (wgmma N)
  block_k: int  # K chunk of one streamed weight slot
  stages: int  # weight slots in flight

  @property
  def c(self) -> int:
    return self.heads * self.d

  @property
  def staged_d(self) -> int:
    """Row stride (elements) of the gather staging buffer (common.smem_row_elems)."""
    return common.smem_row_elems(self.d, self.dtype)

  @property
  def k_major_weights(self) -> bool:
    """tf32 wgmma (f32 operands) only takes a K-major B operand."""
    return self.dtype.itemsize == 4

  @property
  def steps_per_block(self) -> int:
    """Weight chunks streamed per token block: (G key + 1 value) x D tiles x K chunks."""
    return (self.branches + 1) * (self.dim // self.block_d) * (self.c // self.block_k)


def _buffer_bytes(shape, dtype, align=1024):
  return common.round_up(math.prod(shape) * jnp.dtype(dtype).itemsize, align)


def smem_bytes(p: Plan, q_dtype, out_dtype) -> int:
  """Shared memory the kernel allocates (an upper bound of Mosaic's count)."""
  tb = TOKENS_PER_BLOCK
  a = _buffer_bytes((tb, p.c), p.dtype)
  staging = _buffer_bytes((2, tb, p.staged_d), p.dtype)
  tiles = _buffer_bytes((tb, p.block_d), q_dtype) + _buffer_bytes((2, tb, p.block_d), out_dtype)
  weights = _buffer_bytes((p.stages, p.block_k, p.block_d), p.dtype)
  vectors = _buffer_bytes((p.branches, tb), jnp.float32) + 3 * _buffer_bytes((p.block_d,), jnp.float32)
  return a + max(staging, tiles) + weights + vectors + SMEM_RESERVE_BYTES


def plan(
  heads: int,
  d: int,
  dim: int,
  branches: int,
  dtype,
  *,
  q_dtype=None,
  out_dtype=None,
  block_d: int | None = None,
  block_k: int | None = None,
  stages: int | None = None,
) -> Plan | str:
  """The tiling of a fused call, or a string saying why these shapes are not fused.

  Pure Python (nothing traced). Rules: dtype bf16, f16 or f32; d*itemsize a
  multiple of 32 bytes; block_d a multiple of 64 dividing D, at most 256;
  block_k a multiple of the swizzle width dividing C; stages >= 2; everything
  within SMEM_BUDGET_BYTES. None picks, among block_d in (128, 64), block_k <=
  256 and stages in (2, 3, 4) that fit, the most weight bytes in flight
  ((stages - 1) * block_k * block_d), then the widest block_d.
  """
  dtype = jnp.dtype(dtype)
  q_dtype = jnp.dtype(dtype if q_dtype is None else q_dtype)
  out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
  if dtype not in OPERAND_DTYPES:
    return f"dtype {dtype.name} is not a wgmma operand type (bfloat16, float16, float32)"
  row_bytes = d * dtype.itemsize
  swizzle = next((s for s in SWIZZLES if row_bytes % s == 0), None)
  if swizzle is None:
    return (
      f"a row of {d} x {dtype.name} = {row_bytes} bytes is not a multiple of 32 bytes "
      "(each head must start on a wgmma swizzle tile)"
    )
  swz_elems = swizzle // dtype.itemsize
  c = heads * d
  block_ds = [block_d] if block_d else [b for b in (128, 64) if dim % b == 0]
  if not block_ds or any(dim % b or b % 64 or b > 256 for b in block_ds):
    return f"no block_d for D={dim}: needs a multiple of 64, at most 256, dividing D (got {block_d})"
  block_ks = [block_k] if block_k else [k for k in range(swz_elems, 257, swz_elems) if c % k == 0]
  if any(c % k or k % swz_elems for k in block_ks):
    return f"block_k={block_k} must divide C={c} and be a multiple of {swz_elems}"
  if stages is not None and stages < 2:
    return f"stages={stages} must be >= 2"
  candidates = [
    Plan(heads, d, dim, branches, dtype, swizzle, bd, bk, st)
    for bd in block_ds
    for bk in block_ks
    for st in ([stages] if stages else (2, 3, 4))
  ]
  fits = [p for p in candidates if smem_bytes(p, q_dtype, out_dtype) <= SMEM_BUDGET_BYTES]
  if not fits:
    small = min(candidates, key=lambda p: smem_bytes(p, q_dtype, out_dtype))
    return (
      f"needs {smem_bytes(small, q_dtype, out_dtype)} bytes of shared memory > "
      f"{SMEM_BUDGET_BYTES} even at block_d={small.block_d}, block_k={small.block_k}, "
      f"stages={small.stages}; the resident rows of a {TOKENS_PER_BLOCK}-token block "
      f"alone take {TOKENS_PER_BLOCK * c * dtype.itemsize}"
    )
  return max(fits, key=lambda p: ((p.stages - 1) * p.block_k * p.block_d, p.block_d, p.stages))


def fused_plan(table, row_ids, w_value, w_key, query_normed, *, out_dtype=None, **tiling) -> Plan | str:
  """`plan` for gather_gate's arguments (arrays, tracers or ShapeDtypeStructs), after the checks
  that do not depend on the tiling (block_d, block_k, stages of `plan`). -> Plan or why not fused."""
  if not table.dtype == w_value.dtype == w_key.dtype:
    return f"the wgmma operands need one dtype: table {table.dtype}, w_value {w_value.dtype}, w_key {w_key.dtype}"
  if row_ids.shape[0] == 0:
    return "no tokens"
  branches, _, dim = w_key.shape
  dtypes = dict(q_dtype=query_normed.dtype, out_dtype=common.out_dtype_or_default(out_dtype, table, w_value))
  return plan(row_ids.shape[1], table.shape[1], dim, branches, table.dtype, **dtypes, **tiling)


def _transforms(dtype, swizzle):
  """The wgmma tiling (8, swizzle / itemsize) and the swizzle (bytes) of a shared-memory buffer."""
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


WGMMA = plgpu.Layout.WGMMA
ROWS = WGMMA.reduce(1)  # one value per token (row) of a WGMMA tile
COLUMNS = WGMMA.reduce(0)  # one value per column


def _columns(vec_smem, shape):
  """A [block_d] vector in SMEM -> f32 [64, block_d] broadcast over tokens."""
  vec = plgpu.load(vec_smem, layout=COLUMNS).astype(jnp.float32)
  return lax.broadcast_in_dim(vec, shape, [1])


def _kernel(*refs, p: Plan, gate, norm_eps, num_blocks, num_ctas):
  ids_gmem, table_gmem, wv_gmem, bv_gmem, wk_gmem, bk_gmem, q_gmem, scale_gmem, u_gmem, gates_gmem = refs[:10]
  a_smem, union, w_smem, gates_smem, bk_smem, scale_smem, bv_smem, stage_bar, w_bar, key_bar, value_bar = refs[10:]
  tb = TOKENS_PER_BLOCK
  (staging,), (q_smem, out_smem) = union
  f32 = jnp.float32
  nd = p.dim // p.block_d
  nk = p.c // p.block_k
  steps = p.steps_per_block
  cta = lax.axis_index("cta")
  local_blocks = (num_blocks - cta + num_ctas - 1) // num_ctas
  total_steps = local_blocks * steps

  def fetch(gs):
    """Starts the TMA of weight chunk gs of this CTA's stream into its slot."""
    s = lax.rem(gs, steps)
    slot = lax.rem(gs, p.stages)
    tile, kc = s // nk, lax.rem(s, nk)

    def copy(w2d):  # w2d: [C, D] or, K-major, [D, C]
      j = lax.rem(tile, nd)
      ks, js = pl.ds(kc * p.block_k, p.block_k), pl.ds(j * p.block_d, p.block_d)
      src = w2d.at[js, ks] if p.k_major_weights else w2d.at[ks, js]
      plgpu.copy_gmem_to_smem(src, w_smem.at[slot], w_bar.at[slot])

    @pl.when(gs < total_steps)
    def _():
      @pl.when(tile < p.branches * nd)
      def _():
        copy(wk_gmem.at[tile // nd])

      @pl.when(tile >= p.branches * nd)
      def _():
        copy(wv_gmem)

  def matmul(acc_ref, gs0):
    """acc += A @ (the nk weight chunks of global steps gs0 .. gs0+nk-1)."""

    @pl.loop(0, nk)
    def _(kc):
      gs = gs0 + kc
      slot = lax.rem(gs, p.stages)
      plgpu.barrier_wait(w_bar.at[slot])
      w = w_smem.at[slot]
      if p.k_major_weights:
        w = w.T
      a = a_smem.at[:, pl.ds(pl.multiple_of(kc * p.block_k, p.block_k), p.block_k)]
      plgpu.wgmma(acc_ref, a, w)
      plgpu.wgmma_wait(1)  # the chunk of gs-1 is consumed: refill its slot

      @pl.when(gs >= 1)
      def _():
        fetch(gs - 1 + p.stages)

  def project(gs0):
    return pl.run_scoped(lambda acc_ref: (matmul(acc_ref, gs0), acc_ref[...])[1], plgpu.ACC((tb, p.block_d), f32))

  def gather(block):
    base = block * tb

    def issue(h, slot):
      plgpu.commit_smem()  # order earlier register loads of the slot before the TMA writes

      @pl.loop(0, tb)
      def _(t):
        row = ids_gmem[(base + t) * p.heads + h]
        plgpu.copy_gmem_to_smem(
          table_gmem.at[pl.ds(row, 1)], staging.at[slot, pl.ds(t, 1), pl.ds(0, p.d)], stage_bar.at[slot]
        )

    issue(0, 0)
    for h in range(p.heads):
      slot = h % 2
      if h + 1 < p.heads:
        issue(h + 1, 1 - slot)
      plgpu.barrier_wait(stage_bar.at[slot])
      # Whole padded rows, then the slice in registers: a strided [64, d] view
      # of the staging buffer is not a transfer Mosaic supports.
      staged = plgpu.load(staging.at[slot], layout=WGMMA, optimized=False)
      a_smem[:, pl.ds(h * p.d, p.d)] = staged[:, : p.d]
    plgpu.commit_smem()  # A is read by wgmma (async proxy)

  for s in range(p.stages):
    fetch(s)

  @pl.loop(0, local_blocks)
  def _(lb):
    block = cta + lb * num_ctas
    gs_block = lb * steps
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # staging aliases the out tiles
    gather(block)
    rows = pl.ds(block * tb, tb)

    # Phase 0: S1, S2 per branch over the D tiles of the key projections.
    for g in range(p.branches):

      def key_tile(j, carry, g=g):
        s1, s2 = carry
        cols = pl.ds(j * p.block_d, p.block_d)
        plgpu.commit_smem()  # the previous tile's q, b_key and scale were read
        plgpu.copy_gmem_to_smem(q_gmem.at[rows, g, cols], q_smem, key_bar)
        plgpu.copy_gmem_to_smem(bk_gmem.at[g, cols], bk_smem, key_bar)
        plgpu.copy_gmem_to_smem(scale_gmem.at[g, cols], scale_smem, key_bar)
        k = project(gs_block + (g * nd + j) * nk)
        plgpu.barrier_wait(key_bar)
        k = k + _columns(bk_smem, k.shape)
        qs = plgpu.load(q_smem, layout=WGMMA).astype(f32) * _columns(scale_smem, k.shape)
        return s1 + jnp.sum(qs * k, axis=1), s2 + jnp.sum(k * k, axis=1)

      zero = plgpu.layout_cast(jnp.zeros((tb,), f32), ROWS)
      s1, s2 = lax.fori_loop(0, nd, key_tile, (zero, zero))
      s = s1 * lax.rsqrt(s2 / p.dim + norm_eps) * (1.0 / math.sqrt(p.dim))
      if gate == "reference":
        s = reference.signed_sqrt(s)
      gates_smem[g] = 1.0 / (1.0 + jnp.exp(-s))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(gates_smem, gates_gmem.at[:, rows])

    # Phase 1: u[:, g, tile] = alpha[:, g] * (A @ w_value[:, tile] + b_value).
    @pl.loop(0, nd)
    def _(j):
      cols = pl.ds(j * p.block_d, p.block_d)
      plgpu.commit_smem()  # the previous tile's b_value was read
      plgpu.copy_gmem_to_smem(bv_gmem.at[cols], bv_smem, value_bar)
      v = project(gs_block + (p.branches * nd + j) * nk)
      plgpu.barrier_wait(value_bar)
      v = v + _columns(bv_smem, v.shape)
      for g in range(p.branches):
        slot = (j * p.branches + g) % 2
        alpha = lax.broadcast_in_dim(plgpu.load(gates_smem.at[g], layout=ROWS), v.shape, [0])
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        out_smem[slot] = (alpha * v).astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[slot], u_gmem.at[rows, g, cols])

  plgpu.wait_smem_to_gmem(0)


@functools.partial(
  jax.jit, static_argnames=("gate", "norm_eps", "out_dtype", "block_d", "block_k", "stages", "num_ctas", "interpret")
)
def gather_gate_fused_gpu(
  table, row_ids, *weights, block_d=None, block_k=None, stages=None, num_ctas=132, interpret=None, **options
):
  """Fused gather_gate on Hopper; weights and options (gate, norm_eps, out_dtype) as in
  reference.gather_gate. -> (u [N, G, D] out_dtype, gates [N, G] f32).

  block_d / block_k / stages: see `plan` (None: chosen to fit shared memory).
  num_ctas: persistent CTAs (132 = SMs of an H100/H200 SXM).
  Raises ValueError with the reason when the shapes cannot be fused;
  gather_gpu.gather_gate_gpu asks `fused_plan` first and falls back instead.
  """
  gate, norm_eps, out_dtype = common.gate_options(**options)
  w_value, b_value, w_key, b_key, query_normed, key_norm_scale = weights
  n = row_ids.shape[0]
  branches, _, dim = w_key.shape
  out_dtype = common.out_dtype_or_default(out_dtype, table, w_value)
  p = fused_plan(
    table, row_ids, w_value, w_key, query_normed, out_dtype=out_dtype, block_d=block_d, block_k=block_k, stages=stages
  )
  if isinstance(p, str):
    raise ValueError(f"cannot fuse gather_gate on GPU: {p}")
  tb = TOKENS_PER_BLOCK
  n_pad, ids, q = common.pad_tokens(tb, row_ids, query_normed)
  num_blocks = n_pad // tb
  wv, wk = w_value, w_key
  if p.k_major_weights:
    wv, wk = wv.T, jnp.swapaxes(wk, 1, 2)
  num_ctas = max(1, min(num_ctas, num_blocks))
  w_shape = (p.block_d, p.block_k) if p.k_major_weights else (p.block_k, p.block_d)
  op_transforms = _transforms(p.dtype, p.swizzle)
  tile_transforms = lambda dtype: _transforms(dtype, plgpu.find_swizzle(p.block_d * dtype.itemsize * 8))
  kernel = functools.partial(_kernel, p=p, gate=gate, norm_eps=norm_eps, num_blocks=num_blocks, num_ctas=num_ctas)
  u, gates_t = plgpu.kernel(
    kernel,
    out_type=(
      jax.ShapeDtypeStruct((n_pad, branches, dim), out_dtype),
      jax.ShapeDtypeStruct((branches, n_pad), jnp.float32),
    ),
    scratch_types=[
      plgpu.SMEM((tb, p.c), p.dtype, transforms=op_transforms),
      plgpu.RefUnion(
        [plgpu.SMEM((2, tb, p.staged_d), p.dtype)],
        [
          plgpu.SMEM((tb, p.block_d), q.dtype, transforms=tile_transforms(q.dtype)),
          plgpu.SMEM((2, tb, p.block_d), out_dtype, transforms=tile_transforms(out_dtype)),
        ],
      ),
      plgpu.SMEM((p.stages, *w_shape), p.dtype, transforms=op_transforms),
      plgpu.SMEM((branches, tb), jnp.float32),
      plgpu.SMEM((p.block_d,), b_key.dtype),
      plgpu.SMEM((p.block_d,), key_norm_scale.dtype),
      plgpu.SMEM((p.block_d,), b_value.dtype),
      plgpu.Barrier(num_arrivals=tb, num_barriers=2),  # gather staging
      plgpu.Barrier(num_barriers=p.stages),  # weight slots
      plgpu.Barrier(num_arrivals=3),  # q, b_key, scale tiles
      plgpu.Barrier(),  # b_value tile
    ],
    grid=(num_ctas,),
    grid_names=("cta",),
    interpret=interpret,
  )(ids.reshape(-1), table, wv, b_value, wk, b_key, q, key_norm_scale)
  if n_pad != n:
    u = u[:n]
  return u, gates_t[:, :n].T
