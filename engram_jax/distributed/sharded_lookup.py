"""Row-sharded Engram table lookup: all-to-all routing (paper, §7) or XLA's partitioned gather.

Layout. The table [R, d] is split by rows over the mesh axes `axis` (S shards in all,
`PartitionSpec(axis, None)`; one axis, "tensor" by default, or several, e.g.
("data", "tensor") to spread the table over every device as the paper does) and replicated
over the other mesh axes. Row ids [..., H] (global rows, head offsets added) are split by
their leading dim over `batch_axes` and replicated over the rest. The rows [..., H, d] come
back split like the ids. Two kinds of table axes:
  * split axes (table axes the ids are replicated over, e.g. "tensor" in the default
    layout): their devices hold the same ids, so each takes a 1/n slice of them (no row is
    fetched twice) and an all_gather over these axes reassembles the rows at the end;
  * table axes that are also batch axes (e.g. "data" in the paper's layout): every device
    brings distinct ids; nothing to split or reassemble.
Batch axes the table is replicated over ("data" in the default layout) only matter in the
backward pass, where the replicas' table gradients are summed (psum).

method="all_to_all" (one `shard_map`, per device; M = the device's ids, m = its slice):
  1. bucket the m ids by owner shard (owner of row r = r // (R_pad / S), shards numbered
     major-to-minor over `axis`) into S buckets of C slots (`routing.bucket_by_owner`);
  2. all_to_all the ids over the table axes: each shard receives the requests for its rows;
  3. gather locally with `local_gather(shard [R_pad/S, d], local_ids [S*C]) -> [S*C, d]`
     (`take_local_gather` by default, or the Pallas kernel via `pallas_local_gather`);
  4. all_to_all the rows back and unpack them into token order [m, d];
  5. all_gather over the split axes -> [M, d].
  Backward (`custom_vjp`), two cases:
  * some table axis is also a batch axis (the paper's layout): the same routing carries
    every row gradient to its owner, which scatter-adds it (float32, duplicates accumulate)
    into a zero [R_pad/S, d] shard. Buckets are recomputed (one more all_to_all of int32
    ids) rather than saved;
  * otherwise (the default layout) every shard already holds all the cotangents of its
    batch shard, so it scatter-adds those of its own rows: no traffic at all over the
    table axes (routing would only move data that is already there).
  Then a psum over the batch axes the table is replicated over.

  Capacity: C = m (capacity_factor=None) is exact for any ids, but the fixed-size
  all_to_all then moves S slots per id. With capacity_factor=f (default 1.25),
  C = ceil(f * m / S): hashed ids spread evenly over the shards, so f = 1.25 nearly always
  fits; if any bucket on any device overflows, the step redoes the exchange with C = m (an
  all-reduced flag and a `lax.cond`), so results never depend on f.
  (`lax.ragged_all_to_all` would send exactly the ids; XLA:CPU does not implement it, so it
  is not used here.)

method="xla": `jnp.take` on the row-sharded table under sharding constraints, partitioned
  by XLA (the approach of MaxText and most JAX code). In the default layout XLA makes it a
  masked local gather on every shard plus an all-reduce of the [M, d] rows over the table
  axes, and its backward a masked local scatter-add plus the data-parallel all-reduce.
  When the ids are split over a table axis (the paper's layout) XLA (jax 0.11.2, read from
  the compiled HLO) first all-gathers the table over those axes: with ids split over every
  table axis, the WHOLE table lands on every device, which defeats sharding it. Use
  all_to_all there. `local_gather` does not apply.

Rows: R is padded up to R_pad, a multiple of S (`padded_num_rows`); padding rows are never
addressed. Allocate tables with R_pad rows: padding inside the step copies the table.
Ids outside [0, R) read NaN rows (float tables) and get no gradient; concrete (non-traced)
ids are range-checked with a ValueError.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax.distributed.routing import bucket_by_owner

Method = Literal["all_to_all", "xla"]
#: Lookup methods of a row-sharded table: "all_to_all" (route each id to the shard that owns
#: its row and the row back) and "xla" (a plain gather left to XLA's partitioner).
METHODS: tuple[str, ...] = ("all_to_all", "xla")
#: The default method, chosen with experiments/bench/sharded_lookup.py and the traffic each
#: method implies (see the distributed guide).
DEFAULT_METHOD: Method = "all_to_all"
#: Bucket capacity per destination shard, as a multiple of the even share of ids (None: exact
#: buckets). A batch whose buckets overflow falls back to exact buckets, so the result is exact
#: for any ids.
DEFAULT_CAPACITY_FACTOR: float | None = 1.25

LocalGather = Callable[[jax.Array, jax.Array], jax.Array]


def take_local_gather(shard: jax.Array, local_ids: jax.Array) -> jax.Array:
  """Default local gather: shard [Rs, d], local_ids [K] int32 in [0, Rs) -> [K, d]."""
  return shard.at[local_ids].get(mode="promise_in_bounds")


@functools.cache
def pallas_local_gather(impl: str = "auto", block_rows: int = 8) -> LocalGather:
  """A `local_gather` running the single-device gather op of `pallas_kernels`.

  impl: "xla", "pallas" or "auto" (Pallas on GPU/TPU, XLA on CPU), as in `gather_rows`.
  Returns a function shard [Rs, d], local_ids [K] -> [K, d]; the same object for the same
  settings, so the op cache and jit do not retrace. Only the forward runs through it (the
  backward is the lookup's own scatter-add). With a custom local_gather the shard_map runs
  with check_vma=False (kernels do not declare varying-axes types).
  Tested on CPU with the TPU kernel in interpret mode inside the 8-device shard_map
  (tests/test_sharded_lookup.py, tests/test_engram_sharded_lookup.py). The Mosaic GPU
  kernel's interpreter fails there (a barrier left allocated across devices), so the GPU
  kernel is checked on one device only.
  """
  from pallas_kernels import gather_rows

  def gather(shard: jax.Array, local_ids: jax.Array) -> jax.Array:
    return gather_rows(shard, local_ids[:, None], impl=impl, block_rows=block_rows)

  return gather


def padded_num_rows(num_rows: int, num_shards: int) -> int:
  """Rows a table of `num_rows` rows needs to split evenly over `num_shards` shards."""
  if num_rows < 1 or num_shards < 1:
    raise ValueError(f"num_rows and num_shards must be positive, got {num_rows}, {num_shards}")
  return -(-num_rows // num_shards) * num_shards


def pad_table_rows(table: jax.Array, num_shards: int) -> jax.Array:
  """table [R, d] -> [R_pad, d] with zero rows appended (a copy when R % num_shards != 0)."""
  extra = padded_num_rows(table.shape[0], num_shards) - table.shape[0]
  return table if extra == 0 else jnp.pad(table, ((0, extra), (0, 0)))


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one sharded lookup (hashable: keys the op cache)."""

  mesh: Mesh
  table_axes: tuple[str, ...]  # rows split over these (major to minor)
  batch_axes: tuple[str, ...]  # leading dim of the ids split over these
  num_rows: int  # R: addressable rows
  padded_rows: int  # R_pad: multiple of num_shards
  capacity_factor: float | None
  local_gather: LocalGather

  @property
  def num_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.table_axes)

  @property
  def rows_per_shard(self) -> int:
    return self.padded_rows // self.num_shards

  @property
  def split_axes(self) -> tuple[str, ...]:
    """Table axes the ids are replicated over: their devices split the ids between them."""
    return tuple(a for a in self.table_axes if a not in self.batch_axes)

  @property
  def num_splits(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.split_axes)

  @property
  def reduce_axes(self) -> tuple[str, ...]:
    """Batch axes the table is replicated over: their table gradients are summed."""
    return tuple(a for a in self.batch_axes if a not in self.table_axes)

  @property
  def table_spec(self) -> P:
    return P(_spec_entry(self.table_axes), None)

  @property
  def ids_spec(self) -> P:
    return P(_spec_entry(self.batch_axes))

  def capacity(self, per_device: int) -> int | None:
    """Bucket slots under capacity_factor, or None when it would not beat the exact C."""
    if self.capacity_factor is None:
      return None
    c = math.ceil(self.capacity_factor * per_device / self.num_shards)
    return c if c < per_device else None


def _fill_value(dtype):
  return jnp.nan if jnp.issubdtype(dtype, jnp.inexact) else 0


# -- per-device bodies (inside shard_map) ------------------------------------------------------
def _my_slice(plan: _Plan, flat: jax.Array) -> jax.Array:
  """The part of the local ids [M, ...] this device handles: [m, ...], m = ceil(M / splits),
  padded with invalid ids (-1) / zero gradients."""
  if not plan.split_axes:
    return flat
  n = plan.num_splits
  per_device = -(-flat.shape[0] // n)
  flat = jnp.pad(
    flat,
    [(0, per_device * n - flat.shape[0])] + [(0, 0)] * (flat.ndim - 1),
    constant_values=-1 if flat.ndim == 1 else 0,
  )
  start = lax.axis_index(plan.split_axes) * per_device
  return lax.dynamic_slice_in_dim(flat, start, per_device, axis=0)


def _route(plan: _Plan, ids: jax.Array, valid: jax.Array, run: Callable) -> jax.Array:
  """Runs `run(buckets, capacity)` with the capped buckets, or the exact ones when any
  device's buckets overflow (decided jointly so every device takes the same branch)."""
  exact = ids.shape[0]
  bucket = functools.partial(
    bucket_by_owner, ids, valid, rows_per_shard=plan.rows_per_shard, num_shards=plan.num_shards
  )
  capped = plan.capacity(exact)
  if capped is None:
    return run(bucket(capacity=exact), exact)
  buckets = bucket(capacity=capped)
  overflow = lax.pmax(buckets.overflow(capped).astype(jnp.int32), plan.table_axes + plan.reduce_axes)
  return lax.cond(overflow > 0, lambda: run(bucket(capacity=exact), exact), lambda: run(buckets, capped))


def _forward_body(plan: _Plan, shard: jax.Array, ids_block: jax.Array) -> jax.Array:
  """shard [R_pad/S, d], ids_block [b, ..., H] -> rows [b, ..., H, d] (all local ids)."""
  d = shard.shape[1]
  flat = ids_block.reshape(-1)
  mine = _my_slice(plan, flat)
  valid = (mine >= 0) & (mine < plan.num_rows)
  axes = plan.table_axes

  def run(buckets, capacity):
    del capacity
    requests = lax.all_to_all(buckets.send_ids, axes, 0, 0, tiled=True)  # [S*C]
    found = plan.local_gather(shard, jnp.maximum(requests, 0))  # [S*C, d]
    answers = lax.all_to_all(found, axes, 0, 0, tiled=True)  # [S*C, d]
    return jnp.take(answers, buckets.slot, axis=0, mode="fill", fill_value=_fill_value(shard.dtype))  # [m, d]

  rows = _route(plan, mine, valid, run)
  if plan.split_axes:  # every device of the split axes gets all the rows again
    rows = lax.all_gather(rows, plan.split_axes, axis=0, tiled=True, to="invarying")
  return rows[: flat.shape[0]].reshape(ids_block.shape + (d,))


def _backward_body(plan: _Plan, ids_block: jax.Array, d_rows: jax.Array) -> jax.Array:
  """ids_block [b, ..., H], d_rows [b, ..., H, d] -> table gradient shard [R_pad/S, d]."""
  d = d_rows.shape[-1]
  mine = _my_slice(plan, ids_block.reshape(-1))
  grads = _my_slice(plan, d_rows.reshape(-1, d))
  valid = (mine >= 0) & (mine < plan.num_rows)
  rows_per_shard = plan.rows_per_shard

  def run(buckets, capacity):
    requests = lax.all_to_all(buckets.send_ids, plan.table_axes, 0, 0, tiled=True)
    send = jnp.zeros((plan.num_shards * capacity, d), grads.dtype)
    send = send.at[buckets.slot].set(grads, mode="drop")
    received = lax.all_to_all(send, plan.table_axes, 0, 0, tiled=True)
    target = jnp.where(requests >= 0, requests, rows_per_shard)  # empty slots: dropped
    return jnp.zeros((rows_per_shard, d), jnp.float32).at[target].add(received.astype(jnp.float32), mode="drop")

  grad = _route(plan, mine, valid, run)
  if plan.reduce_axes:
    grad = lax.psum(grad, plan.reduce_axes)  # data-parallel replicas of the table
  return grad.astype(d_rows.dtype)


def _local_backward_body(plan: _Plan, ids_block: jax.Array, d_rows: jax.Array) -> jax.Array:
  """Backward when no table axis splits the ids: every shard already holds all cotangents
  of its batch shard, so it scatter-adds those of its own rows; no traffic over the table
  axes (the reverse all_to_all would only move what is already there)."""
  d = d_rows.shape[-1]
  ids = ids_block.reshape(-1)
  rows_per_shard = plan.rows_per_shard
  local = ids - lax.axis_index(plan.table_axes) * rows_per_shard
  mine = (ids >= 0) & (ids < plan.num_rows) & (local >= 0) & (local < rows_per_shard)
  target = jnp.where(mine, local, rows_per_shard)
  grad = (
    jnp.zeros((rows_per_shard, d), jnp.float32).at[target].add(d_rows.reshape(-1, d).astype(jnp.float32), mode="drop")
  )
  if plan.reduce_axes:
    grad = lax.psum(grad, plan.reduce_axes)
  return grad.astype(d_rows.dtype)


@functools.cache
def _all_to_all_op(plan: _Plan):
  # Pallas kernels declare outputs without varying-axes types, which check_vma rejects; the
  # default gather keeps the check (it verifies the replication promised by out_specs).
  check = plan.local_gather is take_local_gather
  smap = lambda body, ins, out: jax.shard_map(  # noqa: E731
    functools.partial(body, plan), mesh=plan.mesh, in_specs=ins, out_specs=out, check_vma=check
  )
  forward = smap(_forward_body, (plan.table_spec, plan.ids_spec), plan.ids_spec)
  routed = plan.split_axes != plan.table_axes  # some table axis also splits the ids
  backward = smap(_backward_body if routed else _local_backward_body, (plan.ids_spec, plan.ids_spec), plan.table_spec)

  @jax.custom_vjp
  def op(table, ids):
    return forward(table, ids)

  def fwd(table, ids):
    return forward(table, ids), ids

  def bwd(ids, d_rows):
    return backward(ids, d_rows), np.zeros(ids.shape, jax.dtypes.float0)

  op.defvjp(fwd, bwd)
  return op


def _xla_gather(plan: _Plan, table: jax.Array, ids: jax.Array) -> jax.Array:
  mesh = plan.mesh
  table = lax.with_sharding_constraint(table, NamedSharding(mesh, plan.table_spec))
  ids = lax.with_sharding_constraint(ids, NamedSharding(mesh, plan.ids_spec))
  # Invalid ids (and the padding rows R..R_pad) must not read a row: send them past the end.
  safe = jnp.where((ids >= 0) & (ids < plan.num_rows), ids, plan.padded_rows)
  rows = jnp.take(table, safe, axis=0, mode="fill", fill_value=_fill_value(table.dtype))
  return lax.with_sharding_constraint(rows, NamedSharding(mesh, plan.ids_spec))


# -- public API --------------------------------------------------------------------------------
def _check_args(table, ids, mesh, table_axes, batch_axes, capacity_factor, method):
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if table.ndim != 2:
    raise ValueError(f"table must be [R, d], got shape {table.shape}")
  if ids.ndim < 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"row ids must be an integer array [..., H], got {ids.dtype} {ids.shape}")
  if table.shape[0] >= 2**31:
    raise ValueError(f"table has {table.shape[0]} rows; int32 row ids address < 2**31")
  for kind, axes in (("table", table_axes), ("batch", batch_axes)):
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(f"{kind} axis {a!r} is not a mesh axis {tuple(mesh.axis_names)}")
    if len(set(axes)) != len(axes):
      raise ValueError(f"{kind} axes {axes} name a mesh axis twice")
  if not table_axes:
    raise ValueError("axis must name at least one mesh axis")
  n_batch = math.prod(mesh.shape[a] for a in batch_axes)
  if ids.shape[0] % n_batch:
    raise ValueError(
      f"leading dim {ids.shape[0]} of the row ids is not divisible by the {n_batch} shards of batch axes {batch_axes}"
    )
  if capacity_factor is not None and not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor!r}")
  if not isinstance(ids, jax.core.Tracer):
    values = np.asarray(ids)
    bad = (values < 0) | (values >= table.shape[0])
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"row id {int(values[pos])} at position {pos} is outside the table [0, {table.shape[0]})")


def sharded_gather(
  table: jax.Array,
  flat_row_ids: jax.Array,
  *,
  mesh: Mesh,
  axis: str | Sequence[str] = "tensor",
  batch_axes: Sequence[str] | None = ("data",),
  capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR,
  method: Method = DEFAULT_METHOD,
  local_gather: LocalGather | None = None,
) -> jax.Array:
  """Rows of a row-sharded table: table [R, d], flat_row_ids [..., H] -> [..., H, d].

  Args:
    table: [R, d], sharded `PartitionSpec(axis, None)` (any other placement is resharded).
      R is padded to a multiple of the shard count (a copy: allocate padded tables).
    flat_row_ids: int [..., H] global rows (head offsets added), leading dim split over
      `batch_axes`, replicated over the other mesh axes.
    mesh: the device mesh.
    axis: the mesh axis (or axes, major to minor) the rows are split over.
    batch_axes: mesh axes the leading dim of the ids is split over (None: replicated);
      may include table axes (each device then brings its own ids, as in the paper).
    capacity_factor: all_to_all bucket size as a multiple of the even share (None: exact
      worst-case buckets, S times the traffic); a step whose buckets overflow redoes the
      exchange with exact buckets, so results never depend on it.
    method: "all_to_all" (routed, `custom_vjp`) or "xla" (XLA-partitioned `jnp.take`).
    local_gather: all_to_all only: shard [Rs, d], local ids [K] -> [K, d]
      (default `take_local_gather`; `pallas_local_gather()` for the kernels).
  Returns rows [..., H, d] in table.dtype, sharded like the ids; ids outside [0, R) give NaN.
  """
  flat_row_ids = jnp.asarray(flat_row_ids)
  table_axes = (axis,) if isinstance(axis, str) else tuple(axis)
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  _check_args(table, flat_row_ids, mesh, table_axes, batch_axes, capacity_factor, method)
  num_shards = math.prod(mesh.shape[a] for a in table_axes)
  plan = _Plan(
    mesh,
    table_axes,
    batch_axes,
    int(table.shape[0]),
    padded_num_rows(table.shape[0], num_shards),
    capacity_factor,
    local_gather or take_local_gather,
  )
  table = pad_table_rows(table, num_shards)
  ids = flat_row_ids.astype(jnp.int32)
  if ids.size == 0:
    return jnp.zeros(ids.shape + (table.shape[1],), table.dtype)
  if method == "xla":
    return _xla_gather(plan, table, ids)
  return _all_to_all_op(plan)(table, ids)


def engram_sharded_lookup(table: jax.Array, row_ids: jax.Array, offsets: Sequence[int], **kwargs) -> jax.Array:
  """The Engram layer's lookup on a row-sharded table: per-head rows -> [..., H * d].

  table [R, d_h] (all heads' tables stacked), row_ids [..., H] per-head rows (offsets NOT
  added), offsets [H] first row of each head (`NgramHasher.offsets[layer]`). kwargs go to
  `sharded_gather` (mesh=..., axis, batch_axes, method, capacity_factor, local_gather).
  Checks the global row range only; the per-head range is the layer's check.
  """
  row_ids = jnp.asarray(row_ids)
  offsets = np.asarray(offsets, np.int64)
  if offsets.shape != (row_ids.shape[-1],):
    raise ValueError(f"offsets must hold one entry per head ({row_ids.shape[-1]}), got shape {offsets.shape}")
  flat = row_ids.astype(jnp.int32) + jnp.asarray(offsets, jnp.int32)
  rows = sharded_gather(table, flat, **kwargs)
  return rows.reshape(row_ids.shape[:-1] + (-1,))
