r"""Pilot for the Engram table's small-scale hyper-parameters: init std x table lr multiplier.

  python -m experiments.table_pilot --workdir=runs/table_pilot \
      [--config=experiments/configs/micro.py] [--settings=1.0:5,0.1:5,0.1:20] [--steps=N] [--seed=0]

Every setting trains the config's Engram model (same init seed, same data seed, so the
runs are paired) and is compared with the first setting on the same validation tokens:
the paired difference of the mean loss with its SE, clustered by sequence. This measures
one seed: the SE covers the validation sample, not seed-to-seed variation.
"""

from __future__ import annotations

from absl import flags

from experiments import cli, sweep_lib
from experiments.configs import common


def variants(config, settings: list[tuple[float, float]], seed: int) -> list[sweep_lib.Variant]:
  out = []
  for std, mult in settings:
    c = sweep_lib.with_seed(config, seed)
    c.variant = "engram"
    c.model.engram_table_init_std = float(std)
    c.train.engram_lr_multiplier = float(mult)
    out.append(
      sweep_lib.Variant(
        f"pilot-std{std:g}-lr{mult:g}-s{seed}",
        c,
        common.model_config(c),
        info={"init_std": float(std), "lr_multiplier": float(mult)},
      )
    )
  return out


def main(f: dict) -> None:
  """The script: every flag's value in `f` (`cli.values`)."""
  settings = [tuple(float(x) for x in s.split(":")) for s in f["settings"]]
  config = sweep_lib.with_overrides(f["config"], steps=f["steps"])
  rows = sweep_lib.run_all(variants(config, settings, f["seed"]), f["workdir"])
  ref = rows[0]
  print("| init std | table lr x | val loss ± SE | vs first (paired) | wall s |\n|---:|---:|---:|---:|---:|")
  for r in rows:
    d, se = sweep_lib.paired_vs(r, ref)
    print(
      f"| {r['init_std']:g} | {r['lr_multiplier']:g} | {r['val_loss']:.4f} ± {r['val_loss_se']:.4f} | "
      f"{sweep_lib.stats.format_pm(d, se)} | {r.get('wall_seconds', float('nan')):.0f} |"
    )


if __name__ == "__main__":
  settings = (
    flags.DEFINE_list,
    ["1.0:5", "0.1:5", "0.1:20"],
    "init_std:lr_multiplier pairs; the first is the reference.",
  )
  seed = (flags.DEFINE_integer, 0, "Init and data seed.")
  cli.start(
    main, "steps", workdir=(flags.DEFINE_string, "runs/table_pilot", "Run cache."), settings=settings, seed=seed
  )
