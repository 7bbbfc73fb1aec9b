r"""Evaluate a saved run on its validation split.

  python -m experiments.evaluate --checkpoint=runs/default/engram [--step=300] [--tables=host]

Without --step the newest intact checkpoint is evaluated: an unreadable newer one is
reported (with its path) and skipped; "step" in the output says which was used.
--tables=host keeps the tables of a run trained with host-placed tables in host memory
(for tables larger than device memory); the loss equals --tables=device's.
"""

from __future__ import annotations

import json

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory or its checkpoints/ folder.",
                                  required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_TABLES = flags.DEFINE_enum("tables", "device", ["device", "host"],
                            "Where the host-placed Engram tables of a run trained with "
                            "table_placement=host/cached go on loading.")
_EVAL_BATCHES = flags.DEFINE_integer("num_eval_batches", None, "Override the number of validation batches.")


def main(argv):
  del argv
  from engram_jax.train.restore import evaluate_run, load_run

  run = load_run(_CHECKPOINT.value, step=_STEP.value, tables=_TABLES.value)
  data = run.data_config
  if _EVAL_BATCHES.value is not None:
    data = data.replace(num_eval_batches=_EVAL_BATCHES.value)
  metrics = evaluate_run(run, data)
  print(json.dumps({"checkpoint": _CHECKPOINT.value, "step": run.step, "tables": _TABLES.value,
                    **metrics}, indent=1))


if __name__ == "__main__":
  app.run(main)
