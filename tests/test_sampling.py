"""Sampling: greedy / temperature 0 is argmax, draws are deterministic per key, top-k never
leaves the k largest (ties included), top-p keeps the smallest set with mass >= p (after
top-k), and temperature reshapes the distribution as softmax(logits / T)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.inference import SamplingConfig, sample

N = 4000  # draws per distribution (rows of one batch, one key)
_sample = jax.jit(sample, static_argnames="config")


def draws(logits, config, seed=0):
  """N independent draws from one row of logits [V] -> int np [N]."""
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, len(logits)))
  return np.asarray(_sample(batch, jax.random.key(seed), config))


def frequencies(ids, vocab):
  return np.bincount(ids, minlength=vocab) / len(ids)


def test_greedy_and_zero_temperature_are_argmax():
  logits = jax.random.normal(jax.random.key(0), (6, 50))
  want = np.asarray(jnp.argmax(logits, -1))
  for config in (SamplingConfig(greedy=True, temperature=2.0, top_k=3), SamplingConfig(temperature=0.0)):
    got = _sample(logits, jax.random.key(1), config)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)


def test_deterministic_per_key():
  logits = jnp.zeros((64, 100))
  config = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)
  a = _sample(logits, jax.random.key(3), config)
  np.testing.assert_array_equal(a, _sample(logits, jax.random.key(3), config))
  assert (np.asarray(a) != np.asarray(_sample(logits, jax.random.key(4), config))).any()


def test_top_k_stays_in_the_k_largest_even_with_ties():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=40)
  ids = draws(logits, SamplingConfig(temperature=5.0, top_k=5))
  allowed = set(np.argsort(-logits)[:5].tolist())
  assert set(ids.tolist()) == allowed  # all k reachable, nothing else
  tied = np.array([0.0, 5.0, 3.0, 3.0, 3.0, 3.0, 4.0, -1.0])
  ids = draws(tied, SamplingConfig(temperature=10.0, top_k=3))
  seen = set(ids.tolist())
  assert len(seen) == 3 and {1, 6} < seen <= {1, 2, 3, 4, 5, 6}


@pytest.mark.parametrize("top_p,kept", [(0.3, [3]), (0.7, [3, 0]), (0.85, [3, 0, 1]), (1.0, [3, 0, 1, 2])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
  probs = np.array([0.3, 0.15, 0.05, 0.5])  # sorted: 3, 0, 1, 2
  ids = draws(np.log(probs), SamplingConfig(top_p=top_p))
  freq = frequencies(ids, 4)
  assert set(np.flatnonzero(freq).tolist()) == set(kept)
  want = np.zeros(4)
  want[kept] = probs[kept] / probs[kept].sum()  # renormalized over the kept set
  np.testing.assert_allclose(freq, want, atol=0.03)


def test_top_p_applies_to_the_top_k_renormalized():
  probs = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
  # Alone, p = 0.5 needs two tokens (0.4 < 0.5); after top-2 the first has 4/7 >= 0.5.
  assert set(draws(probs, SamplingConfig(top_p=0.5)).tolist()) == {0, 1}
  assert set(draws(probs, SamplingConfig(top_k=2, top_p=0.5)).tolist()) == {0}


def test_temperature_scales_the_distribution():
  logits = np.array([0.0, 1.0, 2.0])
  for t in (0.5, 2.0):
    freq = frequencies(draws(logits, SamplingConfig(temperature=t), seed=5), 3)
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits / t)), atol=0.03)


def test_invalid_configs_and_shapes():
  for kw, match in (
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
  ):
    with pytest.raises(ValueError, match=match):
      SamplingConfig(**kw)
  with pytest.raises(ValueError, match=r"logits \[B, V\]"):
    sample(jnp.zeros((5,)), jax.random.key(0), SamplingConfig())
