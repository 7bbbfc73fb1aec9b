"""SwiGLU feed-forward block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers.ffn import SwiGLU


def _rngs(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU; keeps the tests quick.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_swiglu_matches_numpy_formula():
  ffn = SwiGLU(16, 24, rngs=_rngs(0))
  x = np.random.default_rng(1).standard_normal((2, 3, 16))
  wg, wu, wd = (np.asarray(w[...], np.float64) for w in (ffn.w_gate, ffn.w_up, ffn.w_down))
  gate = x @ wg
  expected = (gate / (1 + np.exp(-gate)) * (x @ wu)) @ wd
  np.testing.assert_allclose(ffn(jnp.asarray(x, jnp.float32)), expected, rtol=1e-5, atol=1e-5)


def test_swiglu_logical_axes_and_shapes():
  ffn = SwiGLU(16, 24, rngs=_rngs(0))
  assert ffn.w_gate.shape == (16, 24) and ffn.w_down.shape == (24, 16)
  assert ffn.w_gate.out_sharding == ("embed", "mlp")
  assert ffn.w_up.out_sharding == ("embed", "mlp")
  assert ffn.w_down.out_sharding == ("mlp", "embed")


def test_swiglu_compute_dtype():
  ffn = SwiGLU(16, 8, dtype=jnp.bfloat16, rngs=_rngs(0))
  assert ffn.w_up.dtype == jnp.float32
  assert ffn(jnp.ones((2, 16))).dtype == jnp.bfloat16


def test_swiglu_rejects_bad_sizes_and_inputs():
  with pytest.raises(ValueError, match="ffn_hidden=0"):
    SwiGLU(16, 0, rngs=_rngs(0))
  ffn = SwiGLU(16, 8, rngs=_rngs(0))
  with pytest.raises(ValueError, match="last dim 16"):
    ffn(jnp.ones((2, 15)))
