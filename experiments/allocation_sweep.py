r"""Sparsity allocation (ENGRAM_SPEC.md §6): validation loss against rho at fixed budgets.

  python -m experiments.allocation_sweep --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--rhos=1,0.9,...,0.4] [--budget_scales=1,1.5] \
      [--seeds=0,1] [--steps=N]

For each budget (the config's backbone with its hidden size times each --budget_scales
entry), the MoE twin (rho = 1) fixes the total and active parameter budget; every rho < 1
moves 1 - rho of the sparse (inactive) parameters from routed experts into Engram slots
(`engram_jax.models.accounting.allocate`), and every model trains on the same tokens.
--seeds run at the smallest budget; larger budgets use the first seed only (unless
--all_seeds). Resumable: finished runs are reused. Writes <workdir>/allocation_sweep/
{results.json, table.md, allocation_sweep.png}.
"""

from __future__ import annotations

import logging
from pathlib import Path

from absl import app, flags

from experiments import cli, sweep_lib
from experiments.configs import common

NAME = "allocation_sweep"


def variants(config, rhos, scales, seeds, all_seeds=False, secondary_rhos=None
             ) -> list[sweep_lib.Variant]:
  """Every (budget, seed, rho) run; the rho = 1 run is the MoE twin itself. The first seed
  at the smallest budget runs every rho; the other seeds and budgets run `secondary_rhos`
  (default: every rho)."""
  out = []
  for b, scale in enumerate(sorted(scales)):
    base = sweep_lib.scale_backbone(config, scale)
    for j, seed in enumerate(seeds if b == 0 or all_seeds else seeds[:1]):
      c = sweep_lib.with_seed(base, seed)
      primary = b == 0 and j == 0
      for rho in (rhos if primary or secondary_rhos is None else secondary_rhos):
        c_rho = c.copy_and_resolve_references()
        c_rho.variant = "moe" if rho >= 1.0 else "engram"
        c_rho.allocation.rho = float(rho)
        model = common.model_config(c_rho)
        name = f"alloc-h{c.model.hidden_size}-rho{rho:.2f}-s{seed}"
        out.append(sweep_lib.Variant(name, c_rho, model, info={
            "rho_target": float(rho), "budget_scale": float(scale),
            "hidden_size": int(c.model.hidden_size)}))
  return out


def summarize(rows: list[dict]) -> tuple[list[dict], str]:
  """Mean / spread over seeds per (budget, rho), and the markdown table."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["hidden_size"], r["rho_target"]), []).append(r)
  summary = []
  for (hidden, rho), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
    losses = [r["val_loss"] for r in rs]
    mean = sum(losses) / len(losses)
    summary.append({
        "hidden_size": hidden, "rho_target": rho, "seeds": [r["seed"] for r in rs],
        "val_loss_mean": mean, "val_loss_min": min(losses), "val_loss_max": max(losses),
        "num_experts": rs[0]["num_experts"], "slots_per_head": (rs[0].get("slots_per_head") or [0])[0],
        "params_total": rs[0]["params_total"], "params_engram_table": rs[0]["params_engram_table"],
        "analytic_active": rs[0]["analytic_active"], "flops_per_token": rs[0]["flops_per_token"],
    })
  cols = [("hidden", "hidden_size", str), ("rho", "rho_target", sweep_lib.fmt(".2f")),
          ("experts", "num_experts", str), ("slots/head", "slots_per_head", str),
          ("params total", "params_total", sweep_lib.fmt(",")),
          ("table params", "params_engram_table", sweep_lib.fmt(",")),
          ("active (analytic)", "analytic_active", sweep_lib.fmt(",")),
          ("FLOPs/token", "flops_per_token", sweep_lib.fmt(",")),
          ("seeds", "seeds", lambda v: ",".join(map(str, v))),
          ("val loss (mean)", "val_loss_mean", sweep_lib.fmt(".4f")),
          ("min", "val_loss_min", sweep_lib.fmt(".4f")), ("max", "val_loss_max", sweep_lib.fmt(".4f"))]
  return summary, sweep_lib.markdown_table(summary, cols)


def plot(rows: list[dict], summary: list[dict], path: Path) -> Path:
  """One line per (budget, seed): seeds differ in data order, so only same-seed points
  compare cleanly (a mean over unequal seed sets would zigzag)."""
  del summary
  fig, ax = sweep_lib.new_figure()
  markers = "osd^v"
  for hidden in sorted({r["hidden_size"] for r in rows}):
    color = None
    for j, seed in enumerate(sorted({r["seed"] for r in rows if r["hidden_size"] == hidden})):
      pts = sorted(((r["rho_target"], r["val_loss"], r["params_total"]) for r in rows
                    if r["hidden_size"] == hidden and r["seed"] == seed), reverse=True)
      line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], f"{markers[j % len(markers)]}-",
                      color=color, alpha=1.0 if j == 0 else 0.6,
                      label=f"hidden {hidden} ({pts[0][2]:,} params), seed {seed}")
      color = line.get_color()
  ax.set_xlabel("rho (routed-expert share of the sparse parameters)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Sparsity allocation at fixed total and active parameters")
  ax.invert_xaxis()
  ax.legend(fontsize=8)
  return sweep_lib.save_figure(fig, path)


def run(config, workdir: str, rhos, scales, seeds, *, all_seeds=False, steps=None,
        secondary_rhos=None, train=True) -> dict:
  config = sweep_lib.with_overrides(config, steps=steps)
  planned = variants(config, rhos, scales, seeds, all_seeds, secondary_rhos)
  def report(rows):
    summary, table = summarize(rows)
    return {"summary": summary}, table
  return sweep_lib.run_and_report(NAME, planned, workdir, train=train, report=report,
                                  plot=lambda rows, extra, path: plot(rows, extra["summary"], path))



def define_flags() -> dict:
  """The command-line flags (defined only when run as a script)."""
  return {**cli.define_flags("rhos", "secondary_rhos", "budget_scales", "seeds", "steps",
                             seeds=["0", "1"]),
          "all_seeds": flags.DEFINE_bool("all_seeds", False, "Run every seed at every budget.")}


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  run(_F['config'].value, _F['workdir'].value, sweep_lib.parse_floats(_F['rhos'].value),
      sweep_lib.parse_floats(_F['budget_scales'].value), sweep_lib.parse_ints(_F['seeds'].value),
      all_seeds=_F['all_seeds'].value, steps=_F['steps'].value,
      secondary_rhos=sweep_lib.parse_floats(_F['secondary_rhos'].value) if _F['secondary_rhos'].value else None)


_F: dict = {}

if __name__ == "__main__":
  _F.update(define_flags())
  app.run(main)
