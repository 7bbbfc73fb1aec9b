"""Reads of Engram rows from tables in host memory from inside a compiled program.

The tables are `jax.Array`s in a host memory kind (`pinned_host`, else `unpinned_host`)
passed to the jitted function as ordinary operands. A traced gather moves the int32 row
ids to host memory, gathers under `compute_on("device_host")` and copies only the rows to
the device, so it can sit inside a `lax.while_loop` (the whole decode stays one program).
`jnp.take(host_table, device_ids)` is rejected by JAX ("memory_space of all inputs passed
to `gather` must be the same"): the ids must be moved to the host first.

Shapes: table [R, d] (host memory), flat row ids int32 [...] (head offsets added, < 2^31),
rows [..., d] (device). Cached placement: hot_ids int32 [C] ascending (device), hot_rows
[C, d] (device).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

from engram_jax.offload import placement as placement_lib
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.hot_cache import HotRowCache
from engram_jax.offload.indexing import check_int32_rows

log = logging.getLogger(__name__)


def _host_take(table: jax.Array, ids: jax.Array) -> jax.Array:
  # Callers hash in range; 'promise_in_bounds' skips the clamp on the host.
  return table.at[ids].get(mode="promise_in_bounds")


def host_memory_table(table: HostTable) -> jax.Array:
  """`table` as a jax.Array in host memory: its own array for method "compute_on", else a
  copy of the NumPy master into the device's host memory kind (logged: it doubles host RAM)."""
  check_int32_rows(table.num_rows, "an in-program host table")
  if isinstance(table.array, jax.Array):
    kind = table.array.sharding.memory_kind
    if kind in ("pinned_host", "unpinned_host"):
      return table.array
  kind = placement_lib.host_memory_kind(table.device)
  log.info(
    "copying a NumPy host table %s into %s memory for in-program gathers "
    "(build HostTable(method='compute_on') to avoid the copy)",
    table.shape,
    kind,
  )
  return jax.device_put(table.numpy(), placement_lib.sharding_for(kind, table.device))


def can_read_in_program(device: jax.Device | None = None) -> tuple[bool, str]:
  """(True, memory kind) when `device` exposes a host memory kind, else (False, why)."""
  try:
    return True, placement_lib.host_memory_kind(device)
  except ValueError as e:
    return False, str(e)


def gather_host_rows(table: jax.Array, flat_ids: jax.Array) -> jax.Array:
  """Traceable: host-memory table [R, d], device int32 ids [...] -> device rows [..., d]."""
  ids = jax.device_put(flat_ids.astype(jnp.int32), jax.memory.Space.Host)
  rows = compute_on(_host_take, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)(table, ids)
  return jax.device_put(rows, jax.memory.Space.Device)


def hot_arrays(cache: HotRowCache) -> tuple[jax.Array, jax.Array]:
  """(hot_ids int32 [C] ascending, hot_rows [C, d]) device arrays of a `HotRowCache`."""
  check_int32_rows(cache.table.num_rows, "a cached host table")
  ids = jax.device_put(np.asarray(cache.hot_rows, np.int32), placement_lib.sharding_for("device", cache.table.device))
  return ids, cache.rows


def gather_cached_rows(
  hot_ids: jax.Array, hot_rows: jax.Array, table: jax.Array, flat_ids: jax.Array, miss_capacity: int
) -> tuple[jax.Array, dict]:
  """Traceable: rows [..., d] of flat ids [...], hits from the device cache, misses from host.

  At most `miss_capacity` distinct positions are read from the host per call (their ids
  compacted into a static [miss_capacity] buffer); a call with more misses reads all n ids
  from the host instead (`lax.cond`), so the result always equals a plain table gather.
  Returns (rows, stats): stats = {"lookups", "hits", "host_rows"} int32 scalars, host_rows
  being the rows copied host -> device by this call.
  """
  shape = flat_ids.shape
  ids = flat_ids.reshape(-1).astype(jnp.int32)
  n, c = ids.shape[0], hot_ids.shape[0]
  slot = jnp.minimum(jnp.searchsorted(hot_ids, ids), c - 1).astype(jnp.int32)
  hit = hot_ids[slot] == ids
  from_cache = hot_rows[slot]
  misses = n - jnp.sum(hit, dtype=jnp.int32)
  k = int(miss_capacity)
  if k < 1:
    raise ValueError(f"miss_capacity must be >= 1, got {miss_capacity}")
  if k >= n:
    from_host, read = gather_host_rows(table, ids), jnp.int32(n)
  else:
    miss = ~hit
    where_miss = jnp.nonzero(miss, size=k, fill_value=0)[0]  # [k] positions
    rank = jnp.clip(jnp.cumsum(miss, dtype=jnp.int32) - 1, 0, k - 1)  # [n] slot in the buffer

    def few():
      return gather_host_rows(table, ids[where_miss])[rank]

    def all_of_them():
      return gather_host_rows(table, ids)

    fits = misses <= k
    from_host = jax.lax.cond(fits, few, all_of_them)
    read = jnp.where(fits, jnp.int32(k), jnp.int32(n))
  rows = jnp.where(hit[:, None], from_cache, from_host.astype(from_cache.dtype))
  stats = {"lookups": jnp.int32(n), "hits": n - misses, "host_rows": read}
  return rows.reshape(shape + (rows.shape[-1],)), stats


__all__ = ["can_read_in_program", "gather_cached_rows", "gather_host_rows", "host_memory_table", "hot_arrays"]
