"""RMSNorm (NNX) and its functional form."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.layers.params import annotated


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * scale over the last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis with a learned scale (init 1).

  Args:
    dim: size of the normalized axis.
    eps: added to the mean square.
    leading: optional leading shape of independent scales (e.g. (G,) for one norm per
      residual branch); `axis_names` must then name every axis of the scale.
  """

  def __init__(
    self,
    dim: int,
    *,
    eps: float = 1e-6,
    leading: Sequence[int] = (),
    axis_names: Sequence[str | None] | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    del rngs  # deterministic init; kept for a uniform constructor signature
    shape = tuple(leading) + (dim,)
    names = tuple(axis_names) if axis_names is not None else (None,) * len(leading) + ("norm",)
    if len(names) != len(shape):
      raise ValueError(f"RMSNorm axis_names {names} do not match scale shape {shape}")
    self.scale = annotated(jnp.ones(shape, param_dtype), names)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., dim] (leading axes ending in the scale's `leading` shape) -> the same shape, layer dtype."""
    return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)
