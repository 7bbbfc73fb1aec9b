"""The Mosaic GPU kernels (gather; fused gather_gate), on CPU: GPU interpret
mode and lowering only.

No GPU in CI: these tests check the kernels' logic (TMA copies, barriers,
stages, round-robin CTAs, wgmma; the fused kernel under the interpreter's race
detector) with plgpu.InterpretGPUParams, and that they lower to a Mosaic GPU
custom call for Hopper (layout inference, wgmma shapes, shared-memory size).
Hardware compilation by ptxas and speed are NOT tested here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels as pk
from pallas_kernels import gather_gate_gpu, gather_gpu, reference
from tests.test_kernels_common import ARG_ORDER, loss_and_grads, make_inputs, reference_gather_gate, tol

INTERPRET = plgpu.InterpretGPUParams()


@pytest.mark.parametrize(
  "d,dtype,num_ctas,stages",
  [
    (16, jnp.float32, 2, 2),  # 64-byte rows: padded stage stride, per-row stores
    (64, jnp.bfloat16, 3, 1),  # 128-byte rows: contiguous stage, one store per block
  ],
)
def test_gather_rows_interpret(d, dtype, num_ctas, stages):
  # 13 tokens / block 4 -> 4 blocks dealt round-robin, so CTAs reuse stages.
  x = make_inputs(n=13, heads=3, d=d, dtype=dtype)
  out = gather_gpu.gather_rows_gpu(
    x["table"], x["row_ids"], block_rows=4, stages=stages, num_ctas=num_ctas, interpret=INTERPRET
  )
  np.testing.assert_array_equal(
    np.asarray(out, np.float32), np.asarray(reference.gather_rows(x["table"], x["row_ids"]), np.float32)
  )


@pytest.mark.parametrize(
  "dim,kernel",
  [
    (64, "gather_gate_fused_gpu"),  # fused: D a multiple of 64
    (32, "gather_rows_gpu"),  # D=32 has no block_d: gather kernel + XLA gate
  ],
)
def test_gather_gate_and_grads_via_gpu_backend(dim, kernel):
  x = make_inputs(n=6, heads=2, d=16, dim=dim, branches=4)
  fn = lambda *a: pk.gather_gate(*a, impl="pallas", backend="gpu", interpret=INTERPRET)
  # Which GPU path ran: the jitted kernel wrapper named in the traced program.
  assert f"name={kernel}" in str(jax.make_jaxpr(fn)(*[x[a] for a in ARG_ORDER]))
  (u, g), grads = loss_and_grads(fn, x)
  (u_r, g_r), grads_r = loss_and_grads(reference_gather_gate("reference"), x)
  np.testing.assert_allclose(u, u_r, **tol(jnp.float32))
  np.testing.assert_allclose(g, g_r, **tol(jnp.float32))
  for name in grads_r:
    np.testing.assert_allclose(grads[name], grads_r[name], **tol(jnp.float32), err_msg=name)


@pytest.mark.parametrize(
  "dtype,d,heads,branches,n,gate,num_ctas,block_k,stages,out_dtype",
  [
    # bf16, the paper's head dim (160-byte rows: 32-byte swizzle, padded staging),
    # f32 queries and u; 70 tokens = 2 blocks on one CTA: the weight ring runs
    # across blocks; C=160 in 5 K chunks through 2 slots.
    (jnp.bfloat16, 80, 2, 4, 70, "reference", 1, 32, 2, jnp.float32),
    # f32 (tf32 wgmma, K-major weights), 64-byte swizzle; 130 tokens = 3 blocks
    # dealt round-robin to 2 CTAs; C=48 in 3 K chunks through 3 slots.
    (jnp.float32, 16, 3, 1, 130, "paper", 2, 16, 3, None),
  ],
)
def test_fused_gather_gate_interpret(dtype, d, heads, branches, n, gate, num_ctas, block_k, stages, out_dtype):
  # D=128 with block_d=64: two D tiles per projection.
  x = make_inputs(d=d, n=n, heads=heads, branches=branches, dim=128, dtype=dtype)
  x["query_normed"] = x["query_normed"].astype(jnp.float32)
  args = [x[a] for a in ARG_ORDER]
  u, g = gather_gate_gpu.gather_gate_fused_gpu(
    *args,
    gate=gate,
    out_dtype=out_dtype,
    block_d=64,
    block_k=block_k,
    stages=stages,
    num_ctas=num_ctas,
    interpret=plgpu.InterpretGPUParams(detect_races=True),
  )
  jax.block_until_ready((u, g))
  assert not get_races().races_found
  u_r, g_r = reference.gather_gate(*args, gate=gate, out_dtype=out_dtype)
  assert u.dtype == u_r.dtype and u.shape == u_r.shape and g.shape == g_r.shape
  np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(u_r, np.float32), **tol(dtype))
  np.testing.assert_allclose(g, g_r, **tol(dtype))


def test_fused_plan_decides_which_shapes_fuse():
  bf16, f32 = jnp.bfloat16, jnp.float32
  # The paper's shapes fuse: 64 tokens x 1280 x bf16 = 160 KiB of resident rows.
  p = gather_gate_gpu.plan(16, 80, 2560, 4, bf16)
  assert isinstance(p, gather_gate_gpu.Plan)
  assert (p.swizzle, p.staged_d) == (32, 128)  # 160-byte rows: 32 B swizzle, 256 B staging
  assert 2560 % p.block_d == 0 and 1280 % p.block_k == 0 and p.stages >= 2
  assert gather_gate_gpu.smem_bytes(p, bf16, bf16) <= gather_gate_gpu.SMEM_BUDGET_BYTES
  assert isinstance(gather_gate_gpu.plan(8, 128, 1024, 4, bf16), gather_gate_gpu.Plan)
  # Not fused, with the reason:
  assert "shared memory" in gather_gate_gpu.plan(16, 128, 2560, 4, bf16)  # 256 KiB of rows
  assert "shared memory" in gather_gate_gpu.plan(16, 80, 2560, 4, f32)  # 320 KiB of rows
  assert "32 bytes" in gather_gate_gpu.plan(4, 8, 256, 1, bf16)  # 16-byte rows
  assert "block_d" in gather_gate_gpu.plan(2, 16, 32, 1, f32)  # D=32
  assert "block_d" in gather_gate_gpu.plan(2, 16, 256, 1, f32, block_d=96)
  assert "stages" in gather_gate_gpu.plan(2, 16, 256, 1, f32, stages=1)
  sds = jax.ShapeDtypeStruct
  mixed = gather_gate_gpu.fused_plan(
    sds((100, 80), bf16),
    sds((64, 16), jnp.int32),
    sds((1280, 2560), f32),
    sds((4, 1280, 2560), f32),
    sds((64, 4, 2560), bf16),
  )
  assert "one dtype" in mixed


def test_fused_bad_block_d_is_an_error():
  x = make_inputs(n=6, heads=2, d=16, dim=128, branches=1)
  with pytest.raises(ValueError, match="block_d=96"):
    pk.gather_gate(*[x[a] for a in ARG_ORDER], impl="pallas", backend="gpu", block_d=96, interpret=INTERPRET)


@pytest.mark.parametrize(
  "d,heads,dim,branches,dtype,io_dtype",
  [
    (80, 16, 2560, 4, jnp.bfloat16, jnp.bfloat16),  # the paper's shapes
    # 256-byte rows (128-byte swizzle); f32 queries, biases, scales and u.
    (128, 8, 1024, 4, jnp.bfloat16, jnp.float32),
    (32, 4, 256, 2, jnp.float32, jnp.float32),  # tf32 wgmma, K-major weights
  ],
)
def test_fused_lowers_to_mosaic_gpu(d, heads, dim, branches, dtype, io_dtype):
  sds = jax.ShapeDtypeStruct
  c, n = heads * d, 1000
  args = (
    sds((10_000, d), dtype),
    sds((n, heads), jnp.int32),
    sds((c, dim), dtype),
    sds((dim,), io_dtype),
    sds((branches, c, dim), dtype),
    sds((branches, dim), io_dtype),
    sds((n, branches, dim), io_dtype),
    sds((branches, dim), io_dtype),
  )
  fn = functools.partial(gather_gate_gpu.gather_gate_fused_gpu, out_dtype=io_dtype)
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_row_width_must_be_tma_granule():
  table = jnp.zeros((10, 6), jnp.bfloat16)  # 12-byte rows
  with pytest.raises(ValueError, match="multiple of 16 bytes"):
    gather_gpu.gather_rows_gpu(table, jnp.zeros((2, 2), jnp.int32), interpret=INTERPRET)


def test_smem_budget_error_and_block_rows_helper():
  table = jnp.zeros((10, 512), jnp.float32)
  ids = jnp.zeros((64, 16), jnp.int32)
  with pytest.raises(ValueError, match="shared-memory stages"):
    gather_gpu.gather_rows_gpu(table, ids, block_rows=64, interpret=INTERPRET)
  # 2 tokens x 16 heads x 2 KiB x 2 stages = 128 KiB; 4 tokens would be 256 KiB.
  assert gather_gpu.max_block_rows(16, 512, jnp.float32) == 2
  assert gather_gpu.max_block_rows(16, 80, jnp.bfloat16) == 16  # paper: 256 B stride
  assert gather_gpu.smem_row_elems(80, jnp.bfloat16) == 128  # 160 B -> 256 B stride


@pytest.mark.parametrize("d", [80, 128])
def test_lowers_to_mosaic_gpu(d):
  table = jnp.zeros((1000, d), jnp.bfloat16)  # 80: the paper's head dim, 160-byte rows
  ids = jnp.zeros((100, 16), jnp.int32)
  lowered = jax.jit(gather_gpu.gather_rows_gpu).trace(table, ids).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()
