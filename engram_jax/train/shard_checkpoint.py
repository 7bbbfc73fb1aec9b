"""The `host_shards` item of a checkpoint: host-placed Engram tables split over the processes
of a multi-process run (`engram_jax.distributed.host_shards.ShardedHostTable`) with their
row-sparse Adam state.

Layout: <checkpoints>/<step>/host_shards/ as `host_shards.save_shards` writes it: per layer
layer_<l>/{table,m,v,count}.p<i>-of-<n>.npy and rows.p<i>-of-<n>.json (each process writes
its own rows [lo, hi)), and manifest.json (step, process count, layers, rows; process 0).
The item folder is inside orbax's temporary step folder, which orbax renames to <step> only
after every process has written every item, so a step folder is complete or absent.

Restore: onto the process count that saved it, each process reads its own files (a
different count is refused with both counts named: the training run's data iterator
positions are per process too). `host_shards.assemble_tables` joins the shards of any
count in one process (what `load_run` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import orbax.checkpoint as ocp

from engram_jax.distributed import host_shards
from engram_jax.distributed.host_shards import HostShardPlan, ShardedHostTable

ITEM = "host_shards"


def _no_barrier(name: str) -> None:
  del name  # orbax commits the step folder once every process has saved


class HostShardsHandler(ocp.CheckpointHandler):
  """Writes / reads this process's table shards (see the module docstring)."""

  def save(self, directory, args: HostShardsSave) -> None:
    host_shards.save_shards(str(directory), args.tables, step=args.step, barrier=_no_barrier)

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
