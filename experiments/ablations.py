r"""Ablations at a fixed budget (ENGRAM_SPEC.md §6): remove one Engram component at a time.

  python -m experiments.ablations --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--ablations=...] [--seeds=0,1,2] [--steps=N]

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

from absl import flags

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


def summarize(rows: list[dict]) -> tuple[list[dict], str]:
  """Per ablation: the parameter change and the paired loss change against the full model
  of the same seeds (same validation tokens), ± SE over seeds. > 0: the removal hurts."""
  fulls = {sweep_lib.pair_key(r): r for r in rows if sweep_lib.ok(r) and r["ablation"] == "full"}
  params = {}
  for r in rows:
    f = fulls.get(sweep_lib.pair_key(r)) if sweep_lib.ok(r) else None
    r["params_delta"] = None if f is None else r["params_total"] - f["params_total"]
    if sweep_lib.ok(r):
      params.setdefault(r["ablation"], r)
  paired = sweep_lib.paired_summary(rows, group=lambda r: r["ablation"], is_ref=lambda r: r["ablation"] == "full")
  lines = [
    sweep_lib.paired_table(paired, "variant"),
    "",
    "| variant | experts | slots/head | params total | params vs full |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, r in params.items():
    delta = "-" if r["params_delta"] is None else f"{r['params_delta']:+,}"
    lines.append(
      f"| {name} | {r['num_experts']} | {(r.get('slots_per_head') or [0])[0]} | {r['params_total']:,} | {delta} |"
    )
  return paired, "\n".join(lines)


PLOT = {"title": "Ablations at a fixed budget (> 0: the removal hurts)", "label": "variant"}


def run(config, workdir: str, ablations, seeds, *, steps=None, train=True) -> dict:
  planned = variants(sweep_lib.with_overrides(config, steps=steps), ablations, seeds)
  return sweep_lib.run_and_report(NAME, planned, workdir, train=train, summarize=summarize, parts=["paired"], plot=PLOT)


def main(f: dict) -> None:
  """The script: every flag's value in `f` (`cli.values`)."""
  run(f["config"], f["workdir"], list(f["ablations"]), f["seeds"], steps=f["steps"])


if __name__ == "__main__":
  cli.start(
    main, "seeds", "steps", ablations=(flags.DEFINE_list, list(ABLATIONS), "Ablations to run (full always runs).")
  )
