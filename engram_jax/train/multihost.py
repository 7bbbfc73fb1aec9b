"""Multi-process data parallelism: who feeds which rows of the global batch.

Every process runs the same program on a global mesh (`jax.distributed.initialize` first).
The batch dimension is sharded over the mesh's batch axes (``data`` x ``fsdp``); a process
feeds the rows its own devices hold. Processes whose devices hold the same rows (a tensor /
expert group spanning processes) form one *data group* and read the same data.

  global batch G  = DataConfig.batch_size (rows per process) x number of data groups
  data shards S   = independent document streams (`make_train_dataset(shard=(i, S))`),
                    each contributing G / S consecutive rows of every global batch;
                    data group g reads shards g*S/groups ... (g+1)*S/groups - 1.

S defaults to the number of data groups (one stream per group). Fixing S makes the global
batch independent of the process count: a 1-process run with S=2 and batch_size=G sees
exactly the batches of a 2-process run with batch_size=G/2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """This process's part of the global batch (see the module docstring)."""

  global_batch: int  # G rows per step over all processes
  process_rows: int  # rows this process feeds (DataConfig.batch_size)
  group: int  # this process's data group
  num_groups: int
  num_shards: int  # S document shards
  rows_per_shard: int  # G / S

  @property
  def shards(self) -> tuple[int, ...]:
    """The document shards this process reads, in row order."""
    per_group = self.num_shards // self.num_groups
    return tuple(range(self.group * per_group, (self.group + 1) * per_group))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes (size > 1) the batch dimension is sharded over."""
  spec = sharding_lib.logical_to_spec(("batch",), mesh)[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def model_parallel_axes(mesh: Mesh) -> dict[str, int]:
  """{axis: size} of the mesh axes > 1 other than the batch axes data / fsdp (what host-placed
  tables cannot train under)."""
  return {a: n for a, n in mesh.shape.items() if a not in ("data", "fsdp") and n > 1}


def data_layout(mesh: Mesh, process_rows: int, data_shards: int | None = None) -> DataLayout:
  """Which rows of the global batch this process feeds, from where its devices sit.

  One process feeds the whole batch (which the sharding rules may leave replicated when the
  mesh does not divide it); several processes must each hold whole batch blocks.
  """
  if jax.process_count() == 1:
    return _check_shards(DataLayout(process_rows, process_rows, 0, 1, 1, process_rows), data_shards)
  axes = batch_axes(mesh)
  blocks = math.prod(mesh.shape[a] for a in axes)  # batch blocks over the mesh
  index_map = NamedSharding(mesh, PartitionSpec(axes or None)).devices_indices_map((blocks,))
  local = sorted({index_map[d][0].start or 0 for d in mesh.devices.flat if d.process_index == jax.process_index()})
  if not local:
    raise ValueError(f"process {jax.process_index()} owns no device of the mesh {dict(mesh.shape)}")
  k = len(local)
  if local != list(range(local[0], local[0] + k)) or local[0] % k:
    raise ValueError(
      f"process {jax.process_index()} holds batch blocks {local} of {blocks}: the mesh "
      "interleaves processes along the batch axes; order mesh devices by process"
    )
  num_groups = blocks // k
  if process_rows % k:
    raise ValueError(
      f"DataConfig.batch_size={process_rows} rows per process is not divisible by the "
      f"{k} batch blocks of this process's devices (mesh {dict(mesh.shape)})"
    )
  global_batch = process_rows * num_groups
  return _check_shards(
    DataLayout(global_batch, process_rows, local[0] // k, num_groups, num_groups, process_rows), data_shards
  )


def _check_shards(layout: DataLayout, data_shards: int | None) -> DataLayout:
  """`layout` drawing from `data_shards` document shards (None: one per data group)."""
  shards = layout.num_groups if data_shards is None else data_shards
  if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1 or shards % layout.num_groups:
    raise ValueError(
      f"data_shards={data_shards!r} must be a positive multiple of the "
      f"{layout.num_groups} data groups (processes holding different batch rows)"
    )
  if layout.global_batch % shards:
    raise ValueError(
      f"data_shards={shards} does not divide the global batch of "
      f"{layout.global_batch} rows ({layout.process_rows} per process x "
      f"{layout.num_groups} data groups)"
    )
  return dataclasses.replace(layout, num_shards=shards, rows_per_shard=layout.global_batch // shards)


class ConcatBatchIterator:
  """Concatenates (along rows) batches of several shard iterators; checkpointable by grain.

  grain's orbax handler stores `get_state()` (bytes) per process and calls `set_state` and
  `start_prefetch` on restore.
  """

  def __init__(self, iterators: list[Any]):
    self.iterators = list(iterators)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    parts = [next(it) for it in self.iterators]
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *parts)

  def get_state(self) -> bytes:
    return json.dumps({"shards": [it.get_state() for it in self.iterators]}).encode()

  def set_state(self, state: bytes | dict) -> None:
    state = json.loads(state) if isinstance(state, (bytes, str)) else state
    if len(state["shards"]) != len(self.iterators):
      raise ValueError(
        f"data iterator state holds {len(state['shards'])} shards, this process reads {len(self.iterators)}"
      )
    for it, s in zip(self.iterators, state["shards"]):
      it.set_state(s)

  def start_prefetch(self) -> None:
    for it in self.iterators:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()

  def close(self) -> None:
    for it in self.iterators:
      if hasattr(it, "close"):
        it.close()


def put_process_batch(batch: dict[str, Any], shardings: Any, global_batch: int) -> Any:
  """This process's rows -> global arrays of `global_batch` rows."""
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)
  return jax.tree.map(
    lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x), (global_batch,) + x.shape[1:]),
    batch,
    shardings,
  )


def put_replicated_batch(batch: dict[str, Any], shardings: Any) -> Any:
  """A batch every process holds in full -> global arrays (each device takes its slice)."""
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(put, batch, shardings)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def assert_same_on_all_processes(text: str, what: str) -> None:
  """Raises ValueError if `text` differs between processes (e.g. a tokenizer fingerprint)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(digest))
  if not (gathered == gathered[0]).all():
    differs = [i for i in range(gathered.shape[0]) if not (gathered[i] == gathered[0]).all()]
    raise ValueError(f"{what} differs between processes: processes {differs} disagree with process 0")
