r"""Controls for the memory story (ENGRAM_SPEC.md §6): does the table memorize anything?

  python -m experiments.controls --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--seeds=0] [--steps=N]

Against the full Engram model (allocated at the config's rho):
  one_slot_per_head   every head's table holds 1 row (ModelConfig.engram_fold_rows=1): the
                      same hashing, gathers, projections, gate and conv, i.e. the same
                      compute, but no memory (each head reads one learned vector)
  frozen_random_table the tables keep their random init (TrainConfig.freeze_engram_tables):
                      the n-gram addresses still select distinct random vectors (a fixed
                      random n-gram feature), but nothing is written into them
  moe                 the MoE twin at the same total budget (rho = 1), for reference
If the full model beats both controls, what the table learns per n-gram, not the extra
projections or compute, is what helps. Resumable. Writes <workdir>/controls/{results.json,
table.md, controls.png}.
"""

from __future__ import annotations

import logging
from pathlib import Path

from absl import app

from experiments import cli, sweep_lib
from experiments.ablations import variant as ablation_variant
from experiments.configs import common

NAME = "controls"
CONTROLS = ("full", "one_slot_per_head", "frozen_random_table", "moe")


def variant(config, which: str, seed: int) -> sweep_lib.Variant:
  full = ablation_variant(config, "full", seed)   # same run as the ablations' and sweep's
  c, model = full.config.copy_and_resolve_references(), full.model
  if which == "full":
    pass
  elif which == "one_slot_per_head":
    model = model.replace(engram_fold_rows=1)
  elif which == "frozen_random_table":
    c.train.freeze_engram_tables = True
  elif which == "moe":
    c.variant = "moe"
    model = common.model_config(c)
  else:
    raise ValueError(f"unknown control {which!r}; choose from {CONTROLS}")
  return sweep_lib.Variant(f"ctl-{which}-h{c.model.hidden_size}-s{seed}", c, model,
                           info={"control": which})


def summarize(rows: list[dict]) -> str:
  fulls = {r["seed"]: r for r in rows if r["control"] == "full"}
  for r in rows:
    f = fulls.get(r["seed"])
    r["delta_vs_full"] = None if f is None else r["val_loss"] - f["val_loss"]
    r["train_val_gap"] = r["val_loss"] - r["train_loss_tail"]
  cols = [("model", "control", str), ("seed", "seed", str),
          ("params total", "params_total", sweep_lib.fmt(",")),
          ("table params", "params_engram_table", sweep_lib.fmt(",")),
          ("FLOPs/token", "flops_per_token", sweep_lib.fmt(",")),
          ("train loss (last 4 logs)", "train_loss_tail", sweep_lib.fmt(".4f")),
          ("val loss", "val_loss", sweep_lib.fmt(".4f")),
          ("val loss vs full", "delta_vs_full", sweep_lib.fmt("+.4f"))]
  return sweep_lib.markdown_table(rows, cols)


def plot(rows: list[dict], path: Path) -> Path:
  fig, ax = sweep_lib.new_figure(6.4, 3.4)
  if not rows:
    return sweep_lib.save_figure(fig, path)
  labels = [f"{r['control']} (s{r['seed']})" for r in rows]
  ax.barh(labels, [r["val_loss"] for r in rows], color="tab:blue")
  lo = min(r["val_loss"] for r in rows)
  hi = max(r["val_loss"] for r in rows)
  ax.set_xlim(lo - 0.5 * (hi - lo + 1e-3), hi + 0.5 * (hi - lo + 1e-3))
  ax.set_xlabel("validation loss (nats/token; x axis zoomed to the spread)")
  ax.set_title("Controls: is the memory used?")
  ax.invert_yaxis()
  return sweep_lib.save_figure(fig, path)


def run(config, workdir: str, seeds, *, steps=None, train=True) -> dict:
  config = sweep_lib.with_overrides(config, steps=steps)
  planned = [variant(config, w, s) for s in seeds for w in CONTROLS]
  return sweep_lib.run_and_report(NAME, planned, workdir, train=train,
                                  report=lambda rows: ({}, summarize(rows)),
                                  plot=lambda rows, extra, path: plot(rows, path))



def define_flags() -> dict:
  """The command-line flags (defined only when run as a script)."""
  return cli.define_flags("seeds", "steps")


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  run(_F['config'].value, _F['workdir'].value, sweep_lib.parse_ints(_F['seeds'].value), steps=_F['steps'].value)


_F: dict = {}

if __name__ == "__main__":
  _F.update(define_flags())
  app.run(main)
