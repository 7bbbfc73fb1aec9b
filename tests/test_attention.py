"""RoPE and causal GQA attention: reference, packing, GQA, KV-cache decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers.attention import Attention, KVCache
from engram_jax.layers.rope import apply_rope

D, H, KV, DH = 16, 4, 2, 8


def _rngs(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU; keeps the tests quick.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def attn():
  return Attention(D, H, KV, DH, rngs=_rngs(0))


# Jitted: one compile per input signature is much cheaper than op-by-op eager compiles.
forward = nnx.jit(lambda module, *args, **kwargs: module(*args, **kwargs))


def _positions(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _numpy_rope(x, positions, theta=10000.0):
  half = x.shape[-1] // 2
  angle = positions[..., None, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def _reference_attention(attn, x, positions, segment_ids):
  """Straightforward float64 NumPy attention, kv heads expanded by repetition."""
  x = np.asarray(x, np.float64)
  wq, wk, wv, wo = (np.asarray(p[...], np.float64) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
  q = _numpy_rope(np.einsum("btd,dhk->bthk", x, wq), np.asarray(positions))
  k = _numpy_rope(np.einsum("btd,dhk->bthk", x, wk), np.asarray(positions))
  v = np.einsum("btd,dhk->bthk", x, wv)
  groups = attn.num_heads // attn.num_kv_heads
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(attn.head_dim)
  t = x.shape[1]
  seg = np.asarray(segment_ids)
  allowed = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  logits = np.where(allowed[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", probs, v)
  return np.einsum("bqhk,hkd->bqd", out, wo)


# ---- RoPE -------------------------------------------------------------------


def test_rope_is_identity_at_zero_and_preserves_norm():
  x = _normal(0, (2, 5, 3, 8))
  np.testing.assert_allclose(apply_rope(x, jnp.zeros((2, 5), jnp.int32)), x)
  rotated = apply_rope(x, _positions(2, 5) * 7)
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  assert not np.allclose(rotated, x)


def test_rope_scores_depend_only_on_relative_position():
  q = _normal(1, (1, 1, 1, 8))
  k = _normal(2, (1, 1, 1, 8))

  def score(m, n):
    rq = apply_rope(q, jnp.full((1, 1), m), theta=100.0)
    rk = apply_rope(k, jnp.full((1, 1), n), theta=100.0)
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-4)
  assert abs(score(5, 2) - score(5, 4)) > 1e-4


def test_rope_rejects_bad_shapes():
  with pytest.raises(ValueError, match="even head_dim"):
    apply_rope(jnp.ones((1, 2, 1, 5)), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="positions shape"):
    apply_rope(jnp.ones((1, 2, 1, 4)), jnp.zeros((1, 3), jnp.int32))


# ---- attention --------------------------------------------------------------


def test_attention_matches_reference_with_packed_segments(attn):
  x = _normal(1, (2, 6, D))
  seg = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]], jnp.int32)
  pos = _positions(2, 6)
  y, cache = forward(attn, x, pos, seg)
  assert cache is None and y.shape == (2, 6, D)
  np.testing.assert_allclose(y, _reference_attention(attn, x, pos, seg), atol=1e-5)


def test_packed_documents_do_not_see_each_other(attn):
  doc_a = _normal(1, (1, 3, D))
  doc_b = _normal(2, (1, 4, D))
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]], jnp.int32)
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3]], jnp.int32)
  y_packed, _ = forward(attn, packed, pos, seg)
  y_a, _ = forward(attn, doc_a, _positions(1, 3))
  y_b, _ = forward(attn, doc_b, _positions(1, 4))
  np.testing.assert_allclose(y_packed, jnp.concatenate([y_a, y_b], axis=1), atol=1e-5)
  # Without segment ids the second document does attend to the first.
  y_unmasked, _ = forward(attn, packed, pos)
  assert not np.allclose(y_unmasked[:, 3:], y_b, atol=1e-3)


def test_gqa_equals_expanded_multi_head_attention(attn):
  gqa = attn
  mha = Attention(D, H, H, DH, rngs=_rngs(1))
  groups = H // KV
  # Query head h reads kv head h // groups: repeat each kv head `groups` times.
  mha.q_proj[...] = gqa.q_proj[...]
  mha.o_proj[...] = gqa.o_proj[...]
  mha.k_proj[...] = jnp.repeat(gqa.k_proj[...], groups, axis=1)
  mha.v_proj[...] = jnp.repeat(gqa.v_proj[...], groups, axis=1)
  x = _normal(2, (2, 5, D))
  pos = _positions(2, 5)
  np.testing.assert_allclose(forward(gqa, x, pos)[0], forward(mha, x, pos)[0], atol=1e-5)


def test_prefill_then_decode_matches_full_forward_for_ragged_prompts(attn):
  total, prompt_lens, prefill_len, steps = 9, np.array([3, 5]), 5, 4
  x_full = _normal(1, (2, total, D))
  y_full, _ = forward(attn, x_full, _positions(2, total))

  # Prefill: right-padded prompts; the padding holds garbage that must stay masked.
  garbage = 100.0 * _normal(2, (2, prefill_len, D))
  valid = np.arange(prefill_len)[None, :] < prompt_lens[:, None]
  x_prefill = jnp.where(valid[..., None], x_full[:, :prefill_len], garbage)
  cache = attn.init_cache(2, max_len=10)
  assert isinstance(cache, KVCache) and cache.k.shape == (2, 10, KV, DH)
  y_prefill, cache = forward(attn, x_prefill, _positions(2, prefill_len), jnp.asarray(valid, jnp.int32), cache=cache)
  np.testing.assert_array_equal(cache.lengths, prompt_lens)
  for b, n in enumerate(prompt_lens):
    np.testing.assert_allclose(y_prefill[b, :n], y_full[b, :n], atol=1e-5)

  for step in range(steps):
    at = np.asarray(cache.lengths)
    x_step = x_full[jnp.arange(2), at][:, None]  # [B, 1, D]
    y_step, cache = forward(attn, x_step, jnp.asarray(at)[:, None], cache=cache)
    for b in range(2):
      np.testing.assert_allclose(y_step[b, 0], y_full[b, at[b]], atol=1e-5, err_msg=f"step {step}, sequence {b}")
  np.testing.assert_array_equal(cache.lengths, prompt_lens + steps)


def test_cache_without_segment_ids_counts_all_tokens(attn):
  x = _normal(1, (2, 4, D))
  cache = attn.init_cache(2, 6)
  y, cache = forward(attn, x, _positions(2, 4), cache=cache)
  np.testing.assert_array_equal(cache.lengths, [4, 4])
  np.testing.assert_allclose(y, forward(attn, x, _positions(2, 4))[0], atol=1e-5)
  with pytest.raises(ValueError, match="do not fit"):
    forward(attn, jnp.ones((2, 7, D)), _positions(2, 7), cache=attn.init_cache(2, 6))


def test_attention_params_are_annotated(attn):
  assert attn.q_proj.out_sharding == ("embed", "heads", "head_dim")
  assert attn.k_proj.out_sharding == ("embed", "kv_heads", "head_dim")
  assert attn.v_proj.out_sharding == ("embed", "kv_heads", "head_dim")
  assert attn.o_proj.out_sharding == ("heads", "head_dim", "embed")


@pytest.mark.parametrize(
  "args, kwargs, message",
  [
    ((D, 4, 3, DH), {}, "multiple of num_kv_heads"),
    ((D, 4, 2, 7), {}, "even"),
    ((D, 0, 1, DH), {}, "num_heads must be positive"),
    ((D, H, KV, DH), {"implementation": "flash"}, "implementation"),
  ],
)
def test_attention_rejects_bad_config(args, kwargs, message):
  with pytest.raises(ValueError, match=message):
    Attention(*args, **kwargs, rngs=_rngs(0))
