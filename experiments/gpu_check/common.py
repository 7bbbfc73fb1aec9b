"""gpu_check: constants, the per-step result log, JSON helpers and time statistics."""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

STEPS = ("env", "correctness", "lookup", "offload", "train")
# Seconds per step on the GPU; the sum stays under 6 minutes with process start-ups.
# Compiles dominate: the small train step alone took 160 s to compile for an H200 on the loaded
# 2-core CPU machine (51 s of CPU time).
GPU_BUDGETS = {"env": 25, "correctness": 75, "lookup": 60, "offload": 85, "train": 95}
SMOKE_BUDGETS = {"env": 30, "correctness": 90, "lookup": 60, "offload": 120, "train": 60}
GPU_TOTAL_S = 340
SMOKE_TOTAL_S = 400
RECORD = "gpu_check.json"
MARKDOWN = "gpu_check.md"
README_BEGIN = "<!-- gpu-status:begin -->"
README_END = "<!-- gpu-status:end -->"
# Dense bf16 peak (TFLOP/s) by device kind, for model FLOP utilisation.
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------------ step-side helpers
class StepLog:
  """A step's results, rewritten atomically to DIR/steps/<name>.json after every put."""

  def __init__(self, out: Path, name: str, deadline: float):
    self.path = out / "steps" / f"{name}.json"
    self.deadline = deadline
    self.data: dict[str, Any] = {"status": "running"}
    self.flush()

  def put(self, key: str, value: Any) -> None:
    self.data[key] = value
    self.flush()

  def append(self, key: str, value: Any) -> None:
    self.data.setdefault(key, []).append(value)
    self.flush()

  def flush(self) -> None:
    write_json(self.path, self.data)

  def left(self) -> float:
    return self.deadline - time.time()

  def case(self, key: str, name: str, fn: Callable[[], dict], need_s: float = 0.0) -> dict:
    """Runs one case; records its result, its error, or that the budget left no time for it."""
    entry: dict[str, Any] = {"name": name}
    if self.left() < need_s:
      entry.update(status="skipped", error=f"budget: {self.left():.0f} s left, needs ~{need_s:.0f} s")
      self.append(key, entry)
      return entry
    start = time.perf_counter()
    try:
      entry.update(fn())
      entry.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - every failure is recorded and the next case runs
      entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
      print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    print(f"[{name}] {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    self.append(key, entry)
    return entry


def write_json(path: Path, data: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(data, indent=1, default=_json_default))
  os.replace(tmp, path)


def _json_default(x):
  if hasattr(x, "item"):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return str(x)


def _stats(seconds) -> dict:
  """median, mean and standard error (ms) of per-call times."""
  import numpy as np

  t = np.asarray(seconds, np.float64) * 1e3
  se = float(t.std(ddof=1) / np.sqrt(t.size)) if t.size > 1 else float("nan")
  return {"median_ms": float(np.median(t)), "mean_ms": float(t.mean()), "se_ms": se, "n": int(t.size)}
