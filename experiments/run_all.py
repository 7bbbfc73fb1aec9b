r"""`make experiments`: every paper-reproduction experiment, end to end (CPU-sized by default).

  python -m experiments.run_all --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--steps=N] [--seeds=0,1,2] [--workers=2] \
      [--only=allocation_sweep,memory_scaling,ablations,controls] [--docs_dir=docs/results]

The measurement protocol (docs/RESULTS.md): every experiment runs every seed in --seeds (a
seed sets the init and the data order of one replicate; variants of a replicate share
both); every model is scored on the same validation tokens and compared with its
reference pairwise; tables give the mean paired difference ± SE over seeds, a claim is
made only where it clears 2 SE, and otherwise the minimum detectable effect is given.
The experiments: the allocation sweep (--rhos at --budget_scales, default one budget),
memory scaling (--slots with the backbone fixed, OverEncoding-style baseline at
--baseline_slots, the slope per decade fitted per seed), the ablations and the controls
(with the fact-recall probe of each). Every run they need is trained first, replicate by
replicate (all of seed 0, then seed 1, ...: a stopped sweep leaves complete pairs), each
once even when several experiments use it (<workdir>/runs is shared), by --workers
processes that claim runs with lock files. Then each experiment's tables and
plots are written from the finished runs. An interrupted `make experiments` resumes where
it stopped. With --docs_dir the results (JSON, PNG, table.md) are copied there. On a GPU
use --config=experiments/configs/small.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import flags

from experiments import ablations, allocation_sweep, cli, controls, memory_scaling, sweep_lib

EXPERIMENTS = ("allocation_sweep", "memory_scaling", "ablations", "controls")
MODULES = {
  "allocation_sweep": allocation_sweep,
  "memory_scaling": memory_scaling,
  "ablations": ablations,
  "controls": controls,
}
RHOS = (1.0, 0.9, 0.8, 0.6, 0.4)
SEEDS = (0, 1, 2)
SLOTS = (256, 1024, 4096)


def plan(
  config,
  *,
  experiments=EXPERIMENTS,
  seeds=SEEDS,
  rhos=RHOS,
  secondary_rhos=None,
  budget_scales=(1.0,),
  slots=SLOTS,
  baseline_slots=SLOTS,
) -> dict[str, dict]:
  """The arguments of each experiment's `run`, by experiment name."""
  unknown = sorted(set(experiments) - set(EXPERIMENTS))
  if unknown:
    raise ValueError(f"unknown experiments {unknown}; choose from {EXPERIMENTS}")
  seeds = list(seeds)
  args = {
    "allocation_sweep": {
      "rhos": list(rhos),
      "scales": list(budget_scales),
      "seeds": seeds,
      "secondary_rhos": None if secondary_rhos is None else list(secondary_rhos),
    },
    "memory_scaling": {"slots": list(slots), "baseline_slots": list(baseline_slots), "seeds": seeds},
    "ablations": {"ablations": list(ablations.ABLATIONS), "seeds": seeds},
    "controls": {"seeds": seeds},
  }
  return {k: v for k, v in args.items() if k in experiments}


def ordered_variants(config, args: dict[str, dict]) -> list[sweep_lib.Variant]:
  """Every run of the plan, deduplicated, replicate by replicate (within one: the first
  budget's sweep, controls, ablations, memory scaling, then the other budgets)."""
  first, later = [], []
  if "allocation_sweep" in args:
    a = args["allocation_sweep"]
    vs = allocation_sweep.variants(config, a["rhos"], a["scales"], a["seeds"], secondary_rhos=a["secondary_rhos"])
    primary = f"-h{int(config.model.hidden_size)}-"
    first += [v for v in vs if primary in v.name and v.name.endswith(f"-s{a['seeds'][0]}")]
    later += [v for v in vs if v not in first]
  if "controls" in args:
    first += [controls.variant(config, w, s) for s in args["controls"]["seeds"] for w in controls.CONTROLS]
  if "ablations" in args:
    a = args["ablations"]
    first += ablations.variants(config, a["ablations"], a["seeds"])
  if "memory_scaling" in args:
    a = args["memory_scaling"]
    first += memory_scaling.variants(config, a["slots"], a["baseline_slots"], a["seeds"])
  seen, out = set(), []
  for v in first + later:
    if v.key() not in seen:
      seen.add(v.key())
      out.append(v)
  return sorted(out, key=lambda v: int(v.config.seed))  # stable: keeps the order within a seed


def report(config, workdir: str, args: dict[str, dict], docs_dir: str | None = None, *, train: bool = True) -> dict:
  """Each experiment's tables and plots (training whatever is still missing, unless
  train=False: then from the finished runs alone, the others listed as missing)."""
  out = {}
  for name in EXPERIMENTS:
    if name not in args:
      continue
    print(f"==== {name}", flush=True)
    out[name] = MODULES[name].run(config, workdir, **args[name], train=train)  # plan's names are run's
    if docs_dir:
      src, dst = Path(workdir) / name, Path(docs_dir) / name
      dst.mkdir(parents=True, exist_ok=True)
      for f in list(src.glob("*.json")) + list(src.glob("*.png")) + list(src.glob("*.md")):
        shutil.copy2(f, dst / f.name)
  return out


def run(config, workdir: str, *, steps=None, docs_dir=None, **plan_kwargs) -> dict:
  config = sweep_lib.with_overrides(config, steps=steps)
  args = plan(config, **plan_kwargs)
  sweep_lib.run_all(ordered_variants(config, args), workdir)
  # the experiments' own run() applies with_overrides again: a no-op for steps=None
  return report(config, workdir, args, docs_dir)


def main(F: dict) -> None:
  """The script: every flag's value in `F` (`cli.values`)."""
  sweep_lib.quiet_logs()
  sweep_lib.enable_compilation_cache(F["workdir"])
  kwargs = {k: F[k] for k in ("seeds", "rhos", "budget_scales", "slots", "baseline_slots")}
  config = sweep_lib.with_overrides(F["config"], steps=F["steps"])
  args = plan(config, experiments=list(F["only"]), secondary_rhos=F["secondary_rhos"] or None, **kwargs)
  if F["report_only"]:
    report(config, F["workdir"], args, F["docs_dir"], train=False)
    return
  workers = []
  if F["workers"] > 1 and not F["train_only"]:
    argv = [a for a in sys.argv[1:] if not a.startswith("--workers")]
    workers = [
      subprocess.Popen([sys.executable, "-m", "experiments.run_all", *argv, "--train_only"])
      for _ in range(F["workers"] - 1)
    ]
    time.sleep(5)  # let the workers claim the first runs
  t0 = time.perf_counter()
  sweep_lib.run_all(ordered_variants(config, args), F["workdir"])
  for w in workers:
    w.wait()
  print(f"training done in {time.perf_counter() - t0:.0f} s", flush=True)
  if not F["train_only"]:
    report(config, F["workdir"], args, F["docs_dir"])


if __name__ == "__main__":
  cli.start(
    main,
    *("steps", "seeds", "rhos", "secondary_rhos", "budget_scales", "slots", "baseline_slots"),
    only=(flags.DEFINE_list, list(EXPERIMENTS), "Experiments to run."),
    workers=(flags.DEFINE_integer, 2, "Training processes sharing the run list."),
    train_only=(flags.DEFINE_bool, False, "Only train (a worker); no tables or plots."),
    report_only=(flags.DEFINE_bool, False, "Only write tables and plots from the finished runs."),
    docs_dir=(flags.DEFINE_string, None, "Copy results.json / *.png / table.md here."),
  )
