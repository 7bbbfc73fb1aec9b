"""Exact n-gram hashing on device without 64-bit mode.

JAX defaults to 32-bit integers, but the reference mixes ids with 64-bit multipliers
(around 1e16 for the paper's sizes), so a plain int32 port (as in MaxText) computes
different rows. We emulate the 64-bit arithmetic exactly with pairs of uint32 limbs:

1. product: x * m for x < 2^31 and m = m_hi * 2^32 + m_lo is assembled from 16x16-bit
   partial products (each fits in uint32); only the low 64 bits are kept, exactly what
   int64 wrap-around gives (and valid ids never overflow anyway);
2. xor: limb-wise;
3. mod p (p < 2^31): r = hi mod p, then the low word is folded in c-bit chunks,
   r <- (r * 2^c + chunk) mod p, with c chosen per prime so r * 2^c + chunk < 2^32.

All ops are elementwise uint32, so the function is jit-able and vectorizes on GPU/TPU.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

#: Row id given to every head whose n-gram reads an out-of-vocabulary id under jit: outside
#: every table, so `Engram.lookup` reads NaN for it instead of an ordinary row.
INVALID_ROW = -1

_MASK16 = np.uint32(0xFFFF)


def _mul_u32_wide(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Full 64-bit product of two uint32 arrays as (hi, lo) uint32 limbs."""
  a_lo, a_hi = a & _MASK16, a >> 16
  b_lo, b_hi = b & _MASK16, b >> 16
  ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
  mid = (ll >> 16) + (lh & _MASK16) + (hl & _MASK16)  # < 3 * 2^16: no overflow
  lo = (ll & _MASK16) | (mid << 16)
  hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
  return hi, lo


def _mul_u64_by_u32(x: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(x * m) mod 2^64 for uint32 x and a Python int 0 <= m < 2^64."""
  m_lo = jnp.uint32(m & 0xFFFFFFFF)
  m_hi = jnp.uint32((m >> 32) & 0xFFFFFFFF)
  hi, lo = _mul_u32_wide(x, jnp.broadcast_to(m_lo, x.shape))
  hi = hi + x * m_hi  # the cross term's high half lands beyond bit 64
  return hi, lo


def _mod_u64(hi: jax.Array, lo: jax.Array, p: int) -> jax.Array:
  """(hi * 2^32 + lo) mod p for a prime 2 <= p < 2^31, as uint32."""
  chunk = max(1, 32 - int(p).bit_length())  # r < p  =>  r * 2^chunk + (2^chunk - 1) < 2^32
  pu = jnp.uint32(p)
  r = hi % pu
  remaining = 32
  while remaining > 0:
    c = min(chunk, remaining)
    remaining -= c
    piece = (lo >> remaining) & jnp.uint32((1 << c) - 1)
    r = ((r << c) | piece) % pu
  return r


def _shift(ids: jax.Array, shift: int, pad_id: int, segment_ids: jax.Array | None) -> jax.Array:
  if shift == 0:
    return ids
  t = ids.shape[1]
  if shift >= t:
    return jnp.full_like(ids, pad_id)
  out = jnp.concatenate([jnp.full((ids.shape[0], shift), pad_id, ids.dtype), ids[:, :-shift]], 1)
  if segment_ids is not None:
    prev_seg = jnp.concatenate([jnp.full((ids.shape[0], shift), -1, segment_ids.dtype), segment_ids[:, :-shift]], 1)
    out = jnp.where(prev_seg == segment_ids, out, jnp.asarray(pad_id, ids.dtype))
  return out


def _out_of_vocab(ids: jax.Array, vocab_size: int) -> jax.Array:
  """bool mask of ids outside [0, vocab_size) (no bound the dtype cannot exceed is compared)."""
  bad = ids < 0 if jnp.issubdtype(ids.dtype, jnp.signedinteger) else jnp.zeros(ids.shape, bool)
  if vocab_size <= int(jnp.iinfo(ids.dtype).max):
    bad = bad | (ids >= vocab_size)
  return bad


def hash_layer_device(
  ids: jax.Array,
  multipliers: np.ndarray,
  table_sizes: np.ndarray,
  n_head_per_ngram: int,
  pad_id: int,
  segment_ids: jax.Array | None = None,
  vocab_size: int | None = None,
) -> jax.Array:
  """Per-head rows [B, T, (N-1)*K] int32 of one layer; the constants are static Python data.

  With `vocab_size`, every head whose n-gram window holds an id outside [0, vocab_size)
  gets `INVALID_ROW` (-1) instead of an ordinary row.
  """
  ids = jnp.asarray(ids)
  oov = None if vocab_size is None else _out_of_vocab(ids, vocab_size)
  ids = ids.astype(jnp.uint32)
  mults = [int(m) for m in multipliers]
  terms = [_mul_u64_by_u32(_shift(ids, j, pad_id, segment_ids), m) for j, m in enumerate(mults)]
  cols = []
  mix_hi, mix_lo = terms[0]
  bad = oov
  for n in range(2, len(mults) + 1):
    mix_hi, mix_lo = mix_hi ^ terms[n - 1][0], mix_lo ^ terms[n - 1][1]
    if oov is not None:  # the window of order n reads x[t-n+1 .. t] (across documents: the pad)
      bad = bad | _shift(oov, n - 1, False, segment_ids)
    for h in range(n_head_per_ngram):
      col = _mod_u64(mix_hi, mix_lo, int(table_sizes[(n - 2) * n_head_per_ngram + h])).astype(jnp.int32)
      cols.append(col if bad is None else jnp.where(bad, jnp.int32(INVALID_ROW), col))
  return jnp.stack(cols, axis=-1)


def check_vocab(ids: jax.Array, vocab_size: int) -> None:
  """checkify.debug_check that compressed ids [B, T] lie in [0, vocab_size): raises with the
  first bad id and its position under `checkify.checkify(..., errors=checkify.user_checks)`,
  a no-op otherwise."""
  valid = ~_out_of_vocab(ids, vocab_size)
  first = jnp.argmin(valid.reshape(-1))
  b, t = jnp.unravel_index(first, valid.shape)
  checkify.debug_check(
    jnp.all(valid),
    f"compressed id {{}} at position ({{}}, {{}}) is outside the compressed vocabulary [0, {vocab_size})",
    ids.reshape(-1)[first],
    b,
    t,
  )


def hash_all_layers(hasher: Any, compressed_ids: Any, segment_ids: Any = None) -> dict[int, jax.Array]:
  """Device hashing for every layer of an `NgramHasher`. Jit-able in `compressed_ids`.

  Concrete inputs are range-checked (ValueError). Under `jit` an id outside the compressed
  vocabulary [0, V') cannot raise: every head whose n-gram window holds it gets row id -1
  (`INVALID_ROW`, outside every table), which `Engram.lookup` turns into NaN rows; under
  `checkify.checkify(..., errors=checkify.user_checks)` it raises with the position.
  """
  for sizes in hasher.table_sizes.values():
    if int(sizes.max()) >= 2**31:
      raise ValueError(f"hash_jax returns int32 rows and needs head sizes < 2^31, got {int(sizes.max())}")
  if hasher.compressed_vocab_size > 2**31:
    raise ValueError("hash_jax needs a compressed vocabulary below 2^31")
  if not isinstance(compressed_ids, jax.core.Tracer):
    hasher.check_ids(np.asarray(compressed_ids))
  ids = jnp.asarray(compressed_ids)
  if ids.ndim != 2:
    raise ValueError(f"compressed ids must have shape [batch, seq], got {ids.shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"compressed ids must be integers, got dtype {ids.dtype}")
  if isinstance(ids, jax.core.Tracer):  # concrete ids were checked by hasher.check_ids
    check_vocab(ids, hasher.compressed_vocab_size)
  seg = None if segment_ids is None else jnp.asarray(segment_ids)
  return {
    lid: hash_layer_device(
      ids,
      hasher.multipliers[lid],
      hasher.table_sizes[lid],
      hasher.config.n_head_per_ngram,
      hasher.pad_id,
      seg,
      vocab_size=hasher.compressed_vocab_size,
    )
    for lid in hasher.layer_ids
  }
