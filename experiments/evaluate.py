r"""Evaluate a saved run on its validation set: mean loss with its SE, optionally paired.

  python -m experiments.evaluate --checkpoint=runs/default/engram [--step=300] [--tables=host] \
      [--against=runs/default/moe]

The loss is the mean over the validation tokens with its standard error clustered by
sequence (`engram_jax.train.stats`). --against evaluates a second run on the same tokens
and prints the paired difference (this run minus that one) with its SE. 
Without --step the newest intact checkpoint is evaluated: an unreadable newer one is
reported (with its path) and skipped; "step" in the output says which was used. --tables=host
keeps the tables of a run trained with host-placed tables in host memory (for tables
larger than device memory); the loss equals --tables=device's.
"""

from __future__ import annotations

import json

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory or its checkpoints/ folder.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_TABLES = flags.DEFINE_enum(
  "tables",
  "device",
  ["device", "host"],
  "Where the host-placed Engram tables of a run trained with table_placement=host/cached go on loading.",
)
_EVAL_BATCHES = flags.DEFINE_integer("num_eval_batches", None, "Cap on the number of validation batches.")
_AGAINST = flags.DEFINE_string("against", None, "A second run, scored on the same tokens: paired difference.")


def main(argv):
  del argv
  from engram_jax.train import evaluation, stats
  from engram_jax.train.restore import load_run

  run = load_run(_CHECKPOINT.value, step=_STEP.value, tables=_TABLES.value)
  data = run.data_config
  if _EVAL_BATCHES.value is not None:
    data = data.replace(num_eval_batches=_EVAL_BATCHES.value)
  rows, fingerprint = evaluation.evaluate_run_rows(run, data)
  metrics = evaluation.summarize_rows(rows)
  out = {
    "checkpoint": _CHECKPOINT.value,
    "step": run.step,
    "tables": _TABLES.value,
    "se": "clustered by sequence",
    **metrics,
  }
  print(
    f"val loss {metrics['val_loss']:.4f} ± {metrics['val_loss_se']:.4f} (SE clustered by sequence, "
    f"{metrics['val_sequences']:.0f} sequences, {metrics['val_tokens']:.0f} tokens)"
  )
  if _AGAINST.value:
    other = load_run(_AGAINST.value, tables=_TABLES.value)
    # the same tokens: this run's validation set, hashed for the other model
    rows_b, fp_b = evaluation.evaluate_run_rows(other, data)
    d, se = evaluation.paired(rows, {"fingerprint": fingerprint}, rows_b, {"fingerprint": fp_b})
    out.update(
      {"against": _AGAINST.value, "paired_diff": d, "paired_diff_se": se, "paired_clears_2se": stats.clears(d, se)}
    )
    print(f"minus {_AGAINST.value}: {stats.format_pm(d, se)} nats/token (paired, SE clustered by sequence)")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
