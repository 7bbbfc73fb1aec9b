"""Run and checkpoint safety (issue 14): checkpoint retention, verified checkpoints and divergence
rollback, the workdir lock, replayed metric rows, corrupt-checkpoint fallback, data config checks
on resume; device and host table placements."""

import json
import logging
import math
import shutil
import socket
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import sharding as sharding_lib
from engram_jax.data import DataConfig
from engram_jax.train import (
  Checkpointer,
  CheckpointMismatchError,
  CorruptCheckpointError,
  TrainConfig,
  WorkdirLockedError,
)
from engram_jax.train import trainer as trainer_lib
from engram_jax.train.metrics import read_metrics
from engram_jax.train.restore import evaluate_run, load_run
from engram_jax.train.run_lock import LOCK_NAME, RunLock, _start_time
from engram_jax.train.trainer import Trainer, TrainingDivergedError
from tests.test_train import VOCAB, tiny_model

BASE = TrainConfig(total_steps=4, warmup_steps=1, eval_every=0, checkpoint_every=2, log_every=1, progress_bar=False)
# lr 1e6: the tiny model's gradient norm is NaN at step 4 (its weights are dead after step 2)
EXPLODE = BASE.replace(total_steps=6, learning_rate=1e6, checkpoint_every=1)


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  return DataConfig(
    seq_len=32,
    batch_size=4,
    bpe_vocab_size=VOCAB,
    max_bytes=400_000,
    tokenizer_train_bytes=200_000,
    num_eval_batches=1,
    tokenizer_dir=str(tmp_path_factory.mktemp("tok")),
  )


@pytest.fixture(scope="module")
def base_run(data_config, tmp_path_factory):
  """A finished 4-step device run with checkpoints 2 and 4 and metric rows 1..4."""
  trainer = Trainer(tiny_model(), BASE, data_config, tmp_path_factory.mktemp("runs") / "base", mesh=_one_device())
  result = trainer.run()
  assert trainer.checkpointer.all_steps() == [2, 4]
  return trainer.workdir, result


def _one_device():
  """A one-device mesh for every `Trainer` here: checkpoint retention, verification, rollback,
  fallback and the lock do not depend on the mesh, and one device compiles and checkpoints
  faster than the default 8. Resuming on the default 8-device mesh is test_train's
  test_resume_is_bit_exact."""
  return sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])


def _copy(base_run, tmp_path, name="run"):
  workdir = tmp_path / name
  shutil.copytree(base_run[0], workdir)
  return workdir


def _truncate_arrays(folder):
  """Cuts every array data file of an orbax item (OCDBT `d/` files) to half its size."""
  files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, folder
  for victim in files:
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def _steps(workdir, split="train"):
  return [r["step"] for r in read_metrics(workdir, split)]


# -- defect 1: retention and config validation ------------------------------------------------
@pytest.mark.parametrize(
  "field,value",
  [
    ("keep_checkpoints", 0),
    ("keep_checkpoints", -1),
    ("keep_checkpoints", 1.5),
    ("total_steps", 0),
    ("learning_rate", float("nan")),
    ("learning_rate", -1e-3),
    ("warmup_steps", 10_000),
    ("min_lr_ratio", 2.0),
    ("step_decay_factor", 0.0),
    ("weight_decay", -0.1),
    ("b1", 1.0),
    ("b2", -0.5),
    ("eps", 0.0),
    ("grad_clip_norm", float("inf")),
    ("moe_bias_update_rate", -1.0),
    ("log_every", -1),
    ("checkpoint_every", 2.5),
    ("on_divergence", "ignore"),
    ("rollback_lr_factor", 0.0),
    ("rollback_lr_factor", 1.5),
    ("max_rollbacks", -1),
    ("progress_bar", "yes"),
    ("step_decay_boundaries", (0.9, 0.8)),
    ("engram_lr_multiplier", 0.0),
  ],
)
def test_bad_train_config_values_are_refused_naming_field_and_value(field, value):
  with pytest.raises(ValueError, match=rf"TrainConfig\.{field}.*{value!r}".replace("(", r"\(").replace(")", r"\)")):
    TrainConfig(**{field: value})


def test_keep_checkpoints_always_keeps_the_newest(tmp_path):
  meta = {"model": {}, "hash_constants": None, "tokenizer_fingerprint": "x"}
  with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
    Checkpointer(tmp_path / "zero", keep=0)
  ck = Checkpointer(tmp_path / "one", keep=1)
  for step in (1, 2, 3):
    ck.save(step, {"w": jnp.full((2,), step, jnp.float32)}, meta=meta, vocab={})
  assert ck.all_steps() == [3]
  # best-by: the best checkpoint and the newest (what a resume starts from) both stay
  best = Checkpointer(tmp_path / "best", keep=1, best_by="val_loss")
  for step, loss in ((1, 1.0), (2, 5.0), (3, 7.0)):
    best.save(step, {"w": jnp.zeros((2,))}, meta=meta, vocab={}, metrics={"val_loss": loss})
  assert best.all_steps() == [1, 3]


# -- defect 2: verified checkpoints, divergence, rollback --------------------------------------
def test_divergence_names_a_finite_checkpoint_and_rollback_recovers(data_config, tmp_path):
  workdir = tmp_path / "explode"
  # factor 1: the rollback replays the same update, diverges again, and the bound stops it.
  # Step 3's weights evaluate finite but give a NaN gradient: the message names step 2.
  once = EXPLODE.replace(on_divergence="rollback", rollback_lr_factor=1.0, max_rollbacks=1)
  with pytest.raises(TrainingDivergedError, match=r"at step 4.*after 1 rollbacks.*checkpoint \(step 2\)"):
    Trainer(tiny_model(), once, data_config, workdir, mesh=_one_device()).run()
  assert Checkpointer(workdir / "checkpoints").all_steps() == [2]  # what a rerun resumes from
  assert (workdir / "diverged_checkpoints" / "3").is_dir()  # kept, out of the way
  assert math.isfinite(evaluate_run(load_run(workdir))["val_loss"])
  assert _steps(workdir) == [1, 2, 3]  # the diverged step's replay left no duplicate rows

  rollback = EXPLODE.replace(on_divergence="rollback", rollback_lr_factor=1e-6)
  result = Trainer(tiny_model(), rollback, data_config, workdir, mesh=_one_device()).run()
  assert result.status == "completed" and result.step == 6
  rows = read_metrics(workdir, "train")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(math.isfinite(r["grad_norm"]) for r in rows)
  assert rows[4]["lr"] < 1.0  # x1e-6
  meta = json.loads((workdir / "meta.json").read_text())
  # rollback 1 to step 3 diverged again at step 4, so rollback 2 went back to step 2
  assert meta["lr_scale"] == pytest.approx(1e-12)
  saved, _ = Checkpointer(workdir / "checkpoints").read_meta(6)
  assert [r["resumed_from"] for r in saved["rollbacks"]] == [3, 2]
  assert math.isfinite(evaluate_run(load_run(workdir))["val_loss"])


def test_non_finite_weights_are_never_checkpointed(data_config, tmp_path, monkeypatch):
  """Loss and gradient norm stay finite, but step 2's update puts inf into a weight."""
  real = trainer_lib.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def wrapped(state, batch, *rows):
      new_state, metrics, row_grads = step_fn(state, batch, *rows)
      bad = jnp.where(state.step == 1, jnp.inf, 0.0)
      params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + bad if "embed" in jax.tree_util.keystr(path) else x, new_state.params
      )
      return new_state.replace(params=params), metrics, row_grads

    return wrapped

  monkeypatch.setattr(trainer_lib, "make_train_step", poisoned)
  trainer = Trainer(
    tiny_model(), BASE.replace(checkpoint_every=1), data_config, tmp_path / "poison", mesh=_one_device()
  )
  with pytest.raises(TrainingDivergedError, match=r"after step 2 is not fit.*embed.*checkpoint \(step 1\)"):
    trainer.run()
  assert trainer.checkpointer.all_steps() == [1]


def test_host_placement_checkpoints_are_verified_and_roll_back(data_config, tmp_path):
  workdir = tmp_path / "host"
  cfg = EXPLODE.replace(
    table_placement="host", total_steps=5, on_divergence="rollback", rollback_lr_factor=1e-6, rollback_skip_batches=True
  )
  result = Trainer(tiny_model(), cfg, data_config, workdir, mesh=_one_device()).run()
  assert result.status == "completed" and result.step == 5
  assert _steps(workdir) == [1, 2, 3, 4, 5]
  saved, _ = Checkpointer(workdir / "checkpoints").read_meta(5)
  assert [r["resumed_from"] for r in saved["rollbacks"]] == [3, 2]
  for step in Checkpointer(workdir / "checkpoints").all_steps():
    assert math.isfinite(evaluate_run(load_run(workdir, step=step, tables="host"))["val_loss"]), step

  # defect 7 with host tables: a truncated host_tables array file of the newest checkpoint
  _truncate_arrays(workdir / "checkpoints" / "5" / "host_tables")
  run = load_run(workdir, tables="host")
  assert run.step == 4


# -- defect 7: corrupt checkpoints, chosen resume step -----------------------------------------
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(base_run, data_config, tmp_path, caplog):
  workdir = _copy(base_run, tmp_path)
  _truncate_arrays(workdir / "checkpoints" / "4" / "state")
  caplog.set_level(logging.WARNING)
  run = load_run(workdir)
  assert run.step == 2 and math.isfinite(evaluate_run(run)["val_loss"])
  assert f"{workdir}/checkpoints/4 is unreadable" in caplog.text and "falling back" in caplog.text
  with pytest.raises(CorruptCheckpointError, match="checkpoints/4 is unreadable"):
    load_run(workdir, step=4)  # a chosen step: no silent substitute

  caplog.clear()
  resumed = Trainer(tiny_model(), BASE, data_config, workdir, mesh=_one_device()).run()
  assert sorted(resumed.losses) == [3, 4]
  assert resumed.losses == {s: base_run[1].losses[s] for s in (3, 4)}  # to the last bit
  assert "checkpoints/4 is unreadable" in caplog.text
  assert (workdir / "corrupt_checkpoints" / "4" / "state").is_dir()  # kept, not deleted
  assert _steps(workdir) == [1, 2, 3, 4]

  # a missing item: every checkpoint damaged -> a clear error, nothing moved
  shutil.rmtree(workdir / "checkpoints" / "4" / "meta")
  shutil.rmtree(workdir / "checkpoints" / "2" / "meta")
  with pytest.raises(CorruptCheckpointError, match=r"no intact checkpoint.*'meta' is missing"):
    load_run(workdir)
  with pytest.raises(CorruptCheckpointError, match="no intact checkpoint.*Nothing was moved"):
    Trainer(tiny_model(), BASE, data_config, workdir, mesh=_one_device()).run()
  assert Checkpointer(workdir / "checkpoints").all_steps() == [2, 4]


def test_resume_step_and_a_stale_lock_without_duplicated_metric_rows(base_run, data_config, tmp_path, caplog):
  workdir = _copy(base_run, tmp_path)
  dead = subprocess.Popen(["true"])
  dead.wait()
  (workdir / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  caplog.set_level(logging.WARNING)
  resumed = Trainer(tiny_model(), BASE, data_config, workdir, mesh=_one_device()).run(resume_step=2)
  assert "taking over the stale lock" in caplog.text and str(dead.pid) in caplog.text
  assert not (workdir / LOCK_NAME).exists()  # released
  assert resumed.losses == {s: base_run[1].losses[s] for s in (3, 4)}
  assert _steps(workdir) == [1, 2, 3, 4]  # rows 3, 4 replayed once, not twice
  assert (workdir / "superseded_checkpoints" / "4").is_dir()
  with pytest.raises(ValueError, match=r"resume_step=7: no checkpoint of that step.*\[2, 4\]"):
    Trainer(tiny_model(), BASE, data_config, workdir, mesh=_one_device()).run(resume_step=7)


# -- defect 3: a second trainer -----------------------------------------------------------------
def test_a_second_trainer_is_refused_with_the_holders_pid_and_host(base_run, data_config, tmp_path):
  workdir = _copy(base_run, tmp_path)
  holder = subprocess.Popen(["sleep", "60"])
  try:
    (workdir / LOCK_NAME).write_text(
      json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": _start_time(holder.pid)})
    )
    with pytest.raises(WorkdirLockedError, match=rf"pid {holder.pid} on host '{socket.gethostname()}'"):
      Trainer(tiny_model(), BASE.replace(total_steps=6), data_config, workdir, mesh=_one_device()).run()
  finally:
    holder.kill()
    holder.wait()
  assert Checkpointer(workdir / "checkpoints").all_steps() == [2, 4]
  assert _steps(workdir) == [1, 2, 3, 4]
  # another host's lock cannot be checked from here: refused too
  (workdir / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
  with pytest.raises(WorkdirLockedError, match="pid 1 on host 'elsewhere'.*delete the file"):
    RunLock(workdir).acquire()


def test_lock_is_exclusive_within_a_host(tmp_path):
  first = RunLock(tmp_path)
  first.acquire()
  with pytest.raises(WorkdirLockedError, match="in use by another trainer"):
    RunLock(tmp_path).acquire()
  first.release()
  with RunLock(tmp_path) as again:
    assert again.held and (tmp_path / LOCK_NAME).exists()
  assert not (tmp_path / LOCK_NAME).exists()


# -- resume checks the data configuration --------------------------------------------------------
@pytest.mark.parametrize(
  "change,text",
  [
    ({"batch_size": 8}, "batch_size: checkpoint has 4, current run has 8"),
    ({"seq_len": 16}, "seq_len: checkpoint has 32, current run has 16"),
    ({"seed": 3}, "seed: checkpoint has 0, current run has 3"),
  ],
)
def test_resume_refuses_a_changed_data_config(base_run, data_config, tmp_path, change, text):
  workdir = _copy(base_run, tmp_path)
  with pytest.raises(CheckpointMismatchError, match=f"data config: {text}"):
    Trainer(tiny_model(), BASE.replace(total_steps=6), data_config.replace(**change), workdir, mesh=_one_device()).run()
  assert Checkpointer(workdir / "checkpoints").all_steps() == [2, 4]
  assert not (workdir / LOCK_NAME).exists()


def test_nonfinite_leaves_names_the_paths():
  from engram_jax.train.checkpoint import nonfinite_leaves

  tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.nan])}, "n": np.array([np.inf]), "i": jnp.arange(3)}
  assert nonfinite_leaves(tree) == ["b/c", "n"]


def test_sigkill_then_resume_takes_over_the_lock_and_logs_each_step_once(tmp_path):
  """The real thing: `experiments.train` killed with SIGKILL between checkpoints, then rerun."""
  import os
  import signal
  import sys
  import time

  from tests.conftest import xla_flags
  from tests.test_train_cli import MICRO, REPO

  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  workdir, tokdir = tmp_path / "run", tmp_path / "tok"
  cmd = lambda steps: [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=experiments/configs/tiny.py:engram",  # noqa: E731
    f"--workdir={workdir}",
    f"--config.data.tokenizer_dir={tokdir}",
    f"--config.train.total_steps={steps}",
    *MICRO,
    "--config.train.checkpoint_every=2",
  ]
  log_file = open(tmp_path / "first.log", "w")  # noqa: SIM115  a pipe could fill and block the child
  proc = subprocess.Popen(cmd(100_000), cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while len(_steps(workdir)) < 3:
      assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
      assert time.time() < deadline, "training did not reach step 3 in time"
      time.sleep(0.2)
    assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log_file.close()
  logged = _steps(workdir)
  assert (workdir / LOCK_NAME).exists()  # left behind by the killed process
  total = max(logged) + 2
  rerun = subprocess.run(cmd(total), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "taking over the stale lock" in rerun.stderr
  assert json.loads(rerun.stdout.strip().splitlines()[-1])["status"] == "completed"
  assert _steps(workdir) == list(range(1, total + 1))  # each step once
  assert not (workdir / LOCK_NAME).exists()
