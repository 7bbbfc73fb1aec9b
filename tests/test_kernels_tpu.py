"""The TPU Pallas kernels (paged-attention pattern) in TPU interpret mode on CPU.

Forward and every gradient of impl="pallas" against the pure-jnp reference,
with N not divisible by block_rows, duplicate and boundary ids, G = 1 and 4,
f32 and bf16 tables, and several SMEM id chunks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels import gather_tpu, reference
from tests.test_kernels_common import loss_and_grads, make_inputs, reference_gather_gate, tol

INTERPRET = pltpu.InterpretParams()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_rows_forward_and_grad(dtype):
  x = make_inputs(n=13, heads=3, d=128, dtype=dtype)
  table, ids = x["table"], x["row_ids"]
  fn = lambda t: pk.gather_rows(t, ids, impl="pallas", backend="tpu", interpret=INTERPRET)
  out, vjp = jax.vjp(fn, table)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(reference.gather_rows(table, ids), np.float32))
  cot = jax.random.normal(jax.random.key(2), out.shape).astype(dtype)
  (d_table,) = vjp(cot)
  expected = reference.scatter_add_rows(cot, ids, table.shape[0], dtype)
  assert d_table.dtype == dtype
  np.testing.assert_allclose(np.asarray(d_table, np.float32), np.asarray(expected, np.float32), **tol(dtype))


def test_gather_rows_several_smem_chunks():
  x = make_inputs(n=21, heads=2, d=128)
  out = gather_tpu.gather_rows_tpu(x["table"], x["row_ids"], block_rows=8, ids_per_call=8, interpret=INTERPRET)
  np.testing.assert_array_equal(out, reference.gather_rows(x["table"], x["row_ids"]))


@pytest.mark.parametrize(
  "branches,dtype,gate,dim,block_d",
  [
    (1, jnp.float32, "reference", 128, None),  # one D tile
    (4, jnp.float32, "paper", 256, 128),  # two D tiles
    (4, jnp.bfloat16, "reference", 256, 128),
  ],
)
def test_gather_gate_forward_and_grads(branches, dtype, gate, dim, block_d):
  # 13 tokens: not a multiple of the 8-token block.
  x = make_inputs(n=13, heads=2, d=128, dim=dim, branches=branches, dtype=dtype)
  fused = lambda *a: pk.gather_gate(*a, gate=gate, impl="pallas", backend="tpu", block_d=block_d, interpret=INTERPRET)
  (u, g), grads = loss_and_grads(fused, x)
  (u_r, g_r), grads_r = loss_and_grads(reference_gather_gate(gate), x)
  assert u.dtype == u_r.dtype == dtype and g.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(u_r, np.float32), **tol(dtype))
  np.testing.assert_allclose(g, g_r, **tol(dtype))
  for name in grads_r:
    np.testing.assert_allclose(
      np.asarray(grads[name], np.float32), np.asarray(grads_r[name], np.float32), **tol(dtype), err_msg=name
    )


def test_block_shape_errors():
  x = make_inputs(n=3, heads=2, d=128, dim=256)
  with pytest.raises(ValueError, match="multiple of 8"):
    gather_tpu.gather_rows_tpu(x["table"], x["row_ids"], block_rows=4, interpret=INTERPRET)
  args = [x[k] for k in ("table", "row_ids", "w_value", "b_value", "w_key", "b_key", "query_normed", "key_norm_scale")]
  with pytest.raises(ValueError, match="block_d"):
    gather_tpu.gather_gate_tpu(*args, block_d=64, interpret=INTERPRET)


def test_kernels_lower_to_mosaic_tpu_at_paper_head_dim():
  from jax._src.mesh import AbstractDevice, AbstractMesh

  n, heads, d, dim, branches = 16, 16, 80, 512, 4
  bf = jnp.bfloat16
  args = (
    jnp.zeros((1000, d), bf),
    jnp.zeros((n, heads), jnp.int32),
    jnp.zeros((heads * d, dim), bf),
    jnp.zeros((dim,), bf),
    jnp.zeros((branches, heads * d, dim), bf),
    jnp.zeros((branches, dim), bf),
    jnp.zeros((n, branches, dim), bf),
    jnp.zeros((branches, dim), bf),
  )
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    fused = jax.jit(lambda *a: gather_tpu.gather_gate_tpu(*a, block_d=256)).trace(*args)
    gather = jax.jit(gather_tpu.gather_rows_tpu).trace(*args[:2])
    for traced in (fused, gather):
      assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()
