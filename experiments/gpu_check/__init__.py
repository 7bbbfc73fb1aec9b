r"""One command that proves the GPU paths: `make gpu-check` (one H200, < 6 minutes).

  python -m experiments.gpu_check --out=runs/gpu_check            # on a machine with one GPU
  JAX_PLATFORMS=cpu python -m experiments.gpu_check --smoke --out=/tmp/gc   # CPU, tiny shapes
  python -m experiments.gpu_check --update_readme_from=runs/gpu_check  # README "GPU status"

Steps, in order, each in its own subprocess with its own time budget (a step that overruns
is killed, recorded as timed out, and the next one starts):
  env          device, memory, jax/jaxlib/plugin versions, HBM copy bandwidth, bf16 matmul TFLOP/s;
  correctness  gather_rows / gather_gate (fused and fallback GPU paths): forward and every
               gradient against the jnp reference, at the paper's shapes and odd ones; the Engram
               layer with impl="pallas" against impl="xla";
  lookup       experiments/bench/lookup.py: GB/s, ratio to copy bandwidth, fused vs XLA;
  offload      experiments/bench/offload.py: device vs host vs cached tables, decode and training;
  train        the small config's train step (synthetic tokens: no grain here), tokens/s and MFU.
After every step DIR/gpu_check.json and DIR/gpu_check.md are rewritten (the step about to run
is marked "running"); each step also writes DIR/steps/<step>.json after each of its cases and
its output to DIR/steps/<step>.log, so a kill at any moment leaves everything measured so far
(`--update_readme_from` merges those partial files). The summary marks every goal met / missed
/ failed / not measured, with its figure; on CPU (`--smoke`: Pallas interpret mode, tiny
shapes) no GPU goal can be met or missed: they read "not measured", failures still "failed".

Nothing here imports grain or ml_collections (the GPU image has neither).
"""

from experiments.gpu_check.common import (
  GPU_BUDGETS,
  MARKDOWN,
  README_BEGIN,
  README_END,
  RECORD,
  SMOKE_BUDGETS,
  STEPS,
  StepLog,
)
from experiments.gpu_check.compile_sm90 import (
  COMPILE_RECORD,
  H200_TARGET_CONFIG,
  compile_sm90,
  compile_train_step,
  parse_ptxas,
)
from experiments.gpu_check.runner import Runner, load_record
from experiments.gpu_check.steps import (
  GPU_FUSED,
  GPU_GATHER,
  SMALL_BATCH,
  SMOKE_FUSED,
  SMOKE_GATHER,
  KernelCase,
  run_step,
  small_model_config,
)
from experiments.gpu_check.summary import GOALS, Goal, evaluate_goals, readme_block, render_markdown, update_readme

__all__ = [
  "COMPILE_RECORD",
  "GOALS",
  "GPU_BUDGETS",
  "GPU_FUSED",
  "GPU_GATHER",
  "H200_TARGET_CONFIG",
  "MARKDOWN",
  "README_BEGIN",
  "README_END",
  "RECORD",
  "SMALL_BATCH",
  "SMOKE_BUDGETS",
  "SMOKE_FUSED",
  "SMOKE_GATHER",
  "STEPS",
  "Goal",
  "KernelCase",
  "Runner",
  "StepLog",
  "compile_sm90",
  "compile_train_step",
  "evaluate_goals",
  "load_record",
  "parse_ptxas",
  "readme_block",
  "render_markdown",
  "run_step",
  "small_model_config",
  "update_readme",
]
