r"""Sparsity allocation (ENGRAM_SPEC.md §6): validation loss against rho at fixed budgets.

  python -m experiments.allocation_sweep --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--rhos=1,0.9,0.8,0.6,0.4] [--budget_scales=1] \
      [--seeds=0,1,2] [--steps=N]

For each budget (the config's backbone with its hidden size times each --budget_scales
entry), the MoE twin (rho = 1) fixes the total and active parameter budget; every rho < 1
moves 1 - rho of the sparse (inactive) parameters from routed experts into Engram slots
(`engram_jax.models.accounting.allocate`), and every model trains on the same tokens.
--seeds (each sets the init and the data seed of a replicate) run at the smallest budget;
larger budgets use the first seed only (unless --all_seeds). Every rho is compared with
rho = 1 of the same budget and seeds, paired on the same validation tokens, ± SE over seeds. Resumable: finished runs are reused. Writes <workdir>/allocation_sweep/
{results.json, table.md, allocation_sweep.png}.
"""

from __future__ import annotations

from absl import flags

from experiments import cli, sweep_lib
from experiments.configs import common

NAME = "allocation_sweep"


def variants(config, rhos, scales, seeds, all_seeds=False, secondary_rhos=None) -> list[sweep_lib.Variant]:
  """Every (budget, seed, rho) run; the rho = 1 run is the MoE twin itself. The first seed
  at the smallest budget runs every rho; the other seeds and budgets run `secondary_rhos`
  (default: every rho)."""
  out = []
  for b, scale in enumerate(sorted(scales)):
    base = sweep_lib.scale_backbone(config, scale)
    for j, seed in enumerate(seeds if b == 0 or all_seeds else seeds[:1]):
      c = sweep_lib.with_seed(base, seed)
      primary = b == 0 and j == 0
      for rho in rhos if primary or secondary_rhos is None else secondary_rhos:
        c_rho = c.copy_and_resolve_references()
        c_rho.variant = "moe" if rho >= 1.0 else "engram"
        c_rho.allocation.rho = float(rho)
        model = common.model_config(c_rho)
        name = f"alloc-h{c.model.hidden_size}-rho{rho:.2f}-s{seed}"
        out.append(
          sweep_lib.Variant(
            name,
            c_rho,
            model,
            info={"rho_target": float(rho), "budget_scale": float(scale), "hidden_size": int(c.model.hidden_size)},
          )
        )
  return out


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict], str]:
  """Per (budget, rho): the budget columns and the mean loss over seeds, and the paired
  difference against rho = 1 (the MoE twin) of the same budget and seeds, ± SE over seeds."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if sweep_lib.ok(r):
      groups.setdefault((r["hidden_size"], r["rho_target"]), []).append(r)
  summary = []
  for (hidden, rho), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
    mean, se = sweep_lib.stats.mean_se([r["val_loss"] for r in rs])
    summary.append(
      {
        "hidden_size": hidden,
        "rho_target": rho,
        "seeds": [r["seed"] for r in rs],
        "val_loss_mean": mean,
        "val_loss_se_seeds": se,
        "val_loss_se_tokens": max(r.get("val_loss_se", float("nan")) for r in rs),
        "num_experts": rs[0]["num_experts"],
        "slots_per_head": (rs[0].get("slots_per_head") or [0])[0],
        "params_total": rs[0]["params_total"],
        "params_engram_table": rs[0]["params_engram_table"],
        "analytic_active": rs[0]["analytic_active"],
        "flops_per_token": rs[0]["flops_per_token"],
      }
    )
  cols = [
    ("hidden", "hidden_size", str),
    ("rho", "rho_target", sweep_lib.fmt(".2f")),
    ("experts", "num_experts", str),
    ("slots/head", "slots_per_head", str),
    ("params total", "params_total", sweep_lib.fmt(",")),
    ("table params", "params_engram_table", sweep_lib.fmt(",")),
    ("active (analytic)", "analytic_active", sweep_lib.fmt(",")),
    ("FLOPs/token", "flops_per_token", sweep_lib.fmt(",")),
    ("seeds", "seeds", lambda v: ",".join(map(str, v))),
    ("val loss (mean)", "val_loss_mean", sweep_lib.fmt(".4f")),
    ("± SE over seeds", "val_loss_se_seeds", sweep_lib.fmt(".4f")),
    ("SE over tokens (max)", "val_loss_se_tokens", sweep_lib.fmt(".4f")),
  ]
  paired = paired_summary(rows)
  table = (
    sweep_lib.markdown_table(summary, cols) + "\n\nPaired against rho = 1 (the MoE twin) of the "
    "same budget, init seed and data seed, on the same validation tokens:\n\n"
    + sweep_lib.paired_table(paired, "hidden, rho", lambda g: f"{g[0]}, {g[1]:.2f}")
  )
  return summary, paired, table


def paired_summary(rows: list[dict]) -> list[dict]:
  return sweep_lib.paired_summary(
    rows,
    group=lambda r: (r["hidden_size"], r["rho_target"]),
    is_ref=lambda r: r["rho_target"] >= 1.0,
    ref_group=lambda r: r["hidden_size"],
  )


# paired difference to rho = 1 against rho, ± 1 SE over seeds, one line per budget
PLOT = {
  "title": "Sparsity allocation at fixed total and active parameters",
  "label": "rho",
  "x": lambda g: g[1],
  "series": lambda g: f"hidden {g[0]}",
  "xlabel": "rho (routed-expert share of the sparse parameters)",
  "invert_x": True,
}


def run(
  config, workdir: str, rhos, scales, seeds, *, all_seeds=False, steps=None, secondary_rhos=None, train=True
) -> dict:
  planned = variants(sweep_lib.with_overrides(config, steps=steps), rhos, scales, seeds, all_seeds, secondary_rhos)
  return sweep_lib.run_and_report(
    NAME, planned, workdir, train=train, summarize=summarize, parts=["summary", "paired"], plot=PLOT, references=True
  )


def main(f: dict) -> None:
  """The script: every flag's value in `f` (`cli.values`)."""
  run(
    f["config"],
    f["workdir"],
    f["rhos"],
    f["budget_scales"],
    f["seeds"],
    all_seeds=f["all_seeds"],
    steps=f["steps"],
    secondary_rhos=f["secondary_rhos"] or None,
  )


if __name__ == "__main__":
  all_seeds = (flags.DEFINE_bool, False, "Run every seed at every budget.")
  cli.start(main, "rhos", "secondary_rhos", "budget_scales", "seeds", "steps", all_seeds=all_seeds)
