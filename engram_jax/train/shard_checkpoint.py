"""The `host_shards` item of a checkpoint: host-placed Engram tables split over the processes
of a multi-process run (`engram_jax.distributed.host_shards.ShardedHostTable`) with their
row-sparse Adam state.

Layout: <checkpoints>/<step>/host_shards/ as `host_shards.save_shards` writes it: per layer
layer_<l>/{table,m,v,count}.p<i>-of-<n>.npy and rows.p<i>-of-<n>.json (each process writes
its own rows [lo, hi)), and manifest.json (step, process count, layers, rows), which process
0 writes in `finalize`, once orbax has seen every process finish writing. The item folder is
inside orbax's temporary step folder, which orbax renames to <step> only after that, so a
step folder is complete or absent.

Restore: onto the process count that saved it, each process reads its own files (a
different count is refused with both counts named: the training run's data iterator
positions are per process too). `host_shards.assemble_tables` joins the shards of any
count in one process (what `load_run` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp

from engram_jax.distributed import host_shards
from engram_jax.distributed.host_shards import HostShardPlan, ShardedHostTable

ITEM = "host_shards"


class HostShardsHandler(ocp.CheckpointHandler):
  """Writes / reads this process's table shards (see the module docstring)."""

  def __init__(self):
    self._manifest: dict | None = None

  def save(self, directory, args: HostShardsSave) -> None:
    """Every process writes its shard files; the manifest waits for `finalize`."""
    host_shards.write_shard_files(str(directory), args.tables)
    self._manifest = host_shards.manifest_of(args.tables, args.step)

  def finalize(self, directory) -> None:
    """After every process has written (orbax calls it on one): process 0 writes the manifest."""
    if self._manifest is not None and jax.process_index() == 0:
      host_shards.write_manifest(str(directory), self._manifest)
    self._manifest = None

  def restore(self, directory, args: HostShardsRestore | None = None) -> dict[int, ShardedHostTable]:
    """{layer: this process's `ShardedHostTable`} for `args.plans` (ValueError naming the
    file or the process counts when they do not fit)."""
    if args is None:
      raise ValueError(f"restoring {directory} needs HostShardsRestore(plans): the layout of this run's shards")
    return host_shards.load_shards(str(directory), args.plans, reshard=args.reshard)


@ocp.args.register_with_handler(HostShardsHandler, for_save=True)
@dataclasses.dataclass
class HostShardsSave(ocp.args.CheckpointArgs):
  """Save args: {layer: ShardedHostTable} of this process and the step they are at."""

  tables: Mapping[int, ShardedHostTable]
  step: int


@ocp.args.register_with_handler(HostShardsHandler, for_restore=True)
@dataclasses.dataclass
class HostShardsRestore(ocp.args.CheckpointArgs):
  """Restore args: {layer: HostShardPlan} of this run; `reshard` allows another process count."""

  plans: Mapping[int, HostShardPlan]
  reshard: bool = False


__all__ = ["ITEM", "HostShardsHandler", "HostShardsRestore", "HostShardsSave"]
