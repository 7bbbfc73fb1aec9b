"""Manifold-constrained hyper-connections (mHC): G residual streams mixed by learned matrices.

Shapes (B batch, T tokens, G streams = hc_mult, D hidden):
  x (streams)   [B, T, G, D]
  h_in          [B, T, D]        input of the wrapped sublayer F: H_pre x
  y = F(h_in)   [B, T, D]
  x'            [B, T, G, D]     H_res x + H_post^T y

Per token, from the RMS-normalised flattened streams u = rms(vec(x)) [G*D]:
  H_pre  = sigmoid(alpha_pre  * (u @ phi_pre)  + b_pre)          [G]    positive
  H_post = 2 * sigmoid(alpha_post * (u @ phi_post) + b_post)     [G]    in (0, 2)
  H_res  = Sinkhorn(alpha_res * (u @ phi_res) + b_res)           [G, G] doubly stochastic
Sinkhorn: exp (shifted by the max for stability), then `sinkhorn_iters` rounds of row
normalisation followed by column normalisation (so columns sum to exactly 1, rows to ~1).
The mixing coefficients are computed in float32.

Initialisation: b_pre = logit(1/G), b_post = 0, b_res = 0 on the diagonal and
`res_offdiag_init` off it, alpha = `alpha_init`, phi ~ N(0, 1/(G*D)). When the streams are
equal copies (as after `expand_streams`), H_pre x = x, H_post = 1 and any doubly stochastic
H_res leaves them equal, so at init (up to the small dynamic part) every stream follows a
plain pre-norm residual network.

G = 1 is exactly a plain residual: no parameters, h_in = x[:, :, 0], x' = x + y.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.layers.params import annotated


def expand_streams(x: jax.Array, hc_mult: int) -> jax.Array:
  """Embedding output [B, T, D] -> G identical streams [B, T, G, D]."""
  return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], hc_mult, x.shape[-1]))


def collapse_streams(x: jax.Array) -> jax.Array:
  """Streams [B, T, G, D] -> [B, T, D] by the MEAN over streams (equal copies collapse to
  themselves, so G streams at init match a G = 1 network's scale)."""
  return jnp.mean(x, axis=2)


def sinkhorn(logits: jax.Array, iters: int) -> jax.Array:
  """Projects logits [..., G, G] onto (approximately) doubly stochastic matrices.

  exp(logits - max), then `iters` rounds of row then column normalisation.
  """
  m = jnp.exp(logits - jnp.max(logits, axis=(-2, -1), keepdims=True))

  def normalise(_, m):
    m = m / jnp.sum(m, axis=-1, keepdims=True)
    return m / jnp.sum(m, axis=-2, keepdims=True)

  # A loop, not Python unrolling: keeps the compiled graph small (static trip count, so
  # it stays reverse-differentiable).
  return jax.lax.fori_loop(0, iters, normalise, m)


class HyperConnection(nnx.Module):
  """mHC around one sublayer: `pre` builds its input, `post` merges its output back.

  Usage:
      h_in, mix = hc.pre(x)            # x [B,T,G,D] -> h_in [B,T,D]
      y = sublayer(norm(h_in))
      x = hc.post(x, y, mix)           # -> [B,T,G,D]
  """

  def __init__(
    self,
    hidden_size: int,
    hc_mult: int,
    *,
    sinkhorn_iters: int = 20,
    alpha_init: float = 0.01,
    res_offdiag_init: float = -4.0,
    eps: float = 1e-6,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if hidden_size <= 0:
      raise ValueError(f"HyperConnection hidden_size must be positive, got {hidden_size}")
    if not isinstance(hc_mult, int) or hc_mult < 1:
      raise ValueError(f"HyperConnection hc_mult must be an int >= 1, got {hc_mult!r}")
    if sinkhorn_iters < 1:
      raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
    self.hidden_size, self.hc_mult = hidden_size, hc_mult
    self.sinkhorn_iters, self.eps, self.dtype = sinkhorn_iters, eps, dtype
    if hc_mult == 1:
      return
    g, d = hc_mult, hidden_size
    n_mix = 2 * g + g * g  # pre [G] | post [G] | res [G*G]
    phi = nnx.initializers.normal(stddev=1.0 / math.sqrt(g * d))(rngs.params(), (g * d, n_mix), param_dtype)
    self.phi = annotated(phi, ("hc_embed", "hc_mix"))
    b_pre = jnp.full((g,), math.log(1.0 / (g - 1)), param_dtype)  # sigmoid(b) = 1/G
    b_post = jnp.zeros((g,), param_dtype)  # 2 sigmoid(b) = 1
    b_res = jnp.where(jnp.eye(g, dtype=bool), 0.0, res_offdiag_init).astype(param_dtype)
    bias = jnp.concatenate([b_pre, b_post, b_res.reshape(-1)])
    self.bias = annotated(bias, ("hc_mix",))
    self.alpha = annotated(jnp.full((3,), alpha_init, param_dtype), (None,))

  def mixing(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B,T,G,D] -> float32 (H_pre [B,T,G], H_post [B,T,G], H_res [B,T,G,G])."""
    g, d = self.hc_mult, self.hidden_size
    flat = x.reshape(*x.shape[:-2], g * d).astype(jnp.float32)
    flat = flat * jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) + self.eps)
    dyn = flat @ self.phi[...].astype(jnp.float32)  # [B,T,2G+G^2]
    alpha = self.alpha[...].astype(jnp.float32)
    bias = self.bias[...].astype(jnp.float32)
    scale = jnp.concatenate([jnp.full((g,), alpha[0]), jnp.full((g,), alpha[1]), jnp.full((g * g,), alpha[2])])
    logits = dyn * scale + bias
    h_pre = jax.nn.sigmoid(logits[..., :g])
    h_post = 2.0 * jax.nn.sigmoid(logits[..., g : 2 * g])
    h_res = sinkhorn(logits[..., 2 * g :].reshape(*logits.shape[:-1], g, g), self.sinkhorn_iters)
    return h_pre, h_post, h_res

  def pre(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Streams [B,T,G,D] -> (sublayer input [B,T,D], mix state for `post`)."""
    if x.ndim != 4 or x.shape[2:] != (self.hc_mult, self.hidden_size):
      raise ValueError(f"HyperConnection expects streams [B, T, {self.hc_mult}, {self.hidden_size}], got {x.shape}")
    if self.hc_mult == 1:
      return x[:, :, 0, :], None
    h_pre, h_post, h_res = self.mixing(x)
    h_in = jnp.einsum("btg,btgd->btd", h_pre.astype(x.dtype), x)
    return h_in, (h_post, h_res)

  def post(self, x: jax.Array, y: jax.Array, mix: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """x' = H_res x + H_post^T y: streams [B,T,G,D], y [B,T,D] -> [B,T,G,D]."""
    if self.hc_mult == 1:
      return x + y[:, :, None, :].astype(x.dtype)
    h_post, h_res = mix
    mixed = jnp.einsum("btij,btjd->btid", h_res.astype(x.dtype), x)
    return mixed + h_post.astype(x.dtype)[..., None] * y[:, :, None, :].astype(x.dtype)

  def __call__(self, x: jax.Array, sublayer) -> jax.Array:
    """Applies `sublayer` ([B,T,D] -> [B,T,D]) through the hyper-connection."""
    h_in, mix = self.pre(x)
    return self.post(x, sublayer(h_in), mix)
