r"""Memory scaling (ENGRAM_SPEC.md §6): loss against log(slots) with the backbone fixed, and
the OverEncoding-style baseline at equal slots.

  python -m experiments.memory_scaling --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--slots=256,1024,4096] \
      [--baseline_slots=256,1024,4096] [--seeds=0,1,2] [--steps=N]

The backbone is the config's MoE (its own expert count, unchanged). "engram" adds Engram
layers with --slots nominal rows per head; "input_average" (ModelConfig
engram_mode="input_average") looks up the same hashed rows, averages them over heads and
adds them, projected, to the input embedding, with no Engram blocks. The MoE alone is the
zero-memory reference. Resumable. Writes <workdir>/memory_scaling/{results.json, table.md,
memory_scaling.png} with the fitted slope of loss per decade of slots.
"""

from __future__ import annotations

import math

from absl import flags

from experiments import cli, sweep_lib
from experiments.configs import common

NAME = "memory_scaling"
MODES = ("engram", "input_average")


def _seeds(seeds) -> list[int]:
  return [int(seeds)] if isinstance(seeds, int) else [int(x) for x in seeds]


def variants(config, slots, baseline_slots, seeds) -> list[sweep_lib.Variant]:
  """The MoE backbone alone, Engram at every --slots and the input-average baseline at
  every --baseline_slots, for each seed (an int or a list: init and data seed)."""
  out = []
  for seed in _seeds(seeds):
    c = sweep_lib.with_seed(config, seed)
    c_moe = c.copy_and_resolve_references()
    c_moe.variant = "moe"
    out.append(
      sweep_lib.Variant(
        f"moe-h{c.model.hidden_size}-s{seed}", c_moe, common.model_config(c_moe), info={"mode": "none", "slots": 0}
      )
    )
    c_eng = c.copy_and_resolve_references()
    c_eng.variant = "engram"
    for mode, sizes in (("engram", slots), ("input_average", baseline_slots)):
      for s in sizes:
        model = sweep_lib.engram_at_slots(c_eng, s, engram_mode=mode)
        out.append(
          sweep_lib.Variant(
            f"mem-{mode}-h{c.model.hidden_size}-slots{s}-s{seed}", c_eng, model, info={"mode": mode, "slots": int(s)}
          )
        )
  return out


def fit_per_decade(points: list[tuple[int, float]]) -> float | None:
  """Least-squares slope of loss against log10(slots)."""
  return sweep_lib.stats.fit_slope([math.log10(s) for s, _ in points], [y for _, y in points])


def summarize(rows: list[dict]) -> tuple[dict, list[dict], str]:
  """Per mode: the slope of loss per decade of slots fitted per seed, mean ± SE over seeds;
  per (mode, slots): the paired difference to the MoE backbone of the same seeds."""
  good = [r for r in rows if sweep_lib.ok(r)]
  fits = {}
  for mode in MODES:
    per_seed = {}
    for key in sorted({sweep_lib.pair_key(r) for r in good}):
      pts = sorted((r["slots"], r["val_loss"]) for r in good if r["mode"] == mode and sweep_lib.pair_key(r) == key)
      slope = fit_per_decade(pts)
      if slope is not None:
        per_seed[key[0]] = slope
    mean, se = sweep_lib.stats.mean_se(per_seed.values()) if per_seed else (None, None)
    fits[mode] = {
      "per_decade": mean,
      "per_decade_se": se,
      "per_seed": per_seed,
      "claim": mean is not None and sweep_lib.stats.clears(mean, se),
    }
  paired = sweep_lib.paired_summary(rows, group=lambda r: (r["mode"], r["slots"]), is_ref=lambda r: r["mode"] == "none")
  paired.sort(key=lambda s: (-1 if s["group"][0] == "none" else MODES.index(s["group"][0]), s["group"][1]))
  lines = [
    "Paired against the MoE backbone alone (same init and data seeds, same validation tokens):",
    "",
    sweep_lib.paired_table(paired, "mode, slots/head", lambda g: f"{g[0]}, {g[1]}"),
    "",
  ]
  params = {(r["mode"], r["slots"]): r for r in good}
  lines += ["| mode | slots/head | table params | params total | FLOPs/token |", "|---|---:|---:|---:|---:|"]
  for (mode, slots), r in sorted(params.items(), key=lambda kv: (kv[0][0] != "none", kv[0])):
    lines.append(
      f"| {mode} | {slots} | {r['params_engram_table']:,} | {r['params_total']:,} | {r['flops_per_token']:,} |"
    )
  lines.append("")
  for mode, f in fits.items():
    if f["per_decade"] is not None:
      per = ", ".join(f"s{k}: {v:+.4f}" for k, v in f["per_seed"].items())
      lines.append(
        f"- {mode}: {sweep_lib.stats.format_pm(f['per_decade'], f['per_decade_se'])} nats per "
        f"decade of slots (least squares per seed, mean ± SE over seeds; {per}); "
        + ("clears 2 SE" if f["claim"] else "not distinguishable from 0 at 2 SE")
      )
  return fits, paired, "\n".join(lines)


# the MoE alone (the reference) is the zero line
PLOT = {
  "title": "Memory scaling with the backbone fixed (0 = MoE alone)",
  "label": "slots",
  "x": lambda g: g[1],
  "xscale": "log",
  "series": lambda g: "Engram" if g[0] == "engram" else "n-gram average into input",
  "xlabel": "slots per head (nominal rows)",
}


def run(config, workdir: str, slots, baseline_slots, seeds=0, *, steps=None, train=True) -> dict:
  planned = variants(sweep_lib.with_overrides(config, steps=steps), slots, baseline_slots, seeds)
  parts = ["fits", "paired"]
  return sweep_lib.run_and_report(NAME, planned, workdir, train=train, summarize=summarize, parts=parts, plot=PLOT)


def main(f: dict) -> None:
  """The script: every flag's value in `f` (`cli.values`)."""
  run(f["config"], f["workdir"], f["slots"], f["baseline_slots"], f["seeds"] or [f["seed"]], steps=f["steps"])


if __name__ == "__main__":
  seed = (flags.DEFINE_integer, 0, "Seed of every run (when --seeds is not given).")
  cli.start(main, "slots", "baseline_slots", "seeds", "steps", seed=seed)
