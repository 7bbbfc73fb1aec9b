"""Pure-jnp references for the Engram lookup ops (the "xla" implementation).

Shapes (names used throughout `pallas_kernels`):
  R: table rows, d: row width (head dim), N: tokens, H: heads,
  C = H * d: memory width, D: hidden size, G: residual branches.

  table        [R, d]        any float dtype (f32, bf16)
  row_ids      [N, H] int32  absolute rows (per-head offsets already added)
  w_value      [C, D], b_value [D]
  w_key        [G, C, D], b_key [G, D]
  query_normed [N, G, D]     RMSNorm_q(hidden), computed by the caller
  key_norm_scale [G, D]

All products accumulate in float32 whatever the input dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Gate kinds of `gather_gate`: "reference" (the demo's sigmoid of the signed square root of
#: the score) and "paper" (sigmoid of the score).
GATES = ("reference", "paper")
#: Floor of `abs(s)` inside the "reference" gate's square root (keeps its gradient finite).
SIGNED_SQRT_FLOOR = 1e-6
#: The gate weights of `gather_gate` and `gate_from_rows`, in argument order (after the rows).
GATE_WEIGHTS = ("w_value", "b_value", "w_key", "b_key", "query_normed", "key_norm_scale")


def gather_rows(table: jax.Array, row_ids: jax.Array) -> jax.Array:
  """table [R, d], row_ids [N, H] -> [N, H*d] in table.dtype.

  Out-of-range ids give NaN rows (jnp.take mode="fill"); the op wrappers reject
  them earlier when the ids are concrete.
  """
  n, h = row_ids.shape
  rows = jnp.take(table, row_ids.reshape(-1), axis=0, mode="fill")
  return rows.reshape(n, h * table.shape[1])


def scatter_add_rows(d_rows: jax.Array, row_ids: jax.Array, num_rows: int, dtype) -> jax.Array:
  """Transpose of gather_rows: d_rows [N, H*d] -> dense table grad [R, d].

  Duplicate ids accumulate (in float32); out-of-range ids are dropped.
  """
  n, h = row_ids.shape
  d = d_rows.shape[1] // h
  upd = d_rows.reshape(n * h, d).astype(jnp.float32)
  grad = jnp.zeros((num_rows, d), jnp.float32)
  grad = grad.at[row_ids.reshape(-1)].add(upd, mode="drop")
  return grad.astype(dtype)


def signed_sqrt(s: jax.Array) -> jax.Array:
  """The reference demo's gate shaping: `sign(s) * sqrt(max(abs(s), 1e-6))`, elementwise, any shape."""
  return jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), SIGNED_SQRT_FLOOR))


def gate_from_rows(
  rows: jax.Array,
  w_value: jax.Array,
  b_value: jax.Array,
  w_key: jax.Array,
  b_key: jax.Array,
  query_normed: jax.Array,
  key_norm_scale: jax.Array,
  *,
  gate: str = "reference",
  norm_eps: float = 1e-6,
  out_dtype=None,
) -> tuple[jax.Array, jax.Array]:
  """Projection + gate given gathered rows [N, C] -> (u [N, G, D], gates [N, G] f32)."""
  if gate not in GATES:
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
  if out_dtype is None:
    out_dtype = jnp.result_type(rows.dtype, w_value.dtype)
  f32 = jnp.float32
  dim = w_value.shape[-1]
  v = jnp.dot(rows, w_value, preferred_element_type=f32) + b_value.astype(f32)
  k = jnp.einsum("nc,gcd->ngd", rows, w_key, preferred_element_type=f32)
  k = k + b_key.astype(f32)
  kn = k * jax.lax.rsqrt(jnp.mean(k * k, axis=-1, keepdims=True) + norm_eps)
  kn = kn * key_norm_scale.astype(f32)
  s = jnp.sum(query_normed.astype(f32) * kn, axis=-1) / jnp.sqrt(f32(dim))
  if gate == "reference":
    s = signed_sqrt(s)
  alpha = jax.nn.sigmoid(s)
  u = alpha[:, :, None] * v[:, None, :]
  return u.astype(out_dtype), alpha


def gather_gate(table, row_ids, *weights, **options):
  """The unfused composition and oracle of the fused kernels: `gate_from_rows` of
  `gather_rows(table, row_ids)`, with the weights (in `GATE_WEIGHTS` order) and the options of
  `gate_from_rows`."""
  return gate_from_rows(gather_rows(table, row_ids), *weights, **options)
