r"""Train one model from a config file.

  python -m experiments.train --config=experiments/configs/tiny.py:engram \
      --workdir=runs/tiny_engram --config.train.total_steps=500

Resumes from `workdir/checkpoints` when present. Writes metrics.jsonl, TensorBoard
events, meta.json and orbax checkpoints under the workdir. Multi-process runs pass
--coordinator_address, --num_processes and --process_id (jax.distributed).
"""

from __future__ import annotations

import json
import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments.runner import build_trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py:engram",
                                          "Run config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).", required=True)
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Stop after this many steps (then resume later).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  trainer = build_trainer(_CONFIG.value, _WORKDIR.value)
  result = trainer.run(stop_after=_STOP_AFTER.value)
  summary = {"status": result.status, "step": result.step, "eval": result.eval,
             "tokens_per_second": result.tokens_per_second}
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
