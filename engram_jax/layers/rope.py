"""Rotary position embedding (RoPE), rotate-half convention.

Shapes:
  x          [B, T, H, Dh]   queries or keys (Dh even)
  positions  [B, T] int      absolute position of each token
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
  """Inverse frequencies theta^(-2i/Dh) for i in [0, Dh/2): float32 [Dh/2]."""
  if head_dim <= 0 or head_dim % 2:
    raise ValueError(f"RoPE needs a positive even head_dim, got {head_dim}")
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return jnp.asarray(theta, jnp.float32) ** -exponent


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
  """Rotates the pairs (x[..., i], x[..., i + Dh/2]) by angle positions * freq_i.

  Computed in float32, returned in x.dtype.

  Args:
    x: [B, T, H, Dh].
    positions: [B, T] integer positions.
    theta: RoPE base.
  Returns:
    [B, T, H, Dh].
  """
  if x.ndim != 4:
    raise ValueError(f"apply_rope expects x of shape [B, T, H, Dh], got {x.shape}")
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions shape {positions.shape} must equal x's [B, T] = {x.shape[:2]}")
  freqs = rope_frequencies(x.shape[-1], theta)  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
