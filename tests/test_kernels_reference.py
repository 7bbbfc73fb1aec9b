"""The XLA reference path, the custom VJPs (impl="xla"), sparse grads and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference
from tests.test_kernels_common import loss_and_grads, make_inputs


def test_gather_rows_matches_numpy():
  x = make_inputs(n=5, heads=2, d=16)
  out = pk.gather_rows(x["table"], x["row_ids"], impl="xla")
  t, ids = np.asarray(x["table"]), np.asarray(x["row_ids"])
  np.testing.assert_array_equal(np.asarray(out), t[ids].reshape(5, 32))


def test_gate_matches_numpy_formula():
  x = make_inputs(n=4, heads=2, d=16, dim=32, branches=2)
  u, g = reference.gather_gate(
    *[x[k] for k in ("table", "row_ids", "w_value", "b_value", "w_key", "b_key", "query_normed", "key_norm_scale")]
  )
  e = np.asarray(x["table"])[np.asarray(x["row_ids"])].reshape(4, 32).astype(np.float64)
  v = e @ np.asarray(x["w_value"]) + np.asarray(x["b_value"])
  k = np.einsum("nc,gcd->ngd", e, np.asarray(x["w_key"])) + np.asarray(x["b_key"])
  kn = k / np.sqrt(np.mean(k**2, -1, keepdims=True) + 1e-6) * np.asarray(x["key_norm_scale"])
  s = np.sum(np.asarray(x["query_normed"]) * kn, -1) / np.sqrt(32)
  s = np.sign(s) * np.sqrt(np.maximum(np.abs(s), 1e-6))
  a = 1 / (1 + np.exp(-s))
  np.testing.assert_allclose(np.asarray(g), a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(u), a[:, :, None] * v[:, None, :], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", ["reference", "paper"])
def test_xla_custom_vjp_matches_autodiff(gate):
  x = make_inputs(n=6, heads=2, d=16, dim=32, branches=2)
  (u, g), grads = loss_and_grads(lambda *a: pk.gather_gate(*a, gate=gate, impl="xla"), x)
  (u_r, g_r), grads_r = loss_and_grads(lambda *a: reference.gather_gate(*a, gate=gate), x)
  np.testing.assert_allclose(u, u_r, rtol=1e-6)
  for name in grads_r:
    np.testing.assert_allclose(grads[name], grads_r[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_paper_and_reference_gates_differ():
  x = make_inputs(n=6, heads=2, d=16, dim=32)
  args = [x[k] for k in ("table", "row_ids", "w_value", "b_value", "w_key", "b_key", "query_normed", "key_norm_scale")]
  _, g_ref = reference.gather_gate(*args, gate="reference")
  _, g_pap = reference.gather_gate(*args, gate="paper")
  assert float(jnp.max(jnp.abs(g_ref - g_pap))) > 1e-3


def test_table_grad_accumulates_duplicates():
  table = jnp.zeros((6, 2))
  ids = jnp.array([[5, 5], [0, 5]], jnp.int32)
  grad = jax.grad(lambda t: jnp.sum(pk.gather_rows(t, ids, impl="xla")))(table)
  np.testing.assert_array_equal(grad[:, 0], [1, 0, 0, 0, 0, 3])


@pytest.mark.parametrize("max_unique", [None, 16])
def test_sparse_grad_equals_dense(max_unique):
  x = make_inputs(n=7, heads=3, d=8)
  d_rows = jax.random.normal(jax.random.key(3), (7, 24))
  dense = reference.scatter_add_rows(d_rows, x["row_ids"], 37, jnp.float32)
  sparse = jax.jit(pk.gather_rows_sparse_grad, static_argnums=2, static_argnames="max_unique")(
    x["row_ids"], d_rows, 37, max_unique=max_unique
  )
  ids = np.unique(np.asarray(x["row_ids"]))
  assert int(sparse.count) == ids.size
  np.testing.assert_array_equal(np.asarray(sparse.row_ids[: ids.size]), ids)
  assert np.all(np.asarray(sparse.row_ids[ids.size :]) == 37)
  np.testing.assert_allclose(sparse.to_dense(37), dense, rtol=1e-6, atol=1e-6)


def test_sparse_grad_truncation_reports_true_count():
  ids = jnp.array([[0, 1], [2, 3]], jnp.int32)
  sparse = pk.gather_rows_sparse_grad(ids, jnp.ones((2, 2)), 10, max_unique=2)
  assert int(sparse.count) == 4
  np.testing.assert_array_equal(sparse.row_ids, [0, 1])
  np.testing.assert_array_equal(sparse.grads[:, 0], [1, 1])


@pytest.mark.parametrize("bad", [-1, 37])
def test_out_of_range_ids_rejected_when_concrete(bad):
  x = make_inputs(n=3, heads=2, d=8)
  ids = x["row_ids"].at[1, 1].set(bad)
  with pytest.raises(ValueError, match="out of range"):
    pk.gather_rows(x["table"], ids, impl="xla")
  with pytest.raises(ValueError, match="out of range"):
    pk.gather_gate(
      x["table"], ids, *[x[k] for k in ("w_value", "b_value", "w_key", "b_key", "query_normed", "key_norm_scale")]
    )


def test_out_of_range_under_jit_gives_nan_rows_on_xla():
  table = jnp.ones((4, 2))
  out = jax.jit(lambda i: pk.gather_rows(table, i, impl="xla"))(jnp.array([[1, 9]], jnp.int32))
  assert np.all(np.asarray(out[0, :2]) == 1) and np.all(np.isnan(np.asarray(out[0, 2:])))


def test_shape_and_option_errors():
  x = make_inputs(n=3, heads=2, d=8, dim=16)
  args = [x[k] for k in ("table", "row_ids", "w_value", "b_value", "w_key", "b_key", "query_normed", "key_norm_scale")]
  with pytest.raises(ValueError, match="query_normed"):
    pk.gather_gate(*args[:6], args[6][:, :, :8], args[7])
  with pytest.raises(ValueError, match="gate"):
    pk.gather_gate(*args, gate="tanh")
  with pytest.raises(ValueError, match="impl"):
    pk.gather_rows(args[0], args[1], impl="triton")
  with pytest.raises(ValueError, match="integer"):
    pk.gather_rows(args[0], args[1].astype(jnp.float32))


def test_auto_is_xla_on_cpu():
  assert pk.resolve_impl("auto") == ("xla" if jax.default_backend() == "cpu" else "pallas")
