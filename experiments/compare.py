r"""`make train`: train Engram+MoE and its iso-parameter MoE twin, then compare them.

  python -m experiments.compare --workdir=runs/default \
      [--config=experiments/configs/tiny.py] [--variants=engram,moe] [--config.train.total_steps=600]

Each variant trains in workdir/<variant> (resuming if interrupted) with the same init
seed (`--config.seed`) and data seed (`--config.data.seed`), both are evaluated on the same
validation tokens (128k tokens drawn from every validation file), and the comparison is
printed as a table and written to workdir/comparison.{json,md} with the loss curves in
workdir/loss_curves.png. The validation loss carries its standard error clustered by
sequence, and the paired difference of the first two variants on the same sequences its
own SE (much smaller: the sequences' difficulty cancels). One seed: the SE covers the
validation sample, not the spread between training seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from engram_jax.train import evaluation, stats
from experiments import cli, sweep_lib
from experiments.configs import common
from experiments.runner import build_trainer

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/tiny.py", "Run config file; the variant part is ignored."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where runs, table and plot go.")
_VARIANTS = flags.DEFINE_list("variants", ["engram", "moe"], "Variants to train and compare.")


def check_variants(variants: list[str]) -> list[str]:
  """--variants: known and distinct (ValueError naming the bad entry and the choices)."""
  if not variants:
    raise ValueError(f"--variants is empty: name at least one of {common.VARIANTS}")
  for v in variants:
    if v not in common.VARIANTS:
      raise ValueError(f"--variants: unknown variant {v!r}; choose from {common.VARIANTS}")
  if len(set(variants)) != len(variants):
    raise ValueError(f"--variants names a variant twice: {variants}")
  return list(variants)


def train_variant(config, variant: str, workdir: Path) -> dict:
  config = config.copy_and_resolve_references()
  config.variant = variant
  trainer = build_trainer(config, str(workdir / variant))
  result = trainer.run()
  meta = trainer.meta()
  return {
    "variant": variant,
    "total_params": meta["params"]["total"],
    "active_params": meta["params"]["active"],
    "flops_per_token": meta["flops_per_token"],
    "tokens_per_second": result.tokens_per_second,
    "steps": result.step,
    "tokens_seen": result.step * trainer.data_config.batch_size * trainer.data_config.seq_len,
    "init_seed": int(config.seed),
    "data_seed": int(config.data.seed),
    **(result.eval or _last_eval(workdir / variant)),
  }


def _last_eval(run_dir: Path) -> dict:
  """The last validation row of a run finished earlier (resumed at its last step)."""
  from engram_jax.train.metrics import read_metrics

  vals = read_metrics(run_dir, "val")
  return {k: v for k, v in vals[-1].items() if k.startswith("val_")} if vals else {}


def paired_line(workdir: Path, a: str, b: str) -> dict:
  """loss(a) - loss(b) on the same validation sequences, with its SE (clustered by sequence)."""
  rows_a, info_a = evaluation.load_rows(workdir / a)
  rows_b, info_b = evaluation.load_rows(workdir / b)
  d, se = evaluation.paired(rows_a, info_a, rows_b, info_b)
  return {
    "a": a,
    "b": b,
    "diff": d,
    "se": se,
    "clears_2se": stats.clears(d, se),
    "sequences": int(np.sum(rows_a["tokens"] > 0)),
    "tokens": float(np.sum(rows_a["tokens"])),
  }


def format_paired(p: dict) -> str:
  verdict = (
    "clears 2 SE"
    if p["clears_2se"]
    else f"within 2 SE: not detectable here (MDE {stats.minimum_detectable_effect(p['se']):.4f})"
  )
  return (
    f"{p['a']} - {p['b']} validation loss: {stats.format_pm(p['diff'], p['se'])} nats/token "
    f"(paired on the same {p['sequences']:,} sequences / {p['tokens']:,.0f} tokens, SE clustered by "
    f"sequence; {verdict})"
  )


def format_table(rows: list[dict]) -> str:
  header = (
    "| variant | params total | params active | FLOPs/token | tokens/s | val loss ± SE | "
    "val ppl | bits/byte |\n|---|---:|---:|---:|---:|---:|---:|---:|"
  )
  lines = [header]
  for r in rows:
    lines.append(
      f"| {r['variant']} | {r['total_params']:,} | {r['active_params']:,} | "
      f"{r['flops_per_token']:,} | {r['tokens_per_second']:,.0f} | {r.get('val_loss', float('nan')):.4f} ± "
      f"{r.get('val_loss_se', float('nan')):.4f} | "
      f"{r.get('val_perplexity', float('nan')):.2f} | {r.get('val_bits_per_byte', float('nan')):.4f} |"
    )
  return "\n".join(lines)


def plot_curves(workdir: Path, variants: list[str]) -> Path:
  from engram_jax.train.metrics import read_metrics

  fig, ax = sweep_lib.new_figure(7, 4.2)
  for variant in variants:
    train = read_metrics(workdir / variant, "train")
    val = read_metrics(workdir / variant, "val")
    (line,) = ax.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.6, label=f"{variant} train")
    ax.plot(
      [r["step"] for r in val],
      [r["val_loss"] for r in val],
      "o-",
      color=line.get_color(),
      label=f"{variant} validation",
    )
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title("Engram+MoE vs MoE (iso-parameter)")
  ax.legend()
  return sweep_lib.save_figure(fig, workdir / "loss_curves.png", dpi=120)


def main(argv):
  del argv
  variants = check_variants(_VARIANTS.value)
  for variant in variants:  # every variant's config is checked before any training starts
    config = _CONFIG.value.copy_and_resolve_references()
    config.variant = variant
    common.model_config(config), common.data_config(config), common.train_config(config)
  workdir = Path(_WORKDIR.value)
  print(f"library logs: {cli.log_to_file(workdir / 'run.log')}", flush=True)
  rows = []
  for variant in variants:
    print(f"== training {variant} in {workdir / variant}", flush=True)
    rows.append(train_variant(_CONFIG.value, variant, workdir))
  table = format_table(rows)
  plot = plot_curves(workdir, variants)
  device = f"{jax.devices()[0].platform} x{jax.device_count()} ({jax.devices()[0].device_kind})"
  paired = None
  if len(rows) >= 2 and "val_loss" in rows[0] and "val_loss" in rows[1]:
    paired = paired_line(workdir, rows[0]["variant"], rows[1]["variant"])
  seeds = f"init seed {rows[0]['init_seed']}, data seed {rows[0]['data_seed']} (both variants)"
  note = "val loss ± SE: mean over the validation tokens, SE clustered by sequence; " + seeds
  text = f"Hardware: {device}\n\n{table}\n\n{note}\n" + (f"\n{format_paired(paired)}\n" if paired else "")
  (workdir / "comparison.json").write_text(json.dumps({"device": device, "rows": rows, "paired": paired}, indent=1))
  (workdir / "comparison.md").write_text(text)
  print(f"\n{text}\nloss curves: {plot}\ncheckpoints: {workdir}/<variant>/checkpoints")


if __name__ == "__main__":
  app.run(main)
