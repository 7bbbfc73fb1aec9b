r"""Ablations at a fixed budget (ENGRAM_SPEC.md §6): remove one Engram component at a time.

  python -m experiments.ablations --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--ablations=...] [--seeds=0] [--steps=N]

Every variant starts from the config's Engram model allocated at its rho (default 0.8):
  full              the model as allocated
  no_multi_branch   one gate from the mean of the branch streams, one Y added to every
                    stream (ModelConfig.engram_multi_branch=False)
  no_compression    hashing of raw token ids (no tokenizer compression)
  no_gate           alpha = 1 (engram_gate="none")
  no_short_conv     Y = u (engram_short_conv=False)
  add_4gram         orders 2-4 (max_ngram_size=4), re-allocated to the same total budget
Budgets: the removals keep the expert count and the Engram slots of `full`, so the total
changes only by the removed component's parameters (listed per row); add_4gram is
re-solved by the allocation helper at the same total and rho (fewer slots per head, a
wider memory). Resumable. Writes <workdir>/ablations/{results.json, table.md, ablations.png}.
"""

from __future__ import annotations

import logging
from pathlib import Path

from absl import app, flags

from experiments import cli, sweep_lib
from experiments.configs import common

ABLATIONS = ("no_multi_branch", "no_compression", "no_gate", "no_short_conv", "add_4gram")

NAME = "ablations"


def full_config(config, seed):
  c = sweep_lib.with_seed(config, seed)
  c.variant = "engram"
  return c


def variant(config, which: str, seed: int) -> sweep_lib.Variant:
  """The `which` ablation (or "full") of the config's Engram model."""
  c = full_config(config, seed)
  full = common.model_config(c)
  info = {"ablation": which, "rho_target": float(c.allocation.rho)}
  name = f"abl-{which}-h{c.model.hidden_size}-s{seed}"
  if which == "full":
    model = full
  elif which == "no_multi_branch":
    if full.hc_mult == 1:
      raise ValueError("no_multi_branch needs hc_mult > 1 (the config has one residual stream)")
    model = full.replace(engram_multi_branch=False)
  elif which == "no_compression":
    c.engram.compress_tokens = False
    model = full
  elif which == "no_gate":
    model = full.replace(engram_gate="none")
  elif which == "no_short_conv":
    model = full.replace(engram_short_conv=False)
  elif which == "add_4gram":
    c.engram.max_ngram_size = 4
    c.engram.vocab_sizes = [int(c.engram.vocab_sizes[0])] * 3
    # a third memory branch widens d_mem by half: +5% active parameters at micro, +10% at small
    c.allocation.active_rtol = max(float(c.allocation.active_rtol), 0.15)
    model = common.model_config(c)
  else:
    raise ValueError(f"unknown ablation {which!r}; choose from {ABLATIONS}")
  return sweep_lib.Variant(name, c, model, info=info)


def variants(config, ablations, seeds) -> list[sweep_lib.Variant]:
  return [variant(config, which, s) for s in seeds for which in ("full", *ablations)]


def summarize(rows: list[dict]) -> str:
  fulls = {r["seed"]: r for r in rows if r["ablation"] == "full"}
  for r in rows:
    f = fulls.get(r["seed"])
    r["delta_vs_full"] = None if f is None else r["val_loss"] - f["val_loss"]
    r["params_delta"] = None if f is None else r["params_total"] - f["params_total"]
  cols = [("variant", "ablation", str), ("seed", "seed", str),
          ("experts", "num_experts", str), ("slots/head", "slots_per_head", lambda v: str((v or [0])[0])),
          ("params total", "params_total", sweep_lib.fmt(",")),
          ("params vs full", "params_delta", sweep_lib.fmt("+,")),
          ("val loss", "val_loss", sweep_lib.fmt(".4f")),
          ("loss change vs full", "delta_vs_full", sweep_lib.fmt("+.4f"))]
  return sweep_lib.markdown_table(rows, cols)


def plot(rows: list[dict], path: Path) -> Path:
  fig, ax = sweep_lib.new_figure(6.4, 3.6)
  ab = [r for r in rows if r["ablation"] != "full" and r["delta_vs_full"] is not None]
  labels = [f"{r['ablation']} (s{r['seed']})" if len({x['seed'] for x in ab}) > 1 else r["ablation"] for r in ab]
  ax.barh(labels, [r["delta_vs_full"] for r in ab],
          color=["tab:red" if r["delta_vs_full"] > 0 else "tab:green" for r in ab])
  ax.axvline(0, color="black", lw=0.8)
  ax.set_xlabel("validation loss change vs full Engram (nats/token; > 0: the change hurts)")
  ax.set_title("Ablations at a fixed budget")
  ax.invert_yaxis()
  return sweep_lib.save_figure(fig, path)


def run(config, workdir: str, ablations, seeds, *, steps=None, train=True) -> dict:
  config = sweep_lib.with_overrides(config, steps=steps)
  planned = variants(config, ablations, seeds)
  return sweep_lib.run_and_report(NAME, planned, workdir, train=train,
                                  report=lambda rows: ({}, summarize(rows)),
                                  plot=lambda rows, extra, path: plot(rows, path))



def define_flags() -> dict:
  """The command-line flags (defined only when run as a script)."""
  return {**cli.define_flags("seeds", "steps"),
          "ablations": flags.DEFINE_list("ablations", list(ABLATIONS), "Ablations to run (full always runs).")}


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  run(_F['config'].value, _F['workdir'].value, list(_F['ablations'].value), sweep_lib.parse_ints(_F['seeds'].value),
      steps=_F['steps'].value)


_F: dict = {}

if __name__ == "__main__":
  _F.update(define_flags())
  app.run(main)
