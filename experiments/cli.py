"""The absl flags of the experiment scripts, each defined once.

Every experiment (`ablations`, `allocation_sweep`, `controls`, `memory_scaling`) and
`run_all`, which drives them all, define the flags they read through `define_flags`,
only when run as a script (so the experiments can import each other):

    _F.update(cli.define_flags("steps", "seeds", seeds=["0", "1"]))
    ... _F["seeds"].value ...
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

CONFIG_FILE = "experiments/configs/micro.py"

# name: (absl definer, default, help)
_FLAGS: dict[str, tuple[Any, Any, str]] = {
  "workdir": (flags.DEFINE_string, "runs/experiments", "Experiment root (shared run cache)."),
  "steps": (flags.DEFINE_integer, None, "Override train.total_steps of every run."),
  "seeds": (flags.DEFINE_list, ["0", "1", "2"], "Replicates: each seed is the init and the data seed of a run."),
  "rhos": (
    flags.DEFINE_list,
    ["1.0", "0.9", "0.8", "0.6", "0.4"],
    "Routed-expert shares of the sparse budget (allocation sweep).",
  ),
  "secondary_rhos": (flags.DEFINE_list, None, "rhos of the extra seeds and larger budgets (default: --rhos)."),
  "budget_scales": (flags.DEFINE_list, ["1.0"], "Hidden-size multipliers, one budget each."),
  "slots": (
    flags.DEFINE_list,
    ["256", "1024", "4096"],
    "Nominal Engram rows per head of the memory-scaling runs (span >= one decade).",
  ),
  "baseline_slots": (flags.DEFINE_list, ["256", "1024", "4096"], "Slots per head of the OverEncoding-style baseline."),
}


def define_flags(*names: str, **defaults: Any) -> dict[str, flags.FlagHolder]:
  """Defines --config (a run config file, default micro.py), --workdir and the shared flags
  `names`; `defaults` overrides their defaults. Returns {name: FlagHolder}."""
  unknown = sorted(set(names) - set(_FLAGS))
  if unknown:
    raise ValueError(f"unknown experiment flags {unknown}; shared flags are {sorted(_FLAGS)}")
  holders = {
    "config": config_flags.DEFINE_config_file("config", CONFIG_FILE, "Run config file; the variant part is ignored.")
  }
  for name in ("workdir", *names):
    definer, default, help_text = _FLAGS[name]
    holders[name] = definer(name, defaults.get(name, default), help_text)
  return holders


def log_to_file(path: str | Path) -> Path:
  """Library INFO logs (ours, orbax's checkpoint events, jax's) go to the file `path`; the
  console keeps the progress bars, the results and WARNING-and-above log lines."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  absl_logging.set_verbosity(absl_logging.INFO)  # the root logger's level
  absl_logging.get_absl_handler().setLevel(logging.WARNING)  # the console (absl's stderr handler)
  handler = logging.FileHandler(path)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  logging.getLogger().addHandler(handler)
  return path
