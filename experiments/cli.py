"""The absl flags of the experiment scripts, each defined once, and their entry point.

Every experiment (`ablations`, `allocation_sweep`, `controls`, `memory_scaling`) and
`run_all`, which drives them all, define the flags they read only when run as a script (so
the experiments can import each other), through `start`:

    if __name__ == "__main__":
      cli.start(main, "seeds", "steps", all_seeds=(flags.DEFINE_bool, False, "help"))

main then gets the flags' values with the shared number lists parsed (`values`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from absl import app, flags
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


# the shared list flags that hold numbers: the type of their items
_INTS, _FLOATS = ("seeds", "slots", "baseline_slots"), ("rhos", "secondary_rhos", "budget_scales")
_NUMBERS = {**dict.fromkeys(_INTS, int), **dict.fromkeys(_FLOATS, float)}


def define_flags(*names: str, **extra: tuple[Any, Any, str]) -> dict[str, flags.FlagHolder]:
  """Defines --config (a run config file, default micro.py), --workdir, the shared flags
  `names` and the script's own flags `extra` ({name: (absl definer, default, help)}).
  Returns {name: FlagHolder}."""
  unknown = sorted(set(names) - set(_FLAGS))
  if unknown:
    raise ValueError(f"unknown experiment flags {unknown}; shared flags are {sorted(_FLAGS)}")
  holders = {
    "config": config_flags.DEFINE_config_file("config", CONFIG_FILE, "Run config file; the variant part is ignored.")
  }
  for name, (definer, default, help_text) in {**{n: _FLAGS[n] for n in ("workdir", *names)}, **extra}.items():
    holders[name] = definer(name, default, help_text)
  return holders


def values(holders: dict[str, flags.FlagHolder]) -> dict[str, Any]:
  """The flags' values, the shared number lists (--seeds, --rhos, ...) as lists of numbers;
  app.UsageError naming the flag when an item is not a number."""
  out = {}
  for name, holder in holders.items():
    value, kind = holder.value, _NUMBERS.get(name)
    if kind is not None:
      try:
        value = None if value is None else [kind(v) for v in value]
      except ValueError:
        raise app.UsageError(f"--{name} takes comma-separated {kind.__name__}s, got {','.join(value)!r}") from None
    out[name] = value
  return out


def start(main, *names: str, **extra: tuple[Any, Any, str]) -> None:
  """An experiment script's entry point: defines its flags (`define_flags(*names, **extra)`;
  --help lists them all), then `app.run` calls main(values) with the Python log level at
  WARNING."""
  holders = define_flags(*names, **extra)
  for holder in holders.values():  # listed by --help, as the script's own flags
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])

  def run(argv):
    del argv
    logging.basicConfig(level=logging.WARNING)
    main(values(holders))

  app.run(run)


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
