"""Causal grouped-query attention with RoPE, packed-sequence masking and a KV cache.

Shapes (B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads,
Dh head dim; H is a multiple of K and query head h reads kv head h // (H // K)):
  x            [B, T, D]
  positions    [B, T] int           RoPE positions
  segment_ids  [B, T] int | None    packed documents; see `Attention.__call__`
  q_proj       [D, H, Dh]           logical axes ("embed", "heads", "head_dim")
  k_proj/v_proj[D, K, Dh]           ("embed", "kv_heads", "head_dim")
  o_proj       [H, Dh, D]           ("heads", "head_dim", "embed")
  KVCache.k/v  [B, S, K, Dh], KVCache.lengths [B] int32
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.layers.params import annotated
from engram_jax.layers.rope import apply_rope


@flax.struct.dataclass
class KVCache:
  """Per-layer key/value cache.

  k, v: [B, S, K, Dh] (keys already rotated by RoPE).
  lengths: [B] int32, number of valid entries of each sequence; slots >= lengths[b]
    hold stale data and are never attended to.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    """S, the slots per sequence (the second axis of `k` and `v`)."""
    return self.k.shape[1]


def _write_at_offsets(buffer: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
  """Writes new [B, T, ...] into buffer [B, S, ...] at rows offsets[b] + t.

  Writes that land past S are dropped (not clamped to the end, which would
  overwrite valid entries).
  """
  t = new.shape[1]
  rows = offsets[:, None] + jnp.arange(t, dtype=offsets.dtype)[None, :]  # [B, T]
  batch = jnp.arange(new.shape[0])[:, None]  # [B, 1]
  return buffer.at[batch, rows].set(new.astype(buffer.dtype), mode="drop")


class Attention(nnx.Module):
  """Multi-head causal attention with grouped KV heads (GQA) and RoPE.

  Attention runs through `jax.nn.dot_product_attention(implementation=...)`. The
  default None lets JAX choose the kernel (as of jax 0.11.2 it still picks XLA; pass
  implementation="cudnn" to force cuDNN flash attention on NVIDIA GPUs).
  """

  def __init__(
    self,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    rope_theta: float = 10000.0,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    if implementation not in (None, "xla", "cudnn"):
      raise ValueError(f"implementation must be None, 'xla' or 'cudnn', got {implementation!r}")
    for name, value in (
      ("hidden_size", hidden_size),
      ("num_heads", num_heads),
      ("num_kv_heads", num_kv_heads),
      ("head_dim", head_dim),
    ):
      if value <= 0:
        raise ValueError(f"Attention {name} must be positive, got {value}")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    self.hidden_size = hidden_size
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_theta = rope_theta
    self.dtype = dtype
    self.implementation = implementation

    def param(names, shape, in_axis, out_axis):
      # LeCun normal over the contracted (fan-in) axes.
      init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)
      return annotated(init(rngs.params(), shape, param_dtype), names)

    d, h, k, dh = hidden_size, num_heads, num_kv_heads, head_dim
    self.q_proj = param(("embed", "heads", "head_dim"), (d, h, dh), 0, (1, 2))
    self.k_proj = param(("embed", "kv_heads", "head_dim"), (d, k, dh), 0, (1, 2))
    self.v_proj = param(("embed", "kv_heads", "head_dim"), (d, k, dh), 0, (1, 2))
    self.o_proj = param(("heads", "head_dim", "embed"), (h, dh, d), (0, 1), 2)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
    """An empty cache of max_len slots per sequence (dtype defaults to self.dtype)."""
    if batch <= 0 or max_len <= 0:
      raise ValueError(f"init_cache needs positive batch and max_len, got {batch}, {max_len}")
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    dtype = self.dtype if dtype is None else dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Attends causally; returns (y [B, T, D], updated cache or None).

    Without a cache: token i attends to tokens j <= i with
    segment_ids[j] == segment_ids[i] (packed sequences; all one segment if None).

    With a cache: the T new tokens of sequence b are written at slots
    lengths[b] .. lengths[b] + T - 1; each attends to the lengths[b] valid cached
    entries and causally to the new tokens before it. Here segment_ids, if given,
    marks padding: new tokens are right-padded and those with segment_ids == 0 are
    not counted, so lengths[b] grows by the number of nonzero ids (this lets a
    batch of prompts of different lengths be prefilled together). The caller must
    keep lengths[b] + T <= S; writes past S are dropped.
    """
    b, t, d = x.shape
    if d != self.hidden_size:
      raise ValueError(f"Attention expects hidden size {self.hidden_size}, got x {x.shape}")
    if positions.shape != (b, t):
      raise ValueError(f"positions shape {positions.shape} must be [B, T] = {(b, t)}")
    if segment_ids is not None and segment_ids.shape != (b, t):
      raise ValueError(f"segment_ids shape {segment_ids.shape} must be [B, T] = {(b, t)}")

    x = x.astype(self.dtype)
    q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(self.dtype))
    k = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(self.dtype))
    v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(self.dtype))
    q = apply_rope(q, positions, theta=self.rope_theta)
    k = apply_rope(k, positions, theta=self.rope_theta)

    if cache is None:
      mask = None
      if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B,1,T,T]
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=self.implementation)
      new_cache = None
    else:
      out, new_cache = self._attend_with_cache(q, k, v, segment_ids, cache)

    y = jnp.einsum("bthk,hkd->btd", out, self.o_proj[...].astype(self.dtype))
    return y, new_cache

  def _attend_with_cache(self, q, k, v, segment_ids, cache: KVCache):
    b, t = q.shape[:2]
    if cache.k.shape[0] != b or cache.k.shape[2:] != (self.num_kv_heads, self.head_dim):
      raise ValueError(
        f"cache k shape {cache.k.shape} does not match batch {b}, "
        f"kv_heads {self.num_kv_heads}, head_dim {self.head_dim}"
      )
    s = cache.max_len
    if t > s:
      raise ValueError(f"{t} new tokens do not fit in a cache of {s} slots")
    offsets = cache.lengths.astype(jnp.int32)
    k_all = _write_at_offsets(cache.k, k, offsets)
    v_all = _write_at_offsets(cache.v, v, offsets)
    if segment_ids is None:
      num_new = jnp.full((b,), t, jnp.int32)
    else:
      num_new = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
    new_cache = KVCache(k=k_all, v=v_all, lengths=offsets + num_new)

    # New token i of sequence b sits at slot offsets[b] + i and sees slots <= it.
    query_slot = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    key_slot = jnp.arange(s, dtype=jnp.int32)  # [S]
    mask = (key_slot[None, None, :] <= query_slot[:, :, None])[:, None]  # [B,1,T,S]
    out = jax.nn.dot_product_attention(
      q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask=mask, implementation=self.implementation
    )
    return out, new_cache
