"""gpu_check's parent: runs the steps in budgeted subprocesses, writes the record after each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from experiments.gpu_check.common import (
  GPU_BUDGETS,
  GPU_TOTAL_S,
  MARKDOWN,
  RECORD,
  SMOKE_BUDGETS,
  SMOKE_TOTAL_S,
  _now,
  write_json,
)
from experiments.gpu_check.summary import evaluate_goals, render_markdown

# ---------------------------------------------------------------------------------- parent


def load_record(out: Path) -> dict:
  """The record, with partial step files merged into steps that were running when it stopped."""
  rec = json.loads((out / RECORD).read_text())
  for st in rec["steps"]:
    partial = out / "steps" / f"{st['name']}.json"
    if st.get("status") in ("running", "timed_out", "killed") and partial.exists():
      try:
        data = json.loads(partial.read_text())
      except json.JSONDecodeError:
        continue
      st["results"] = {k: v for k, v in data.items() if k not in ("status",)}
  rec["goals"] = evaluate_goals(rec)
  return rec


class Runner:
  def __init__(self, out: Path, smoke: bool, steps, budget_scale: float, total_s: float | None):
    self.out, self.smoke = out, smoke
    budgets = SMOKE_BUDGETS if smoke else GPU_BUDGETS
    self.budgets = {s: budgets[s] * budget_scale for s in steps}
    self.total_s = total_s or (SMOKE_TOTAL_S if smoke else GPU_TOTAL_S) * budget_scale
    self.start = time.time()
    self.proc: subprocess.Popen | None = None
    self.rec = {
      "mode": "smoke" if smoke else "gpu",
      "started": _now(),
      "finished": None,
      "argv": sys.argv[1:],
      "total_budget_s": self.total_s,
      "steps": [{"name": s, "status": "pending", "budget_s": self.budgets[s]} for s in steps],
    }

  def write(self) -> None:
    self.rec["elapsed_s"] = round(time.time() - self.start, 1)
    self.rec["goals"] = evaluate_goals(self.rec)
    write_json(self.out / RECORD, self.rec)
    (self.out / MARKDOWN).write_text(render_markdown(self.rec))

  def _child(self, st: dict, budget: float) -> None:
    name = st["name"]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])  # the repository root
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"  # the step's log is complete up to the moment it is killed
    if self.smoke:
      env.setdefault("JAX_PLATFORMS", "cpu")
    else:  # a rerun on the same machine reuses the compiled kernels
      env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/engram_gpu_check_jax_cache")
    # Soft deadline for the step's own cases, a little before the hard kill.
    deadline = time.time() + budget - min(5.0, 0.1 * budget)
    cmd = [
      sys.executable,
      "-m",
      "experiments.gpu_check",
      f"--out={self.out}",
      f"--_step={name}",
      f"--_deadline={deadline}",
    ] + (["--smoke"] if self.smoke else [])
    log_path = self.out / "steps" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as logf:
      self.proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
      )
      pump = threading.Thread(target=_pump, args=(self.proc.stdout, logf, name), daemon=True)
      pump.start()
      try:
        rc = self.proc.wait(timeout=budget)
        timed_out = False
      except subprocess.TimeoutExpired:
        self._kill()
        rc, timed_out = self.proc.wait(), True
      pump.join(timeout=5)
    self.proc = None
    st["wall_s"] = round(time.time() - t0, 1)
    partial = self.out / "steps" / f"{name}.json"
    data = {}
    if partial.exists():
      try:
        data = json.loads(partial.read_text())
      except json.JSONDecodeError:
        data = {}
    st["results"] = {k: v for k, v in data.items() if k not in ("status", "error", "traceback")}
    if timed_out:
      st["status"], st["error"] = "timed_out", f"killed after its budget of {budget:.0f} s"
    elif data.get("status") in ("ok", "failed"):
      st["status"] = data["status"]
      if data.get("error"):
        st["error"] = data["error"]
        st["traceback"] = data.get("traceback")
    else:
      st["status"] = "failed"
      st["error"] = f"exit code {rc}; last output:\n" + _tail(log_path, 1500)

  def _kill(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the step's own process group only
      except ProcessLookupError:
        pass

  def on_signal(self, signum, frame) -> None:
    del frame
    self._kill()
    for st in self.rec["steps"]:
      if st["status"] == "running":
        st["status"], st["error"] = "killed", f"gpu_check received signal {signum}"
        try:  # keep what the step measured before it was killed
          data = json.loads((self.out / "steps" / f"{st['name']}.json").read_text())
          st["results"] = {k: v for k, v in data.items() if k not in ("status", "error", "traceback")}
        except (OSError, json.JSONDecodeError):
          pass
    self.rec["finished"] = _now()
    self.write()
    sys.exit(128 + signum)

  def run(self) -> dict:
    self.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, self.on_signal)
    signal.signal(signal.SIGINT, self.on_signal)
    self.write()
    for st in self.rec["steps"]:
      left = self.total_s - (time.time() - self.start)
      budget = min(st["budget_s"], left)
      if left < 5:
        st["status"], st["error"] = "skipped", f"the total budget ({self.total_s:.0f} s) is spent"
        self.write()
        continue
      if not self.smoke and st["name"] != "env" and self._backend() not in (None, "gpu"):
        st["status"] = "skipped"
        st["error"] = f"no GPU (backend {self._backend()}): run with --smoke on CPU"
        self.write()
        continue
      st["status"], st["started"] = "running", _now()
      self.write()
      print(f"=== {st['name']} (budget {budget:.0f} s)", flush=True)
      self._child(st, budget)
      print(f"=== {st['name']}: {st['status']} in {st['wall_s']} s", flush=True)
      self.write()
    self.rec["finished"] = _now()
    self.write()
    return self.rec

  def _backend(self):
    env = next((s for s in self.rec["steps"] if s["name"] == "env"), None)
    return ((env or {}).get("results") or {}).get("device", {}).get("backend")


def _pump(stream, logf, name: str) -> None:
  for line in stream:
    logf.write(line)
    logf.flush()
    sys.stdout.write(f"[{name}] {line}")
    sys.stdout.flush()


def _tail(path: Path, n: int) -> str:
  try:
    return path.read_text()[-n:]
  except OSError:
    return ""
