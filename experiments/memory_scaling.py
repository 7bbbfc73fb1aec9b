r"""Memory scaling (ENGRAM_SPEC.md §6): loss against log(slots) with the backbone fixed, and
the OverEncoding-style baseline at equal slots.

  python -m experiments.memory_scaling --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--slots=256,512,1024,2048,4096] \
      [--baseline_slots=256,1024,4096] [--seed=0] [--steps=N]

The backbone is the config's MoE (its own expert count, unchanged). "engram" adds Engram
layers with --slots nominal rows per head; "input_average" (ModelConfig
engram_mode="input_average") looks up the same hashed rows, averages them over heads and
adds them, projected, to the input embedding, with no Engram blocks. The MoE alone is the
zero-memory reference. Resumable. Writes <workdir>/memory_scaling/{results.json, table.md,
memory_scaling.png} with the fitted slope of loss per decade of slots.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from absl import app, flags

from experiments import cli, sweep_lib
from experiments.configs import common

NAME = "memory_scaling"
MODES = ("engram", "input_average")


def variants(config, slots, baseline_slots, seed) -> list[sweep_lib.Variant]:
  c = sweep_lib.with_seed(config, seed)
  c_moe = c.copy_and_resolve_references()
  c_moe.variant = "moe"
  out = [sweep_lib.Variant(f"moe-h{c.model.hidden_size}-s{seed}", c_moe, common.model_config(c_moe),
                           info={"mode": "none", "slots": 0})]
  c_eng = c.copy_and_resolve_references()
  c_eng.variant = "engram"
  for mode, sizes in (("engram", slots), ("input_average", baseline_slots)):
    for s in sizes:
      model = sweep_lib.engram_at_slots(c_eng, s, engram_mode=mode)
      out.append(sweep_lib.Variant(f"mem-{mode}-h{c.model.hidden_size}-slots{s}-s{seed}", c_eng, model,
                                   info={"mode": mode, "slots": int(s)}))
  return out


def fit_per_decade(points: list[tuple[int, float]]) -> float | None:
  """Least-squares slope of loss against log10(slots)."""
  if len(points) < 2:
    return None
  xs = [math.log10(s) for s, _ in points]
  ys = [y for _, y in points]
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  sxx = sum((x - mx) ** 2 for x in xs)
  return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else None


def summarize(rows: list[dict]) -> tuple[dict, str]:
  moe = next((r for r in rows if r["mode"] == "none"), None)
  fits = {}
  for mode in MODES:
    pts = sorted((r["slots"], r["val_loss"]) for r in rows if r["mode"] == mode)
    fits[mode] = {"per_decade": fit_per_decade(pts), "points": pts}
  cols = [("mode", "mode", str), ("slots/head", "slots", str),
          ("table params", "params_engram_table", sweep_lib.fmt(",")),
          ("params total", "params_total", sweep_lib.fmt(",")),
          ("FLOPs/token", "flops_per_token", sweep_lib.fmt(",")),
          ("val loss", "val_loss", sweep_lib.fmt(".4f")),
          ("vs MoE", "delta_vs_moe", sweep_lib.fmt("+.4f"))]
  for r in rows:
    r["delta_vs_moe"] = None if moe is None else r["val_loss"] - moe["val_loss"]
  ordered = sorted(rows, key=lambda r: (MODES.index(r["mode"]) if r["mode"] in MODES else -1, r["slots"]))
  table = sweep_lib.markdown_table(ordered, cols)
  lines = [table, ""]
  for mode, f in fits.items():
    if f["per_decade"] is not None:
      lines.append(f"- {mode}: {f['per_decade']:+.4f} nats per decade of slots (least squares)")
  return fits, "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
  fig, ax = sweep_lib.new_figure()
  for mode, style in (("engram", "o-"), ("input_average", "s--")):
    pts = sorted((r["slots"], r["val_loss"]) for r in rows if r["mode"] == mode)
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
              label="Engram" if mode == "engram" else "n-gram average into input (OverEncoding-style)")
  moe = next((r for r in rows if r["mode"] == "none"), None)
  if moe is not None:
    ax.axhline(moe["val_loss"], color="gray", ls=":", label="MoE backbone alone")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("slots per head (nominal rows)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Memory scaling with the backbone fixed")
  ax.legend()
  return sweep_lib.save_figure(fig, path)


def run(config, workdir: str, slots, baseline_slots, seed=0, *, steps=None, train=True) -> dict:
  config = sweep_lib.with_overrides(config, steps=steps)
  planned = variants(config, slots, baseline_slots, seed)
  def report(rows):
    fits, table = summarize(rows)
    return {"fits": fits}, table
  return sweep_lib.run_and_report(NAME, planned, workdir, train=train, report=report,
                                  plot=lambda rows, extra, path: plot(rows, path))



def define_flags() -> dict:
  """The command-line flags (defined only when run as a script)."""
  return {**cli.define_flags("slots", "baseline_slots", "seeds", "steps", seeds=None),
          "seed": flags.DEFINE_integer("seed", 0, "Seed of every run (--seeds, if given, wins).")}


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  seed = int(_F['seeds'].value[0]) if _F['seeds'].value else _F['seed'].value
  run(_F['config'].value, _F['workdir'].value, sweep_lib.parse_ints(_F['slots'].value),
      sweep_lib.parse_ints(_F['baseline_slots'].value), seed, steps=_F['steps'].value)


_F: dict = {}

if __name__ == "__main__":
  _F.update(define_flags())
  app.run(main)
