"""The Mosaic GPU gather kernel, on CPU: GPU interpret mode and lowering only.

No GPU in CI: these tests check the kernel's logic (TMA copies, barriers,
stages, round-robin CTAs) with plgpu.InterpretGPUParams, and that it lowers to
a Mosaic GPU custom call. Hardware compilation and speed are NOT tested here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels as pk
from pallas_kernels import gather_gpu, reference
from tests.test_kernels_common import loss_and_grads, make_inputs, reference_gather_gate, tol

INTERPRET = plgpu.InterpretGPUParams()


@pytest.mark.parametrize("d,dtype,num_ctas,stages", [
    (16, jnp.float32, 2, 2),    # 64-byte rows: padded stage stride, per-row stores
    (64, jnp.bfloat16, 3, 1),   # 128-byte rows: contiguous stage, one store per block
])
def test_gather_rows_interpret(d, dtype, num_ctas, stages):
  # 13 tokens / block 4 -> 4 blocks dealt round-robin, so CTAs reuse stages.
  x = make_inputs(n=13, heads=3, d=d, dtype=dtype)
  out = gather_gpu.gather_rows_gpu(x["table"], x["row_ids"], block_rows=4, stages=stages,
                                   num_ctas=num_ctas, interpret=INTERPRET)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(reference.gather_rows(x["table"], x["row_ids"]),
                                           np.float32))


def test_gather_gate_and_grads_via_gpu_backend():
  x = make_inputs(n=6, heads=2, d=16, dim=32, branches=4)
  fn = lambda *a: pk.gather_gate(*a, impl="pallas", backend="gpu", interpret=INTERPRET)
  (u, g), grads = loss_and_grads(fn, x)
  (u_r, g_r), grads_r = loss_and_grads(reference_gather_gate("reference"), x)
  np.testing.assert_allclose(u, u_r, **tol(jnp.float32))
  np.testing.assert_allclose(g, g_r, **tol(jnp.float32))
  for name in grads_r:
    np.testing.assert_allclose(grads[name], grads_r[name], **tol(jnp.float32), err_msg=name)


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
  assert gather_gpu.max_block_rows(16, 80, jnp.bfloat16) == 16    # paper: 256 B stride
  assert gather_gpu.smem_row_elems(80, jnp.bfloat16) == 128       # 160 B -> 256 B stride


@pytest.mark.parametrize("d", [80, 128])
def test_lowers_to_mosaic_gpu(d):
  table = jnp.zeros((1000, d), jnp.bfloat16)   # 80: the paper's head dim, 160-byte rows
  ids = jnp.zeros((100, 16), jnp.int32)
  lowered = jax.jit(gather_gpu.gather_rows_gpu).trace(table, ids).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()
