r"""`make experiments`: every paper-reproduction experiment, end to end (CPU-sized by default).

  python -m experiments.run_all --workdir=runs/experiments \
      [--config=experiments/configs/micro.py] [--steps=N] [--seeds=0,1] [--workers=1] \
      [--only=allocation_sweep,memory_scaling,ablations,controls] [--docs_dir=docs/results]

The experiments: the allocation sweep (--rhos at two budgets, --budget_scales; --seeds at
the smaller one, the extra seeds and the larger budget at --secondary_rhos), memory
scaling (--slots, OverEncoding-style baseline at --baseline_slots), the ablations and the
controls. Every run they need is trained first, most informative first (the first seed's
smaller-budget sweep, controls, ablations, memory scaling, then the extra seeds and the
larger budget), each once even when several experiments use it (<workdir>/runs is shared),
by --workers processes that claim runs with lock files. Then each experiment's tables and
plots are written from the finished runs. An interrupted `make experiments` resumes where
it stopped. With --docs_dir the results (JSON, PNG, table.md) are copied there. On a GPU
use --config=experiments/configs/small.py.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments import ablations, allocation_sweep, cli, controls, memory_scaling, sweep_lib

EXPERIMENTS = ("allocation_sweep", "memory_scaling", "ablations", "controls")
RHOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def plan(config, *, experiments=EXPERIMENTS, seeds=(0, 1), rhos=RHOS, secondary_rhos=None,
         budget_scales=(1.0, 1.5), slots=(256, 512, 1024, 2048, 4096),
         baseline_slots=(256, 1024, 4096)) -> dict[str, dict]:
  """The arguments of each experiment's `run`, by experiment name."""
  unknown = sorted(set(experiments) - set(EXPERIMENTS))
  if unknown:
    raise ValueError(f"unknown experiments {unknown}; choose from {EXPERIMENTS}")
  seeds = list(seeds)
  args = {
      "allocation_sweep": {"rhos": list(rhos), "scales": list(budget_scales), "seeds": seeds,
                               "secondary_rhos": None if secondary_rhos is None else list(secondary_rhos)},
      "memory_scaling": {"slots": list(slots), "baseline_slots": list(baseline_slots), "seed": seeds[0]},
      "ablations": {"ablations": list(ablations.ABLATIONS), "seeds": seeds[:1]},
      "controls": {"seeds": seeds[:1]},
  }
  return {k: v for k, v in args.items() if k in experiments}


def ordered_variants(config, args: dict[str, dict]) -> list[sweep_lib.Variant]:
  """Every run of the plan, deduplicated, most informative first."""
  first, later = [], []
  if "allocation_sweep" in args:
    a = args["allocation_sweep"]
    vs = allocation_sweep.variants(config, a["rhos"], a["scales"], a["seeds"],
                                   secondary_rhos=a["secondary_rhos"])
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
    first += memory_scaling.variants(config, a["slots"], a["baseline_slots"], a["seed"])
  seen, out = set(), []
  for v in first + later:
    if v.key() not in seen:
      seen.add(v.key())
      out.append(v)
  return out


def report(config, workdir: str, args: dict[str, dict], docs_dir: str | None = None, *,
           train: bool = True) -> dict:
  """Each experiment's tables and plots (training whatever is still missing, unless
  train=False: then from the finished runs alone, the others listed as missing)."""
  out = {}
  for name in EXPERIMENTS:
    if name not in args:
      continue
    print(f"==== {name}", flush=True)
    a = args[name]
    if name == "allocation_sweep":
      out[name] = allocation_sweep.run(config, workdir, a["rhos"], a["scales"], a["seeds"],
                                       secondary_rhos=a["secondary_rhos"], train=train)
    elif name == "memory_scaling":
      out[name] = memory_scaling.run(config, workdir, a["slots"], a["baseline_slots"], a["seed"],
                                     train=train)
    elif name == "ablations":
      out[name] = ablations.run(config, workdir, a["ablations"], a["seeds"], train=train)
    else:
      out[name] = controls.run(config, workdir, a["seeds"], train=train)
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


def define_flags() -> dict:
  """The command-line flags (defined only when run as a script): the experiments' shared ones
  (`experiments.cli`) and run_all's own."""
  f = flags
  return {
      **cli.define_flags("steps", "seeds", "rhos", "secondary_rhos", "budget_scales", "slots",
                         "baseline_slots", seeds=["0", "1"]),
      "only": f.DEFINE_list("only", list(EXPERIMENTS), "Experiments to run."),
      "workers": f.DEFINE_integer("workers", 1, "Training processes sharing the run list."),
      "train_only": f.DEFINE_bool("train_only", False, "Only train (a worker); no tables or plots."),
      "report_only": f.DEFINE_bool("report_only", False,
                                   "Only write tables and plots from the finished runs."),
      "docs_dir": f.DEFINE_string("docs_dir", None, "Copy results.json / *.png / table.md here."),
  }


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  sweep_lib.quiet_logs()
  F = {k: v.value for k, v in _F.items()}
  sweep_lib.enable_compilation_cache(F["workdir"])
  kwargs = {"experiments": list(F["only"]), "seeds": sweep_lib.parse_ints(F["seeds"]),
                "rhos": sweep_lib.parse_floats(F["rhos"]),
                "secondary_rhos": sweep_lib.parse_floats(F["secondary_rhos"]) if F["secondary_rhos"] else None,
                "budget_scales": sweep_lib.parse_floats(F["budget_scales"]),
                "slots": sweep_lib.parse_ints(F["slots"]), "baseline_slots": sweep_lib.parse_ints(F["baseline_slots"])}
  config = sweep_lib.with_overrides(F["config"], steps=F["steps"])
  args = plan(config, **kwargs)
  if F["report_only"]:
    report(config, F["workdir"], args, F["docs_dir"], train=False)
    return
  workers = []
  if F["workers"] > 1 and not F["train_only"]:
    argv = [a for a in sys.argv[1:] if not a.startswith("--workers")]
    workers = [subprocess.Popen([sys.executable, "-m", "experiments.run_all", *argv, "--train_only"])
               for _ in range(F["workers"] - 1)]
    time.sleep(5)   # let the workers claim the first runs
  t0 = time.perf_counter()
  sweep_lib.run_all(ordered_variants(config, args), F["workdir"])
  for w in workers:
    w.wait()
  print(f"training done in {time.perf_counter() - t0:.0f} s", flush=True)
  if not F["train_only"]:
    report(config, F["workdir"], args, F["docs_dir"])


_F: dict = {}

if __name__ == "__main__":
  _F.update(define_flags())
  app.run(main)
