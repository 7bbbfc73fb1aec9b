"""Bucketing row ids by the shard that owns them: the sender side of the all-to-all lookup.

A table of R_pad rows is split into S contiguous shards of `rows_per_shard` rows; row r
lives on shard r // rows_per_shard at local row r % rows_per_shard. Every device packs
the ids it needs into a send buffer of S fixed-size buckets of `capacity` slots
([S * capacity], bucket s goes to shard s), so one `all_to_all` moves them.

Shapes: ids [M] int32 (global rows; invalid ids are marked by `valid`).
  slot      [M]        where each id sits in the send buffer; S*capacity when it has no
                       slot (invalid, or its bucket overflowed)
  send_ids  [S*C]      local row on the destination shard, -1 in empty slots
  counts    [S]        ids per destination (valid ids only), to detect overflow
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Buckets(NamedTuple):
  slot: jax.Array  # [M] int32
  send_ids: jax.Array  # [S*C] int32, -1 = empty
  counts: jax.Array  # [S] int32

  def overflow(self, capacity: int) -> jax.Array:
    """True when some bucket got more ids than it has slots (those ids have no slot)."""
    return jnp.any(self.counts > capacity)


def bucket_by_owner(
  ids: jax.Array, valid: jax.Array, *, rows_per_shard: int, num_shards: int, capacity: int
) -> Buckets:
  """Packs valid ids into per-owner buckets of `capacity` slots, in token order.

  The rank of an id inside its bucket is a running count over a one-hot [M, S] matrix
  (O(M*S) work, no sort), cheap for the mesh-axis sizes a table is sharded over (<= 64).
  """
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}")
  ids = ids.astype(jnp.int32)
  owner = jnp.where(valid, ids // rows_per_shard, num_shards)  # num_shards = no bucket
  onehot = owner[:, None] == jnp.arange(num_shards, dtype=jnp.int32)[None, :]
  running = jnp.cumsum(onehot.astype(jnp.int32), axis=0)  # [M, S]
  column = jnp.minimum(owner, num_shards - 1)[:, None]
  rank = jnp.take_along_axis(running, column, axis=1)[:, 0] - 1
  fits = valid & (rank < capacity)
  empty = num_shards * capacity
  slot = jnp.where(fits, owner * capacity + rank, empty).astype(jnp.int32)
  local = ids - owner * rows_per_shard
  send_ids = jnp.full((empty,), -1, jnp.int32).at[slot].set(local, mode="drop")
  counts = running[-1] if ids.shape[0] else jnp.zeros((num_shards,), jnp.int32)
  return Buckets(slot, send_ids, counts)
