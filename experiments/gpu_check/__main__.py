"""python -m experiments.gpu_check: see the package docstring."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import experiments.gpu_check as package
from experiments.gpu_check.common import MARKDOWN, RECORD, STEPS
from experiments.gpu_check.compile_sm90 import COMPILE_RECORD, compile_sm90
from experiments.gpu_check.runner import Runner, load_record
from experiments.gpu_check.steps import run_step
from experiments.gpu_check.summary import readme_block, render_markdown, update_readme


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="Record directory.")
  p.add_argument("--smoke", action="store_true", help="CPU: interpret mode, tiny shapes.")
  p.add_argument("--steps", default=",".join(STEPS), help=f"Comma list, a subset of {STEPS}.")
  p.add_argument("--budget_scale", type=float, default=1.0, help="Multiplies every time budget.")
  p.add_argument("--total_s", type=float, default=None, help="Total budget (default: 335 s GPU).")
  p.add_argument(
    "--update_readme_from",
    type=Path,
    default=None,
    help="Do not run: rewrite the GPU status block of each --readme file from this record directory.",
  )
  p.add_argument(
    "--readme",
    type=Path,
    action="append",
    default=None,
    help="A page with the GPU status markers (repeatable; default: README.md and docs/guides/kernels.md).",
  )
  p.add_argument(
    "--compile_sm90",
    action="store_true",
    help="Do not run: compile the Mosaic GPU kernels for an H200 without a GPU "
    "(needs the CUDA plugin and ptxas; see `make gpu-compile`).",
  )
  p.add_argument(
    "--compile_sm90_train",
    action="store_true",
    help="With --compile_sm90: also the small config's and the offload model's train steps (minutes each on a CPU).",
  )
  p.add_argument("--_step", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  a.out = a.out.resolve()  # the steps run from the repository root
  if a._step:
    return run_step(a._step, a.out, a.smoke, a._deadline or time.time() + 600)
  if a.compile_sm90:
    rec = compile_sm90(a.out, a.compile_sm90_train)
    print(f"record: {a.out / COMPILE_RECORD}")
    return 0 if all(c["status"] == "ok" for c in rec["cases"] + rec["train_steps"]) else 1
  if a.update_readme_from is not None:
    rec = load_record(a.update_readme_from)
    for page in a.readme or [Path("README.md"), Path("docs/guides/kernels.md")]:
      update_readme(page, rec)
    print(readme_block(rec))
    return 0
  steps = [s.strip() for s in a.steps.split(",") if s.strip()]
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    p.error(f"--steps: unknown step(s) {unknown}; known: {STEPS}")
  rec = Runner(a.out, a.smoke, steps, a.budget_scale, a.total_s).run()
  print("\n" + render_markdown(rec).split("## Steps")[0])
  print(f"record: {a.out / RECORD}, {a.out / MARKDOWN}")
  return 0 if all(s["status"] == "ok" for s in rec["steps"]) else 1


if __name__ == "__main__":
  sys.exit(main())
