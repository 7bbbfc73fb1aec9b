"""Two `python -m experiments.train` processes on localhost (CPU collectives over gloo) train
the tiny Engram model to the same losses as one process with the same global batch.

Reference: 1 process, 2 CPU devices, batch 4 drawn from 2 document shards (--data_shards=2).
Multi-process: 2 processes x 1 CPU device, batch 2 each; process i reads document shard i.
Both run the same partitioned program on a 2-device mesh, so the numbers must agree. The
Engram table is split by rows over the two devices (`engram_table_sharding="all"`), so in the
two-process run each process holds half of it and the lookups cross processes.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import portpicker
import pytest

from tests.conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
TIMEOUT_S = 300  # per phase; a normal run takes well under a minute per phase on 2 cores

# The tiny Engram model shrunk to seconds per step on CPU (active_rtol relaxed: at this size
# the Engram projections alone exceed the default 5% active-parameter tolerance).
MICRO = [
  "--config=experiments/configs/tiny.py:engram",
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
  # Engram tables split by rows over both devices, i.e. across the two processes: every
  # lookup routes ids and rows between them (all_to_all over gloo).
  "--config.model.engram_table_sharding=all",
  "--config.model.engram_row_multiple=2",
  "--config.data.seq_len=32",
  "--config.data.bpe_vocab_size=512",
  "--config.data.max_bytes=300000",
  "--config.data.tokenizer_train_bytes=150000",
  "--config.data.num_eval_batches=1",
  f"--config.train.total_steps={STEPS}",
  f"--config.train.eval_every={STEPS}",
  "--config.train.checkpoint_every=1000",
  "--config.train.log_every=1",
  "--config.train.progress_bar=False",
  "--config.train.warmup_steps=1",
]


def _env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices)}


def _run_all(runs: list[tuple[list[str], dict, Path]], base: list[str] = MICRO) -> list[dict]:
  """Starts `python -m experiments.train *base *args` per (args, env, log) and waits for all
  of them (killing every one on timeout or failure); their printed summaries."""
  procs = []
  try:
    for args, env, log in runs:
      with open(log, "w") as out:  # a file, not a pipe: orbax logs a lot and pipes fill up
        procs.append(
          subprocess.Popen(
            [sys.executable, "-m", "experiments.train", *base, *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
          )
        )
    deadline = time.monotonic() + TIMEOUT_S
    for proc, (_, _, log) in zip(procs, runs):
      try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"training did not finish in {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
      if proc.returncode != 0:
        pytest.fail(f"training exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
  finally:
    for proc in procs:  # no orphans, whatever happened above
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return [json.loads(log.read_text().strip().splitlines()[-1]) for _, _, log in runs]


def _metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def completed_train_rows(ref: dict, summaries: list[dict], ref_dir: Path, two_dir: Path, steps: int):
  """Checks the reference and both processes completed `steps` steps; returns the metric rows
  of the reference run and of the 2-process run (process 0 writes them), and their train rows
  by step."""
  assert ref["status"] == "completed" and ref["step"] == steps
  assert [(s["process"], s["status"], s["step"]) for s in summaries] == [
    (0, "completed", steps),
    (1, "completed", steps),
  ]
  ref_rows, two_rows = _metrics(ref_dir), _metrics(two_dir)
  ref_train = {r["step"]: r for r in ref_rows if r["split"] == "train"}
  two_train = {r["step"]: r for r in two_rows if r["split"] == "train"}
  assert sorted(two_train) == sorted(ref_train) == list(range(1, steps + 1))
  return ref_rows, two_rows, ref_train, two_train


def test_two_processes_reach_the_single_process_losses(tmp_path):
  tok = f"--config.data.tokenizer_dir={tmp_path / 'tok'}"
  # Reference first: it also trains the shared tokenizer, so the two processes only load it.
  ref_dir = tmp_path / "one"
  [ref] = _run_all(
    [([f"--workdir={ref_dir}", tok, "--config.data.batch_size=4", "--data_shards=2"], _env(2), tmp_path / "one.log")]
  )

  two_dir, port = tmp_path / "two", portpicker.pick_unused_port()
  summaries = _run_all(
    [
      (
        [
          f"--workdir={two_dir}",
          tok,
          "--config.data.batch_size=2",
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2",
          f"--process_id={i}",
        ],
        _env(1),
        tmp_path / f"two.{i}.log",
      )
      for i in range(2)
    ]
  )

  ref_rows, two_rows, ref_train, two_train = completed_train_rows(ref, summaries, ref_dir, two_dir, STEPS)
  for step in ref_train:
    # same global batch (a target at a document start is masked, so <= 4 * 32)
    assert two_train[step]["tokens"] == ref_train[step]["tokens"] > 0.9 * 4 * 32
    # Same partitioned program on 2 devices; only the all-reduce moved from in-process to
    # gloo (a 2-way sum: exact here; 1e-5 covers a reassociating reduction).
    assert two_train[step]["loss"] == pytest.approx(ref_train[step]["loss"], rel=1e-5, abs=1e-6), step
    assert two_train[step]["grad_norm"] == pytest.approx(ref_train[step]["grad_norm"], rel=1e-5)
  assert ref_train[STEPS]["loss"] != ref_train[1]["loss"]  # it trained
  # Validation: every process holds the same batch, each device evaluates its rows.
  [ref_val] = [r for r in ref_rows if r["split"] == "val"]
  [two_val] = [r for r in two_rows if r["split"] == "val"]
  assert two_val["val_tokens"] == ref_val["val_tokens"] > 0
  assert two_val["val_loss"] == pytest.approx(ref_val["val_loss"], rel=1e-5)
  assert summaries[1]["eval"]["val_loss"] == pytest.approx(ref_val["val_loss"], rel=1e-5)
  # The collective checkpoint: one state, one data-iterator file per process.
  step_dir = two_dir / "checkpoints" / str(STEPS)
  assert (step_dir / "state").is_dir() and (step_dir / "meta").is_dir()
  assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]


# -- in-process checks of the data layout helpers (fast) ---------------------------------------


class _CountingIterator:
  """Batches {"x": [[start + i] * 1 for the batch's rows]} and a JSON state."""

  def __init__(self, start: int, rows: int):
    self.next, self.rows = start, rows

  def __next__(self):
    import numpy as np

    batch = {"x": np.arange(self.next, self.next + self.rows)[:, None]}
    self.next += self.rows
    return batch

  def get_state(self):
    return {"next": self.next}

  def set_state(self, state):
    self.next = state["next"]


def test_concat_batch_iterator_stacks_shards_and_round_trips_its_state():
  from engram_jax.train.multihost import ConcatBatchIterator

  it = ConcatBatchIterator([_CountingIterator(0, 2), _CountingIterator(100, 2)])
  assert next(it)["x"][:, 0].tolist() == [0, 1, 100, 101]
  state = it.get_state()
  assert next(it)["x"][:, 0].tolist() == [2, 3, 102, 103]
  fresh = ConcatBatchIterator([_CountingIterator(0, 2), _CountingIterator(100, 2)])
  fresh.set_state(state)
  assert next(fresh)["x"][:, 0].tolist() == [2, 3, 102, 103]
  with pytest.raises(ValueError, match="holds 2 shards, this process reads 1"):
    ConcatBatchIterator([_CountingIterator(0, 2)]).set_state(state)


def test_single_process_layout_reads_data_shards_of_the_global_batch():
  import jax

  from engram_jax import sharding as sharding_lib
  from engram_jax.train.multihost import data_layout

  mesh = sharding_lib.make_mesh(data=jax.device_count())
  default = data_layout(mesh, 4)
  assert (default.global_batch, default.num_shards, default.shards) == (4, 1, (0,))
  two = data_layout(mesh, 4, data_shards=2)
  assert (two.global_batch, two.rows_per_shard, two.shards) == (4, 2, (0, 1))
  with pytest.raises(ValueError, match="data_shards=3 does not divide the global batch of 4"):
    data_layout(mesh, 4, data_shards=3)
  with pytest.raises(ValueError, match="data_shards=0"):
    data_layout(mesh, 4, data_shards=0)
