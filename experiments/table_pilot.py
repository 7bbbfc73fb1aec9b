r"""Pilot for the Engram table's small-scale hyper-parameters: init std x table lr multiplier.

  python -m experiments.table_pilot --workdir=runs/table_pilot \
      [--config=experiments/configs/micro.py] [--settings=1.0:5,0.1:5,0.1:20] [--steps=N] [--seed=0]

Every setting trains the config's Engram model (same init seed, same data seed, so the
runs are paired) and is compared with the first setting on the same validation tokens:
the paired difference of the mean loss with its SE, clustered by sequence. This measures
one seed: the SE covers the validation sample, not seed-to-seed variation.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from experiments import sweep_lib
from experiments.configs import common

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/micro.py", "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/table_pilot", "Run cache.")
_SETTINGS = flags.DEFINE_list(
  "settings", ["1.0:5", "0.1:5", "0.1:20"], "init_std:lr_multiplier pairs; the first is the reference."
)
_STEPS = flags.DEFINE_integer("steps", None, "Override train.total_steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")


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


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  settings = [tuple(float(x) for x in s.split(":")) for s in _SETTINGS.value]
  config = sweep_lib.with_overrides(_CONFIG.value, steps=_STEPS.value)
  rows = sweep_lib.run_all(variants(config, settings, _SEED.value), _WORKDIR.value)
  ref = rows[0]
  print("| init std | table lr x | val loss ± SE | vs first (paired) | wall s |\n|---:|---:|---:|---:|---:|")
  for r in rows:
    d, se = sweep_lib.paired_vs(r, ref)
    print(
      f"| {r['init_std']:g} | {r['lr_multiplier']:g} | {r['val_loss']:.4f} ± {r['val_loss_se']:.4f} | "
      f"{sweep_lib.stats.format_pm(d, se)} | {r.get('wall_seconds', float('nan')):.0f} |"
    )


if __name__ == "__main__":
  app.run(main)
