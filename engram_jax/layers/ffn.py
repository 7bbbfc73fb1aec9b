"""SwiGLU feed-forward block: y = (silu(x W_gate) * (x W_up)) W_down.

Shapes:
  x       [..., D]      D = hidden_size
  w_gate  [D, F]        logical axes ("embed", "mlp"), F = ffn_hidden
  w_up    [D, F]        ("embed", "mlp")
  w_down  [F, D]        ("mlp", "embed")
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.layers.params import annotated

default_kernel_init = nnx.initializers.lecun_normal()


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """The SwiGLU map for x [..., D] and weights [D, F], [D, F], [F, D] -> [..., D]."""
  hidden = jax.nn.silu(x @ w_gate) * (x @ w_up)
  return hidden @ w_down


class SwiGLU(nnx.Module):
  """Gated feed-forward block (LLaMA / DeepSeek style), no biases."""

  def __init__(
    self,
    hidden_size: int,
    ffn_hidden: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    kernel_init: nnx.Initializer = default_kernel_init,
    rngs: nnx.Rngs,
  ):
    if hidden_size <= 0 or ffn_hidden <= 0:
      raise ValueError(f"SwiGLU sizes must be positive, got hidden_size={hidden_size}, ffn_hidden={ffn_hidden}")
    self.hidden_size = hidden_size
    self.ffn_hidden = ffn_hidden
    self.dtype = dtype
    d, f = hidden_size, ffn_hidden
    self.w_gate = annotated(kernel_init(rngs.params(), (d, f), param_dtype), ("embed", "mlp"))
    self.w_up = annotated(kernel_init(rngs.params(), (d, f), param_dtype), ("embed", "mlp"))
    self.w_down = annotated(kernel_init(rngs.params(), (f, d), param_dtype), ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D] in self.dtype."""
    if x.shape[-1] != self.hidden_size:
      raise ValueError(f"SwiGLU expects last dim {self.hidden_size}, got input shape {x.shape}")
    weights = (w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
    return swiglu(x.astype(self.dtype), *weights)
