r"""Train one model from a config file.

  python -m experiments.train --config=experiments/configs/tiny.py:engram \
      --workdir=runs/tiny_engram --config.train.total_steps=500

Resumes from the newest intact checkpoint in `workdir/checkpoints` when present (an
unreadable newer one is reported and moved to workdir/corrupt_checkpoints), or from
--resume_step=N (the checkpoints after N are moved to workdir/superseded_checkpoints). A
second trainer on the same workdir is refused (workdir/run.lock). Writes metrics.jsonl, TensorBoard
events, meta.json and orbax checkpoints under the workdir.

Multi-process (one process per host, or per GPU): run the same command on every process
with --coordinator_address=HOST:PORT (process 0's address), --num_processes and
--process_id; or --coordinator_address=auto where jax detects the cluster (SLURM, Open MPI,
Kubernetes). `data.batch_size` is per process; the workdir must be on a shared filesystem. --data_shards
fixes the number of document streams the global batch is drawn from (default one per
process), to reproduce a multi-process run's batches on fewer processes. See
docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from experiments.runner import build_trainer

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/tiny.py:engram", "Run config file (path[:variant])."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).", required=True)
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Stop after this many steps (then resume later).")
_RESUME_STEP = flags.DEFINE_integer(
  "resume_step",
  None,
  "Resume from this checkpoint step (default: the newest intact one); the "
  "checkpoints after it are moved to workdir/superseded_checkpoints.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
_DATA_SHARDS = flags.DEFINE_integer(
  "data_shards", None, "Document streams of the global batch (default: one per process)."
)


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
  """`jax.distributed.initialize` from the flags (nothing for a single-process run)."""
  if not coordinator:
    if num_processes is not None or process_id is not None:
      raise ValueError("--num_processes / --process_id need --coordinator_address")
    return
  if coordinator == "auto":  # the cluster environment (SLURM, Open MPI, ...) says the rest
    jax.distributed.initialize()
    return
  if num_processes is None or process_id is None:
    raise ValueError(f"--coordinator_address={coordinator} needs --num_processes and --process_id")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def main(argv):
  del argv
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cli.log_to_file(Path(_WORKDIR.value) / f"run.{jax.process_index()}.log")  # after: process_index starts jax
  trainer = build_trainer(_CONFIG.value, _WORKDIR.value, data_shards=_DATA_SHARDS.value)
  result = trainer.run(stop_after=_STOP_AFTER.value, resume_step=_RESUME_STEP.value)
  summary = {
    "status": result.status,
    "step": result.step,
    "eval": result.eval,
    "tokens_per_second": result.tokens_per_second,
    "process": jax.process_index(),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
