"""`python -m experiments.train` end to end: SIGTERM checkpoints and exits cleanly; rerun resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]

MICRO = [
  "--config.model.vocab_size=512",
  "--config.model.hidden_size=32",
  "--config.model.num_layers=2",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=1",
  "--config.model.ffn_hidden=64",
  "--config.model.hc_mult=1",
  "--config.moe.num_experts=8",
  "--config.moe.expert_hidden=32",
  "--config.engram.n_embed_per_ngram=16",
  "--config.allocation.active_rtol=0.2",
  "--config.data.seq_len=32",
  "--config.data.batch_size=4",
  "--config.data.bpe_vocab_size=512",
  "--config.data.max_bytes=300000",
  "--config.data.tokenizer_train_bytes=150000",
  "--config.train.eval_every=0",
  "--config.train.checkpoint_every=1000",
  "--config.train.log_every=1",
  "--config.train.progress_bar=False",
  "--config.train.warmup_steps=1",
]


def _train_cmd(workdir, tokdir, steps):
  return [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=experiments/configs/tiny.py:engram",
    f"--workdir={workdir}",
    f"--config.data.tokenizer_dir={tokdir}",
    f"--config.train.total_steps={steps}",
    *MICRO,
  ]


def _steps_logged(workdir):
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_checkpoints_and_rerun_resumes(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  workdir, tokdir = tmp_path / "run", tmp_path / "tok"
  proc = subprocess.Popen(
    _train_cmd(workdir, tokdir, 100_000), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  try:
    deadline = time.time() + 240
    while len(_steps_logged(workdir)) < 3:
      if proc.poll() is not None:
        pytest.fail(f"training exited early:\n{proc.stdout.read()[-3000:]}")
      if time.time() > deadline:
        pytest.fail("training did not reach step 3 in time")
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, out[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["status"] == "preempted"
  stopped = summary["step"]
  assert stopped >= 3 and (workdir / "checkpoints" / str(stopped)).is_dir()

  rerun = subprocess.run(
    _train_cmd(workdir, tokdir, stopped + 2), cwd=REPO, env=env, capture_output=True, text=True, timeout=240
  )
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  final = json.loads(rerun.stdout.strip().splitlines()[-1])
  assert final["status"] == "completed" and final["step"] == stopped + 2
  steps = _steps_logged(workdir)
  assert steps[-2:] == [stopped + 1, stopped + 2]  # continued, did not restart at 1
  # library INFO logs (orbax's checkpoint events, our resume line) go to the run's log, not the console
  console = rerun.stdout + rerun.stderr
  assert "checkpoint_manager.py" not in console and "resumed from step" not in console, console[-2000:]
  run_log = (workdir / "run.0.log").read_text()
  assert f"resumed from step {stopped}" in run_log and "checkpoint" in run_log
