"""Manifold-constrained hyper-connections: Sinkhorn projection, G = 1 reduction, init, mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers.hyper_connections import (
  HyperConnection,
  collapse_streams,
  expand_streams,
  sinkhorn,
)

D = 16


def _streams(g, key=0, b=2, t=5):
  return jax.random.normal(jax.random.key(key), (b, t, g, D))


def _sublayer(h):
  # A fixed nonlinear map [B,T,D] -> [B,T,D], standing in for attention / FFN.
  w = jax.random.normal(jax.random.key(42), (D, D)) / np.sqrt(D)
  return jnp.tanh(h @ w)


def test_sinkhorn_is_doubly_stochastic():
  logits = 3.0 * jax.random.normal(jax.random.key(0), (7, 4, 4))
  project = jax.jit(sinkhorn, static_argnums=1)
  m = np.asarray(project(logits, 100))
  assert (m > 0).all()
  np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-6)  # columns: exact after last step
  np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)  # rows: converged
  # Rows converge with the iteration count (far from it after one round on such logits).
  row_error = [np.abs(np.asarray(project(logits, n)).sum(-1) - 1).max() for n in (1, 5, 20)]
  assert row_error[0] > row_error[1] > row_error[2] and row_error[0] > 0.1


def test_g1_is_exactly_a_plain_residual():
  hc = HyperConnection(D, 1, rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(hc, nnx.Param))  # no parameters at all
  x = _streams(1)
  h_in, mix = hc.pre(x)
  np.testing.assert_array_equal(h_in, x[:, :, 0])
  assert mix is None
  out = hc(x, _sublayer)
  want = x[:, :, 0] + _sublayer(x[:, :, 0])
  np.testing.assert_array_equal(out[:, :, 0], want)  # bitwise, not approximately


@pytest.mark.parametrize("g", [2, 4])
def test_mixing_matrices_respect_their_constraints(g):
  hc = HyperConnection(D, g, alpha_init=1.0, sinkhorn_iters=100, rngs=nnx.Rngs(1))
  h_pre, h_post, h_res = (np.asarray(a) for a in nnx.jit(lambda m, x: m.mixing(x))(hc, 3.0 * _streams(g)))
  assert h_pre.shape == (2, 5, g) and h_post.shape == (2, 5, g) and h_res.shape == (2, 5, g, g)
  assert ((h_pre > 0) & (h_pre < 1)).all()
  assert ((h_post > 0) & (h_post < 2)).all()
  np.testing.assert_allclose(h_res.sum(-2), 1.0, atol=1e-5)
  np.testing.assert_allclose(h_res.sum(-1), 1.0, atol=1e-3)
  # The dynamic part makes the matrices token-dependent.
  assert np.abs(h_res[0, 0] - h_res[1, 3]).max() > 1e-4


@pytest.mark.parametrize("g", [2, 4])
def test_init_starts_near_a_plain_residual(g):
  hc = HyperConnection(D, g, rngs=nnx.Rngs(2))
  x1 = _streams(1)[:, :, 0]
  streams = expand_streams(x1, g)
  out = hc(streams, _sublayer)
  want = x1 + _sublayer(x1)
  for s in range(g):
    np.testing.assert_allclose(out[:, :, s], want, atol=0.05)
  # Without the dynamic part (alpha = 0) equal streams follow the plain residual closely.
  hc.alpha[...] = jnp.zeros(3)
  out = hc(streams, _sublayer)
  for s in range(g):
    np.testing.assert_allclose(out[:, :, s], want, atol=1e-3)
  np.testing.assert_allclose(collapse_streams(out), want, atol=1e-3)


def test_streams_are_mixed_and_parameters_get_gradients():
  g = 4
  hc = HyperConnection(D, g, rngs=nnx.Rngs(3))
  x = _streams(g)
  # Different streams in, the identity-near H_res keeps them apart but mixes a little.
  out = hc(x, _sublayer)
  residual_only = x + _sublayer(jnp.einsum("btgd->btd", x) / g)[:, :, None]
  assert np.abs(np.asarray(out - residual_only)).max() > 1e-3

  def loss(module):
    return jnp.sum(module(x, _sublayer) ** 2)

  grads = nnx.grad(loss)(hc)
  for name in ("phi", "bias", "alpha"):
    assert np.abs(np.asarray(getattr(grads, name)[...])).max() > 0, name


def test_expand_collapse_and_shape_errors():
  x = jax.random.normal(jax.random.key(0), (2, 3, D))
  s = expand_streams(x, 3)
  assert s.shape == (2, 3, 3, D)
  np.testing.assert_allclose(collapse_streams(s), x, rtol=1e-6)
  hc = HyperConnection(D, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="streams"):
    hc.pre(_streams(3))
  with pytest.raises(ValueError, match="hc_mult"):
    HyperConnection(D, 0, rngs=nnx.Rngs(0))
