"""Host-resident Engram tables split by rows over the processes of a multi-process run.

Each process keeps rows [lo, hi) of a flat host table [R, d] and their row-sparse Adam
state (m, v [hi - lo, d], count [hi - lo]) in its own host memory (`ShardedHostTable`).
A step's row ids are known on the host before the step (hashed by the data pipeline), so
the exchange is split into a request phase that can run one step ahead and a row phase
inside the jitted train step; both ride the devices' collectives, over the same
all_to_all route as the row-sharded device lookup (`sharded_lookup.py`, `routing.py`).

Layout (`HostShardPlan`): the batch is split over the mesh axes `axes` (D devices, every
other mesh axis of size 1); device i (in shard order) owns the rows
[i * Rs, (i + 1) * Rs), Rs = ceil(R / D). A process owns the rows of its devices, which
must be consecutive in shard order (order the mesh's devices by process), so its rows are
one range [lo, hi). Device i's ids [m] (its b rows of the batch [B, T, H], m = b*T*H):

  1. `route_requests` (device, jit; one step ahead): de-duplicate the m ids, bucket the
     distinct ones by owner device into D buckets of C slots (`bucket_by_owner`),
     all_to_all them: each device receives requests [D*C] (local rows of its own range,
     -1 = empty slot) and keeps slot [m] (where each of its ids went; repeats share a
     slot). A flag says whether a bucket overflowed (then the caller routes again with
     exact buckets, C = m: results never depend on C).
  2. `ShardedHostTable.serve` (host): each process reads its devices' requests and gathers
     the rows from its NumPy shard: answers [D*C, d] per device.
  3. `receive_rows` (traceable, in the step): all_to_all the answers back; each device
     takes its rows by slot -> rows [B, T, H*d] sharded over the batch like the ids.
  4. `return_grads` (traceable, in the step): the rows' gradients [B, T, H*d], summed over
     a device's repeats of an id, go back over the reverse all_to_all (same slots); each
     owner sums the gradients of a row requested by several devices
     -> (unique local rows [D*C] padded with Rs, summed [D*C, d], count [1]) per device.
  5. `ShardedHostTable.apply_update` (host): each process applies `SparseRowAdam` to its
     rows with its devices' sums.

Traffic per step and device: C*D ids (int32) out, C*D rows in, C*D row gradients out, of
which the (D-1)/D not addressed to the device itself cross devices (`exchange_bytes`).
A row travels once per device that needs it, whatever its repeats; with the repeats of
Zipf-distributed n-grams a `capacity_factor` below 1 then usually fits (an overflowing step
falls back to exact buckets), which is what bounds the bytes.

Checkpoints (`save_shards` / `load_shards`): every process writes its own shard files
(one .npy per array: table, m, v, count) and process 0 a manifest once all have written;
a restore onto the same process count reads the process's own files, onto a different
count each process copies its new range out of the old files (memory-mapped), so a
checkpoint reshards. Files are written to a temporary name and renamed; a directory
without its manifest is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax.distributed.routing import bucket_by_owner

MANIFEST = "manifest.json"
INT32_MAX = int(np.iinfo(np.int32).max)
ARRAYS = ("table", "m", "v", "count")


@dataclasses.dataclass(frozen=True)
class HostShardPlan:
  """Static layout of one host table [R, d] over the devices (and processes) of `mesh`.

  Attributes:
    mesh: the global mesh; every axis not in `axes` must have size 1.
    axes: mesh axes the batch is split over (major to minor); D = their product.
    num_rows: R, rows of the flat table (all heads, offsets added).
    capacity_factor: request buckets of ceil(f * m / D) slots (None: exact, C = m).
  """

  mesh: Mesh
  axes: tuple[str, ...]
  num_rows: int
  capacity_factor: float | None = 1.25

  def __post_init__(self):
    if not self.axes:
      raise ValueError("HostShardPlan.axes must name at least one mesh axis")
    for a in self.axes:
      if a not in self.mesh.shape:
        raise ValueError(f"HostShardPlan axis {a!r} is not a mesh axis {tuple(self.mesh.axis_names)}")
    others = {a: n for a, n in self.mesh.shape.items() if a not in self.axes and n > 1}
    if others:
      raise NotImplementedError(
        f"host table shards need a mesh split over the batch axes {self.axes} only; "
        f"the mesh {dict(self.mesh.shape)} also splits {others}"
      )
    if self.num_rows < 1:
      raise ValueError(f"HostShardPlan.num_rows must be >= 1, got {self.num_rows}")
    if self.num_rows > INT32_MAX:  # the padding id R must fit int32 too
      raise ValueError(f"a process-sharded host table of {self.num_rows} rows: device row ids are int32")
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor!r}")
    self.process_range(jax.process_index())  # checks the device order

  @property
  def num_devices(self) -> int:
    """Devices the rows are split over (the product of the batch axes' sizes)."""
    return math.prod(self.mesh.shape[a] for a in self.axes)

  @property
  def rows_per_device(self) -> int:
    """Rows of each device's block (the last blocks may be padding)."""
    return -(-self.num_rows // self.num_devices)

  @property
  def spec(self) -> P:
    """The PartitionSpec of the row axis over the batch axes."""
    return P(self.axes[0] if len(self.axes) == 1 else self.axes)

  @property
  def sharding(self) -> NamedSharding:
    """Leading dim split over `axes` (ids, slots, requests, answers, sparse grads)."""
    return NamedSharding(self.mesh, self.spec)

  def device_positions(self) -> dict[jax.Device, int]:
    """{device: its shard position in [0, D)}."""
    return dict(self._positions)

  @functools.cached_property
  def _positions(self) -> dict[jax.Device, int]:
    index_map = self.sharding.devices_indices_map((self.num_devices,))
    return {d: idx[0].start or 0 for d, idx in index_map.items()}

  def process_positions(self, process: int) -> list[int]:
    """Shard positions of `process`'s devices (ascending)."""
    return sorted(p for d, p in self.device_positions().items() if d.process_index == process)

  def process_range(self, process: int) -> tuple[int, int]:
    """Rows [lo, hi) `process` holds: those of its devices (consecutive shard positions)."""
    pos = self.process_positions(process)
    if not pos:
      raise ValueError(f"process {process} owns no device of the mesh {dict(self.mesh.shape)}")
    if pos != list(range(pos[0], pos[0] + len(pos))):
      raise ValueError(
        f"process {process}'s devices sit at shard positions {pos} of the mesh: not consecutive, "
        "so its rows would not be one range; order the mesh's devices by process"
      )
    rs = self.rows_per_device
    return min(pos[0] * rs, self.num_rows), min((pos[-1] + 1) * rs, self.num_rows)

  def capacity(self, per_device: int) -> int:
    """Slots C of each of the D request buckets of a device holding `per_device` ids."""
    if self.capacity_factor is None or self.num_devices == 1:
      return per_device
    return max(1, min(per_device, math.ceil(self.capacity_factor * per_device / self.num_devices)))


class RowState(NamedTuple):
  """Row-sparse Adam state of a shard: m, v [rows, d], count int32 [rows] (the layout of
  `engram_jax.offload.sparse_adam.SparseRowState`, which `SparseRowAdam.apply` updates)."""

  m: np.ndarray
  v: np.ndarray
  count: np.ndarray


class RowOptimizer(Protocol):
  """What `apply_update` needs: `engram_jax.offload.sparse_adam.SparseRowAdam`."""

  def apply(self, table, state, unique_rows, summed_grads, count=None, *, lr=None):
    """One row-sparse Adam step on `table` (in place); returns the new state."""
    ...


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=("slot", "requests"), meta_fields=("capacity", "ids_shape")
)
@dataclasses.dataclass(frozen=True)
class RowRequests:
  """The routed ids of one table for one step (global arrays sharded over the plan's axes).

  A pytree (slot and requests are its leaves; capacity and ids_shape static), so it can be
  passed to a jitted step.

  slot: int32 [D*m], where each id of a device went in its send buffer.
  requests: int32 [D*D*C], per device the local rows other devices ask of it (-1 empty).
  capacity: C.
  ids_shape: (B, T, H) of the global ids.
  """

  slot: jax.Array
  requests: jax.Array
  capacity: int
  ids_shape: tuple[int, ...]


# -- 1. request phase (device, jit) ------------------------------------------------------------
@functools.cache
def _route_fn(plan: HostShardPlan, capacity: int):
  axes = plan.axes

  def body(ids):
    flat = ids.reshape(-1)
    # each distinct id is requested once per device; its repeats share its slot
    unique, inverse = jnp.unique(flat, size=flat.shape[0], fill_value=plan.num_rows, return_inverse=True)
    valid = (unique >= 0) & (unique < plan.num_rows)
    buckets = bucket_by_owner(
      unique, valid, rows_per_shard=plan.rows_per_device, num_shards=plan.num_devices, capacity=capacity
    )
    requests = lax.all_to_all(buckets.send_ids, axes, 0, 0, tiled=True)
    overflow = lax.pmax(buckets.overflow(capacity).astype(jnp.int32), axes)
    return buckets.slot[inverse.reshape(-1)], requests, overflow

  return jax.jit(
    jax.shard_map(body, mesh=plan.mesh, in_specs=(plan.spec,), out_specs=(plan.spec, plan.spec, P()), check_vma=True)
  )


def global_ids(plan: HostShardPlan, local_flat_ids: np.ndarray) -> jax.Array:
  """This process's flat ids [b_p, T, H] (its rows of the batch) -> global int32 [B, T, H].

  Refuses ids outside [0, R) with the first bad value and its position."""
  ids = np.asarray(local_flat_ids)
  if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"flat row ids must be an integer array [b, T, H], got {ids.dtype} {ids.shape}")
  bad = (ids < 0) | (ids >= plan.num_rows)
  if bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"row id {int(ids[pos])} at position {pos} is outside the host table [0, {plan.num_rows})")
  k = len(plan.process_positions(jax.process_index()))
  if ids.shape[0] % k:
    raise ValueError(f"this process's {ids.shape[0]} batch rows do not split over its {k} devices")
  shape = (ids.shape[0] * plan.num_devices // k,) + ids.shape[1:]
  return jax.make_array_from_process_local_data(plan.sharding, ids.astype(np.int32), shape)


@dataclasses.dataclass
class PendingRoute:
  """A dispatched `route_requests` whose overflow flag is not read yet (`resolve` reads it)."""

  plan: HostShardPlan
  ids: jax.Array
  capacity: int
  outputs: tuple[jax.Array, jax.Array, jax.Array]

  def resolve(self) -> RowRequests:
    """The routed requests; routes again with exact buckets (C = m) if any bucket of any
    device overflowed (a collective then: every process resolves in the same order)."""
    per_device = math.prod(self.ids.shape) // self.plan.num_devices
    slot, requests, overflow = self.outputs
    capacity = self.capacity
    if capacity < per_device and int(np.asarray(overflow.addressable_data(0))):
      capacity = per_device
      slot, requests, _ = _route_fn(self.plan, capacity)(self.ids)
    return RowRequests(slot, requests, capacity, tuple(self.ids.shape))


def dispatch_route(plan: HostShardPlan, local_flat_ids: np.ndarray) -> PendingRoute:
  """Step 1 without waiting: dispatches the routing of this process's flat ids [b_p, T, H]
  (a collective: every process calls it) with capped buckets (`plan.capacity`)."""
  ids = global_ids(plan, local_flat_ids)
  capacity = plan.capacity(math.prod(ids.shape) // plan.num_devices)
  return PendingRoute(plan, ids, capacity, _route_fn(plan, capacity)(ids))


def route_requests(plan: HostShardPlan, local_flat_ids: np.ndarray) -> RowRequests:
  """Step 1: routes this process's flat ids [b_p, T, H] (a collective: every process calls it).

  Uses capped buckets (`plan.capacity`) and routes again with exact ones when any bucket of
  any device overflowed, so the result is exact for any ids."""
  return dispatch_route(plan, local_flat_ids).resolve()


# -- 3. / 4. inside the step (traceable) --------------------------------------------------------
def receive_rows(plan: HostShardPlan, answers: jax.Array, req: RowRequests) -> jax.Array:
  """Step 3: answers [D*D*C, d] (`serve`) -> rows [B, T, H*d] split over the batch like the ids."""
  b, t, h = req.ids_shape
  b //= plan.num_devices
  d = answers.shape[-1]

  def body(answers_block, slot_block):
    back = lax.all_to_all(answers_block, plan.axes, 0, 0, tiled=True)  # [D*C, d]
    rows = jnp.take(back, slot_block, axis=0, mode="fill", fill_value=0)
    return rows.reshape(b, t, h * d)

  return jax.shard_map(body, mesh=plan.mesh, in_specs=(plan.spec, plan.spec), out_specs=plan.spec)(answers, req.slot)


def return_grads(plan: HostShardPlan, row_grads: jax.Array, req: RowRequests) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Step 4: row gradients [B, T, H*d] -> per owner device (unique, summed, count).

  Returns global arrays split over the plan's axes: unique int32 [D*D*C] (each device's
  distinct local rows ascending, padded with Rs), summed [D*D*C, d] (the summed gradient of
  each, zero on padding), count int32 [D] (distinct rows per device). Padding and empty
  slots carry zeros, so a global norm over `summed` is the table gradient's norm."""
  h = req.ids_shape[-1]
  rs = plan.rows_per_device

  def body(g_block, slot_block, requests_block):
    d = g_block.shape[-1] // h
    g = g_block.reshape(-1, d)
    # repeats of an id share its slot: their gradients are summed before they travel
    send = jnp.zeros((requests_block.shape[0], d), g.dtype).at[slot_block].add(g, mode="drop")
    received = lax.all_to_all(send, plan.axes, 0, 0, tiled=True)  # [D*C, d], aligned with requests
    target = jnp.where(requests_block >= 0, requests_block, rs)
    unique, inverse = jnp.unique(target, size=target.shape[0], fill_value=rs, return_inverse=True)
    summed = jnp.zeros_like(received).at[inverse.reshape(-1)].add(received)
    summed = jnp.where((unique < rs)[:, None], summed, 0)
    count = jnp.sum(unique < rs, dtype=jnp.int32)[None]
    return unique, summed, count

  return jax.shard_map(body, mesh=plan.mesh, in_specs=(plan.spec,) * 3, out_specs=(plan.spec,) * 3)(
    row_grads, req.slot, req.requests
  )


# -- the process's shard (host) -------------------------------------------------------------------
def _local_blocks(plan: HostShardPlan, array: jax.Array) -> list[tuple[int, np.ndarray]]:
  """(shard position, block as NumPy) of every device of this process, by position."""
  pos = plan.device_positions()
  return sorted((pos[s.device], np.asarray(s.data)) for s in array.addressable_shards)


class ShardedHostTable:
  """Rows [lo, hi) of a flat host table [R, d] and their row-sparse Adam state (this process).

  Attributes:
    plan: the `HostShardPlan`.
    lo, hi: the process's rows; `table` [hi - lo, d] NumPy; `state` a `RowState`
      (m, v [hi - lo, d], count int32 [hi - lo]).
  """

  def __init__(self, plan: HostShardPlan, table: np.ndarray, state: RowState | None = None):
    self.plan = plan
    self.lo, self.hi = plan.process_range(jax.process_index())
    if table.ndim != 2 or table.shape[0] != self.hi - self.lo:
      raise ValueError(
        f"process {jax.process_index()} holds rows [{self.lo}, {self.hi}) of the host table: "
        f"its shard must be [{self.hi - self.lo}, d], got {table.shape}"
      )
    self.table = table
    if state is None:  # zero state, as `SparseRowAdam.init` makes for a NumPy table
      dt = np.float32 if table.dtype.itemsize < 4 else table.dtype
      state = RowState(np.zeros(table.shape, dt), np.zeros(table.shape, dt), np.zeros(table.shape[0], np.int32))
    if tuple(state.m.shape) != table.shape or tuple(state.count.shape) != table.shape[:1]:
      raise ValueError(
        f"optimizer state m {state.m.shape} / count {state.count.shape} does not fit the shard {table.shape}"
      )
    self.state = state
    self._first = plan.process_positions(jax.process_index())[0]

  @classmethod
  def from_full(cls, plan: HostShardPlan, full: np.ndarray) -> ShardedHostTable:
    """Copies this process's rows out of the whole table [R, d] (the caller drops `full`)."""
    if full.shape[0] != plan.num_rows:
      raise ValueError(f"the full table has {full.shape[0]} rows, the plan {plan.num_rows}")
    lo, hi = plan.process_range(jax.process_index())
    return cls(plan, np.array(full[lo:hi], copy=True))

  @property
  def dim(self) -> int:
    """Values per row (d_h)."""
    return int(self.table.shape[1])

  def nbytes(self) -> int:
    """Host bytes of the shard: table + m + v + count."""
    return int(self.table.nbytes + self.state.m.nbytes + self.state.v.nbytes + self.state.count.nbytes)

  def serve(self, req: RowRequests) -> jax.Array:
    """Step 2: the rows this process's devices were asked for -> answers [D*D*C, d] (global)."""
    rs, blocks = self.plan.rows_per_device, []
    sharding = self.plan.sharding
    devices = {p: d for d, p in self.plan.device_positions().items()}
    for pos, requests in _local_blocks(self.plan, req.requests):
      local = (pos - self._first) * rs + requests.astype(np.int64)
      rows = np.take(self.table, np.where(requests >= 0, local, 0), axis=0)
      rows[requests < 0] = 0
      blocks.append(jax.device_put(rows, devices[pos]))
    shape = (req.requests.shape[0], self.dim)
    return jax.make_array_from_single_device_arrays(shape, sharding, blocks)

  def updated_rows(self, unique: jax.Array, count: jax.Array) -> np.ndarray:
    """Global flat row ids (int64) updated by a step's sparse grads on this process."""
    return self._rows(unique, count)[0] + self.lo

  def _rows(self, unique: jax.Array, count: jax.Array) -> tuple[np.ndarray, list[slice]]:
    rs = self.plan.rows_per_device
    counts = dict(_local_blocks(self.plan, count))
    rows, picks, start = [], [], 0
    for pos, u in _local_blocks(self.plan, unique):
      n = int(counts[pos][0])
      rows.append((pos - self._first) * rs + u[:n].astype(np.int64))
      picks.append(slice(start, start + n))
      start += u.shape[0]
    return np.concatenate(rows), picks

  def apply_update(self, adam: RowOptimizer, unique: jax.Array, summed: jax.Array, count: jax.Array, lr: float):
    """Step 5: `SparseRowAdam` on this process's rows; returns the updated global row ids."""
    rows, picks = self._rows(unique, count)
    grads = np.concatenate([g for _, g in _local_blocks(self.plan, summed)])
    grads = np.concatenate([grads[p] for p in picks])
    self.table, self.state = adam.apply(self.table, self.state, rows, grads, None, lr=lr)
    return rows + self.lo


def exchange_bytes(plan: HostShardPlan, req: RowRequests, dim: int, itemsize: int) -> dict[str, int]:
  """Bytes one device sends per step for one table: its all_to_all buffers (ids, rows, grads)
  and the part of them addressed to other devices ((D-1)/D)."""
  slots = plan.num_devices * req.capacity
  sent = {"ids": slots * 4, "rows": slots * dim * itemsize, "grads": slots * dim * itemsize}
  total = sum(sent.values())
  return {**sent, "total": total, "cross_device": total * (plan.num_devices - 1) // plan.num_devices}


# -- checkpoints ---------------------------------------------------------------------------------
def _name(what: str, process: int, count: int) -> str:
  return f"{what}.p{process}-of-{count}.npy"


def _default_barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _write_npy(path: Path, array: np.ndarray) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    np.save(f, array)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_shards(
  directory: str | os.PathLike,
  tables: Mapping[int, ShardedHostTable],
  *,
  step: int,
  barrier: Callable[[str], None] = _default_barrier,
) -> Path:
  """Writes every process's shards of `tables` {layer: table} (a collective: all call it).

  Layout: directory/layer_{l}/{table,m,v,count}.p{i}-of-{n}.npy + rows.p{i}-of-{n}.json and,
  once every process has written, directory/manifest.json (by process 0). Refuses a
  directory that already has a manifest (checkpoints are not overwritten in place)."""
  root = Path(directory)
  if (root / MANIFEST).exists():
    raise FileExistsError(f"{root} already holds a host-shard checkpoint ({MANIFEST}); save to a new directory")
  write_shard_files(root, tables)
  barrier(f"engram_jax.host_shards.save.{step}")
  if jax.process_index() == 0:
    write_manifest(root, manifest_of(tables, step))
  barrier(f"engram_jax.host_shards.saved.{step}")
  return root


def write_shard_files(directory: str | os.PathLike, tables: Mapping[int, ShardedHostTable]) -> None:
  """This process's part of `save_shards`: its .npy and rows .json files (no manifest)."""
  root = Path(directory)
  p, n = jax.process_index(), jax.process_count()
  for layer, t in sorted(tables.items()):
    sub = root / f"layer_{layer}"
    sub.mkdir(parents=True, exist_ok=True)
    for what, array in zip(ARRAYS, (t.table, *t.state)):
      _write_npy(sub / _name(what, p, n), np.asarray(array))
    meta = {"lo": t.lo, "hi": t.hi, "num_rows": t.plan.num_rows, "dim": t.dim}
    tmp = sub / f"rows.p{p}-of-{n}.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, sub / f"rows.p{p}-of-{n}.json")


def manifest_of(tables: Mapping[int, ShardedHostTable], step: int) -> dict:
  """The manifest of a checkpoint of `tables` at `step`: step, process count, layers, rows."""
  return {
    "step": int(step),
    "process_count": jax.process_count(),
    "layers": sorted(int(l) for l in tables),
    "num_rows": {str(l): tables[l].plan.num_rows for l in sorted(tables)},
  }


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
  """Writes directory/manifest.json atomically: call it once every process's files are written."""
  tmp = Path(directory) / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest))
  os.replace(tmp, Path(directory) / MANIFEST)


def read_manifest(directory: str | os.PathLike) -> dict:
  """The manifest of a complete host-shard checkpoint (ValueError naming the file if absent)."""
  path = Path(directory) / MANIFEST
  if not path.exists():
    raise ValueError(f"{path} is missing: {directory} is not a complete host-shard checkpoint")
  return json.loads(path.read_text())


def load_shards(
  directory: str | os.PathLike, plans: Mapping[int, HostShardPlan], *, reshard: bool = True
) -> dict[int, ShardedHostTable]:
  """This process's `ShardedHostTable` of every layer from `save_shards`' files.

  Same process count: reads its own files (their row range must match the plan's). Another
  count: with `reshard` copies its rows [lo, hi) out of every old process's files
  (memory-mapped, only the overlapping rows are read); without, refuses."""
  root = Path(directory)
  manifest = read_manifest(root)
  if sorted(manifest["layers"]) != sorted(plans):
    raise ValueError(f"{root / MANIFEST} holds host layers {manifest['layers']}, expected {sorted(plans)}")
  old_n, p, n = int(manifest["process_count"]), jax.process_index(), jax.process_count()
  if old_n != n and not reshard:
    raise ValueError(f"{root} was saved by {old_n} processes; this run has {n} (pass reshard=True to reshard)")
  out = {}
  for layer, plan in sorted(plans.items()):
    sub = root / f"layer_{layer}"
    saved_rows = int(manifest["num_rows"][str(layer)])
    if saved_rows != plan.num_rows:
      raise ValueError(f"{root / MANIFEST}: Engram layer {layer} has {saved_rows} rows, the model {plan.num_rows}")
    lo, hi = plan.process_range(p)
    if old_n == n:
      meta = json.loads((sub / f"rows.p{p}-of-{n}.json").read_text())
      if (meta["lo"], meta["hi"]) != (lo, hi):
        raise ValueError(
          f"{sub}: process {p} saved rows [{meta['lo']}, {meta['hi']}), this run's process {p} holds [{lo}, {hi}) "
          "(a different mesh); reshard by loading onto another process count or rebuild the mesh"
        )
      arrays = [np.load(sub / _name(w, p, n)) for w in ARRAYS]
    else:
      arrays = _reshard_read(sub, old_n, lo, hi)
    out[layer] = ShardedHostTable(plan, arrays[0], RowState(*arrays[1:]))
  return out


def assemble_tables(directory: str | os.PathLike, what: tuple[str, ...] = ("table",)) -> dict[int, list[np.ndarray]]:
  """Every layer's whole arrays `what` (of "table", "m", "v", "count") from `save_shards`'
  files of any process count, joined in one process: {layer: [array [R, ...] per name]}
  (e.g. to evaluate or decode a run on one host; memory-mapped reads, one copy each).
  Refuses an incomplete checkpoint (no manifest, or shards that do not cover [0, R))."""
  root = Path(directory)
  manifest = read_manifest(root)
  bad = [w for w in what if w not in ARRAYS]
  if bad:
    raise ValueError(f"assemble_tables: unknown arrays {bad}; choose among {ARRAYS}")
  n = int(manifest["process_count"])
  return {
    int(l): _reshard_read(root / f"layer_{l}", n, 0, int(manifest["num_rows"][str(l)]), what)
    for l in manifest["layers"]
  }


def _reshard_read(sub: Path, old_n: int, lo: int, hi: int, what: tuple[str, ...] = ARRAYS) -> list[np.ndarray]:
  arrays, covered = None, 0
  for q in range(old_n):
    meta = json.loads((sub / f"rows.p{q}-of-{old_n}.json").read_text())
    a, b = max(lo, meta["lo"]), min(hi, meta["hi"])
    parts = [np.load(sub / _name(w, q, old_n), mmap_mode="r") for w in what]
    if arrays is None:
      arrays = [np.zeros((hi - lo,) + x.shape[1:], x.dtype) for x in parts]
    if a < b:
      for dst, src in zip(arrays, parts):
        dst[a - lo : b - lo] = src[a - meta["lo"] : b - meta["lo"]]
      covered += b - a
  if covered != hi - lo:
    raise ValueError(f"{sub}: the saved shards cover {covered} of this process's {hi - lo} rows [{lo}, {hi})")
  return arrays


__all__ = [
  "HostShardPlan",
  "PendingRoute",
  "RowOptimizer",
  "RowRequests",
  "RowState",
  "ShardedHostTable",
  "assemble_tables",
  "exchange_bytes",
  "global_ids",
  "dispatch_route",
  "load_shards",
  "manifest_of",
  "read_manifest",
  "receive_rows",
  "return_grads",
  "route_requests",
  "save_shards",
  "write_manifest",
  "write_shard_files",
]
