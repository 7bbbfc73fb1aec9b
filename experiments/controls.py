r"""Controls for the memory story (ENGRAM_SPEC.md §6): does the table memorize anything?

  python -m experiments.controls --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--seeds=0,1,2] [--steps=N]

Against the full Engram model (allocated at the config's rho):
  one_slot_per_head   every head's table holds 1 row (ModelConfig.engram_fold_rows=1): the
                      same hashing, gathers, projections, gate and conv, i.e. the same
                      compute, but no memory (each head reads one learned vector)
  frozen_random_table the tables keep their random init (TrainConfig.freeze_engram_tables):
                      the n-gram addresses still select distinct random vectors (a fixed
                      random n-gram feature), but nothing is written into them
  moe                 the MoE twin at the same total budget (rho = 1), for reference
If the full model beats both controls, what the table learns per n-gram, not the extra
projections or compute, is what helps. Each control also gets the fact-recall probe
(`experiments.fact_probe`): the value-token loss of planted facts, seen and held out. Resumable. Writes <workdir>/controls/{results.json,
table.md, controls.png}.
"""

from __future__ import annotations

import math

from experiments import cli, sweep_lib
from experiments.ablations import variant as ablation_variant
from experiments.configs import common

NAME = "controls"
CONTROLS = ("full", "one_slot_per_head", "frozen_random_table", "moe")


def variant(config, which: str, seed: int) -> sweep_lib.Variant:
  full = ablation_variant(config, "full", seed)  # same run as the ablations' and sweep's
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
  return sweep_lib.Variant(f"ctl-{which}-h{c.model.hidden_size}-s{seed}", c, model, info={"control": which})


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict], str]:
  """Paired differences to the full model (same seeds, same validation tokens) ± SE over
  seeds, and the fact-recall probe of every control (mean ± SE over seeds)."""
  paired = sweep_lib.paired_summary(rows, group=lambda r: r["control"], is_ref=lambda r: r["control"] == "full")
  for r in rows:
    r["train_val_gap"] = r["val_loss"] - r["train_loss_tail"] if sweep_lib.ok(r) else None
  table = "Validation loss, paired against the full Engram model:\n\n" + sweep_lib.paired_table(paired, "model")
  probes = fact_summary(rows)
  if probes:
    table += (
      "\n\nFact-recall probe (value-token cross-entropy in nats and accuracy; seen = planted in "
      "training, unseen = held out; mean ± SE over seeds):\n\n"
      "| model | seeds | seen CE | unseen CE | seen - unseen CE | seen accuracy | seen CE vs full (paired) |"
      "\n|---|---:|---:|---:|---:|---:|---:|\n"
      + "\n".join(
        f"| {p['control']} | {p['n']} | {fmt_pm(p['seen_ce'])} | {fmt_pm(p['unseen_ce'])} | "
        f"{fmt_pm(p['gap'], signed=True)} | {fmt_pm(p['seen_acc'])} | "
        f"{fmt_pm(p['seen_vs_full'], signed=True)} |"
        for p in probes
      )
    )
  return paired, probes, table


def fmt_pm(v: tuple[float, float], signed: bool = False) -> str:
  mean, se = v
  if mean is None or not math.isfinite(mean):
    return "-"
  s = sweep_lib.stats.format_pm(mean, se, 3)
  return s if signed else s.lstrip("+")


def fact_summary(rows: list[dict]) -> list[dict]:
  """Per control: the probe's seen / unseen CE, their gap and the seen accuracy, mean ± SE
  over seeds, and the seen CE minus the full model's of the same seeds."""
  with_probe = [r for r in rows if sweep_lib.ok(r) and r.get("fact_probe", {}).get("seen_ce") is not None]
  full = {sweep_lib.pair_key(r): r["fact_probe"] for r in with_probe if r["control"] == "full"}
  out = []
  for control in CONTROLS:
    rs = [r for r in with_probe if r["control"] == control]
    if not rs:
      continue
    ps = [r["fact_probe"] for r in rs]
    vs_full = [
      r["fact_probe"]["seen_ce"] - full[sweep_lib.pair_key(r)]["seen_ce"] for r in rs if sweep_lib.pair_key(r) in full
    ]
    ms = sweep_lib.stats.mean_se
    out.append(
      {
        "control": control,
        "n": len(rs),
        "seen_ce": ms([p["seen_ce"] for p in ps]),
        "unseen_ce": ms([p["unseen_ce"] for p in ps]),
        "gap": ms([p["seen_minus_unseen_ce"] for p in ps]),
        "seen_acc": ms([p["seen_acc"] for p in ps]),
        "seen_vs_full": ms(vs_full) if vs_full else (None, None),
      }
    )
  return out


PLOT = {"title": "Controls: is the memory used? (0 = full Engram)", "label": "model"}


def run(config, workdir: str, seeds, *, steps=None, train=True) -> dict:
  config = sweep_lib.with_overrides(config, steps=steps)
  planned = [variant(config, w, s) for s in seeds for w in CONTROLS]
  parts = ["paired", "fact_probe"]
  return sweep_lib.run_and_report(NAME, planned, workdir, train=train, summarize=summarize, parts=parts, plot=PLOT)


def main(f: dict) -> None:
  """The script: every flag's value in `f` (`cli.values`)."""
  run(f["config"], f["workdir"], f["seeds"], steps=f["steps"])


if __name__ == "__main__":
  cli.start(main, "seeds", "steps")
