r"""Step time vs Engram table size with device tables: dense Adam vs the row-sparse updates.

  PYTHONPATH=. python -m experiments.bench.table_scaling [--slots=1000,30000,300000,1000000]
      [--optimizers=dense_adam,catchup_adam,sparse_adam] [--steps=20] [--batch=4] [--seq_len=64]

The tiny engram_moe model (`ModelConfig.tiny`, one Engram layer of 4 heads, d_h 8) with
every head's table at `slots` rows; the same random batches for every size. A step is the
trainer's jitted step (state donated) and a float(loss) sync, as the training loop runs it.
Prints the median step time per (optimizer, slots) and each optimizer's ratio to its
smallest size, all measured in this run. The goal: the default (catchup_adam) at 1M slots
per head within 1.1x of 1k (dense Adam reads and writes the whole table, m and v every
step; catchup_adam and sparse_adam only the rows a batch touches).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import app, flags

from engram_jax.models.config import ModelConfig
from engram_jax.train.optimizer import make_table_optimizer
from engram_jax.train.state import build_model
from experiments.bench.shared import TRAIN, device_train_step, lm_batch

_SLOTS = flags.DEFINE_list("slots", ["1000", "30000", "300000", "1000000"], "Rows per head.")
_OPTIMIZERS = flags.DEFINE_list(
  "optimizers", ["dense_adam", "catchup_adam", "sparse_adam"], "TrainConfig.table_optimizer values to time."
)
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per setting and round.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per setting (compilation).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds over all settings, interleaved.")


def model_config(slots: int) -> ModelConfig:
  tiny = ModelConfig.tiny("engram_moe")
  return tiny.replace(engram=dataclasses.replace(tiny.engram, vocab_sizes=(slots, slots)))


def batches(cfg: ModelConfig, sizes, n: int, seed: int = 0) -> list[dict]:
  """`n` batches of random tokens and uniform row ids (the same tokens for every size)."""
  rng = np.random.default_rng(seed)
  b, t = _BATCH.value, _SEQ.value
  ids = lambda rng: {1: (rng.random((b, t, len(sizes))) * np.asarray(sizes)).astype(np.int32)}
  return [lm_batch(rng, cfg.vocab_size, b, t, ids) for _ in range(n)]


class Runner:
  """One (optimizer, slots) setting: its compiled step, state and batches."""

  def __init__(self, optimizer: str, slots: int):
    cfg = model_config(slots)
    model = build_model(cfg, 0)
    self.num_rows = model.blocks[1].engram.num_rows
    self.step, self.state = device_train_step(model, TRAIN.replace(table_optimizer=optimizer), make_table_optimizer)
    self.batches = batches(cfg, model.blocks[1].engram.table_sizes, _WARMUP.value + _STEPS.value)
    for batch in self.batches[: _WARMUP.value]:  # compiles
      self.run_one(batch)

  def run_one(self, batch) -> float:
    t0 = time.perf_counter()
    self.state, metrics, _ = self.step(self.state, batch)
    float(metrics["loss"])
    return time.perf_counter() - t0

  def time_round(self) -> list[float]:
    return [self.run_one(b) for b in self.batches[_WARMUP.value :]]


def main(argv):
  del argv
  slots = [int(s) for s in _SLOTS.value]
  print(
    f"devices: {jax.devices()}; batch {_BATCH.value} x {_SEQ.value}, {_STEPS.value} timed steps "
    f"x {_ROUNDS.value} rounds (interleaved) per setting"
  )
  runners = {(o, s): Runner(o, s) for o in _OPTIMIZERS.value for s in slots}
  times: dict[tuple[str, int], list[float]] = {k: [] for k in runners}
  # rounds interleave the settings, so load on a shared machine hits all of them alike
  for _ in range(_ROUNDS.value):
    for key, runner in runners.items():
      times[key] += runner.time_round()
  print(f"\n{'optimizer':<12} {'slots/head':>11} {'table rows':>11} {'step ms':>9} {'IQR ms':>13} {'vs smallest':>11}")
  for o in _OPTIMIZERS.value:
    base = float(np.median(times[(o, slots[0])]))
    for s in slots:
      t = np.asarray(times[(o, s)])
      med, lo, hi = np.median(t), np.percentile(t, 25), np.percentile(t, 75)
      print(
        f"{o:<12} {s:>11,} {runners[(o, s)].num_rows:>11,} {1e3 * med:>9.2f} "
        f"{1e3 * lo:>6.2f}-{1e3 * hi:<6.2f} {med / base:>11.2f}"
      )
  for o in _OPTIMIZERS.value:
    ratio = np.median(times[(o, slots[-1])]) / np.median(times[(o, slots[0])])
    print(f"ratio {o} {slots[-1]:,}/{slots[0]:,} slots: {ratio:.2f}")


if __name__ == "__main__":
  app.run(main)
