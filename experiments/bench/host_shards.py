r"""Benchmark: host tables split over 2 processes on localhost vs the one-process host run.

The same model (tiny MoE backbone, two Engram layers with larger tables) and the same
global batches (Zipf row ids, exponent --zipf) are trained
  one  1 process, 1 CPU device: `HostTableTrainer` (the whole tables + Adam m, v in its RAM);
  two  2 processes x 1 CPU device (jax.distributed over localhost, gloo collectives):
       `ShardedHostTableTrainer` (each process holds half of every table and of m, v);
and, in the same 2 processes after the memory was read, --pairs steps alternating with the
existing multi-process path (tables on the devices, replicated, dense Adam): a paired
tokens/s ratio that isolates the cost of the 2-process data parallelism itself.
Printed per run: tokens/s (global batch tokens / mean step time over the timed steps,
± SE), bytes exchanged per step (the all_to_all buffers of ids, rows and row gradients
one device sends; the part addressed to the other process), each process's host-table
bytes (table + m + v + count) and resident memory (VmRSS after training, VmHWM peak),
and the ratios two / one.

  JAX_PLATFORMS=cpu python -m experiments.bench.host_shards            # ~3 min on 2 cores

On one machine both processes share its cores and memory bus: tokens/s shows the
protocol's overhead (routing, gloo collectives, host serve / update), not multi-host
scaling. The memory columns are the point: each process holds half of the tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from flax import nnx

from engram_jax.models.config import ModelConfig
from experiments.bench.shared import TRAIN, device_train_step, lm_batch

_WORKER = flags.DEFINE_string("worker", "", "Internal: 'one' or 'two' (run one process of the benchmark).")
_PORT = flags.DEFINE_integer("port", 0, "Internal: coordinator port.")
_PROCESS = flags.DEFINE_integer("process_id", 0, "Internal: process id.")
_VOCAB = flags.DEFINE_integer("vocab", 100_000, "Nominal rows per Engram head (4 heads per layer, 2 layers).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (rows).")
_SEQ = flags.DEFINE_integer("seq", 64, "Sequence length.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_ZIPF = flags.DEFINE_float("zipf", 1.05, "Zipf exponent of the row ids.")
_CAPACITY = flags.DEFINE_float("capacity_factor", 1.25, "Request bucket capacity factor (0: exact).")
_PAIRS = flags.DEFINE_integer(
  "pairs", 10, "Paired steps sharded-host / replicated-device in the 2-process run (0: none)."
)
WARMUP = 2


def _config() -> ModelConfig:
  tiny = ModelConfig.tiny("engram_moe")
  engram = dataclasses.replace(tiny.engram, vocab_sizes=(_VOCAB.value,) * 2, n_embed_per_ngram=64, layer_ids=(1, 2))
  return tiny.replace(engram=engram)


def _batches(model, steps: int, seed: int = 0) -> list[dict]:
  """Global batches: random tokens, Zipf-distributed ids over each head's rows."""
  rng = np.random.default_rng(seed)
  b, t, cfg = _BATCH.value, _SEQ.value, model.config
  out = []
  for _ in range(steps):
    ids = {}  # drawn before the tokens
    for l in cfg.engram_layer_ids:
      sizes = model.blocks[l].engram.table_sizes
      ids[l] = np.stack([(rng.zipf(_ZIPF.value, (b, t)) - 1) % s for s in sizes], -1).astype(np.int32)
    out.append(lm_batch(rng, cfg.vocab_size, b, t, lambda _, ids=ids: ids))
  return out


def _memory() -> dict[str, int]:
  fields = {}
  for line in Path("/proc/self/status").read_text().splitlines():
    key, _, value = line.partition(":")
    if key in ("VmRSS", "VmHWM"):
      fields[key] = int(value.split()[0]) * 1024
  return fields


def _timed(step, batches) -> list[float]:
  times = []
  for i, batch in enumerate(batches):
    t0 = time.perf_counter()
    step(batch)
    if i >= WARMUP:
      times.append(time.perf_counter() - t0)
  return times


def _initialize() -> None:
  import jax

  jax.distributed.initialize(coordinator_address=f"localhost:{_PORT.value}", num_processes=2, process_id=_PROCESS.value)


def _local(batch: dict) -> dict:
  """This process's half of a global batch."""
  half = slice(_PROCESS.value * _BATCH.value // 2, (_PROCESS.value + 1) * _BATCH.value // 2)
  return {k: ({l: v[half] for l, v in x.items()} if k == "engram_ids" else x[half]) for k, x in batch.items()}


def _dp_stepper(cfg, rate):
  """The existing 2-process path: tables on the devices (replicated), dense Adam; a
  function running one step on this process's half of a global batch."""
  import jax

  from engram_jax import sharding as sharding_lib
  from engram_jax.train import multihost
  from engram_jax.train.sharded_host_trainer import put_global
  from engram_jax.train.state import build_model, tree_shardings
  from engram_jax.train.steps import batch_shardings

  mesh = sharding_lib.make_mesh(data=2)
  step_fn, state = device_train_step(build_model(_config(), 0), cfg, bias_update_rate=rate)
  state = [put_global(state, tree_shardings(state, mesh))]

  def one_step(batch):
    local = _local(batch)
    put = multihost.put_process_batch(local, batch_shardings(local, mesh), _BATCH.value)
    with jax.set_mesh(mesh):
      state[0], metrics, _ = step_fn(state[0], put)
    jax.block_until_ready(metrics)

  return one_step


def _worker(kind: str) -> None:
  import jax

  from engram_jax.train.state import build_model

  cfg = TRAIN.replace(warmup_steps=1)
  rate = _config().moe.bias_update_rate
  n = WARMUP + _STEPS.value
  paired = {}
  if kind == "one":
    from engram_jax.models.host_init import build_offloaded
    from engram_jax.train.host_trainer import HostTableTrainer

    # the tables initialised in host memory (never on the device), as the sharded run
    model, offloaded = build_offloaded(lambda: build_model(_config(), 0), "host")
    batches = _batches(model, n)
    trainer = HostTableTrainer(model, offloaded, cfg, bias_update_rate=rate)
    del model, offloaded
    host_bytes = sum(sum(v.nbytes for v in s.state_dict().values()) for s in trainer.offloaded.host_stores.values())
    times = _timed(lambda b: jax.block_until_ready(trainer.step(b)[0]), batches)
    ids = sum(x.size for x in batches[0]["engram_ids"].values())
    d = next(iter(trainer.offloaded.tables.values())).dim
    exchanged = {"rows_to_device": ids * d * 4}
    memory = _memory()
  elif kind == "two":
    _initialize()
    from engram_jax import sharding as sharding_lib
    from engram_jax.distributed import host_shards
    from engram_jax.train.sharded_host_trainer import ShardedHostTableTrainer

    mesh = sharding_lib.make_mesh(data=2)
    build = lambda: build_model(_config(), 0)  # noqa: E731
    batches = _batches(nnx.eval_shape(build), n + 2 * _PAIRS.value)
    # each device initialises its rows of the tables: they are never whole in a process
    trainer = ShardedHostTableTrainer(build, cfg, mesh, bias_update_rate=rate, capacity_factor=_CAPACITY.value or None)
    host_bytes = trainer.host_bytes()
    times = _timed(lambda b: trainer.step(_local(b)), batches[:n])
    memory = _memory()  # before the baseline below allocates its replicated tables
    req = trainer.request(_local(batches[0]))
    per = [
      host_shards.exchange_bytes(trainer.plans[l], r, trainer.tables[l].dim, trainer.tables[l].table.itemsize)
      for l, r in req.items()
    ]
    exchanged = {"all_to_all_sent": sum(p["total"] for p in per), "cross_process": sum(p["cross_device"] for p in per)}
    exchanged["capacity"] = {str(l): r.capacity for l, r in req.items()}
    if _PAIRS.value:  # paired: alternate a sharded-host step and a replicated-device step
      dp_step = _dp_stepper(cfg, rate)
      for b in batches[:WARMUP]:
        dp_step(b)
      ratios = []
      for i in range(_PAIRS.value):
        t0 = time.perf_counter()
        trainer.step(_local(batches[n + 2 * i]))
        t1 = time.perf_counter()
        dp_step(batches[n + 2 * i + 1])
        ratios.append((time.perf_counter() - t1) / (t1 - t0))  # tokens/s sharded / replicated
      paired = {"speed_vs_dp_mean": float(np.mean(ratios)), "speed_vs_dp_se": _se(ratios), "pairs": len(ratios)}
  else:
    raise ValueError(f"unknown worker kind {kind!r}")
  tokens = _BATCH.value * _SEQ.value
  result = {
    "kind": kind,
    "process": _PROCESS.value,
    "tokens_per_s": tokens / float(np.mean(times)),
    "step_s_mean": float(np.mean(times)),
    "step_s_se": _se(times),
    "host_table_bytes": int(host_bytes),
    "exchanged_per_step": exchanged,
    **paired,
    **memory,
  }
  print("RESULT " + json.dumps(result), flush=True)


def _se(values) -> float:
  return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def _run(kind: str, processes: int) -> list[dict]:
  import portpicker

  port = portpicker.pick_unused_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  flags_ = [f"--vocab={_VOCAB.value}", f"--batch={_BATCH.value}", f"--seq={_SEQ.value}", f"--steps={_STEPS.value}"]
  flags_ += [f"--zipf={_ZIPF.value}", f"--capacity_factor={_CAPACITY.value}", f"--pairs={_PAIRS.value}"]
  cmd = [sys.executable, "-m", "experiments.bench.host_shards", f"--worker={kind}", f"--port={port}", *flags_]
  procs = [
    subprocess.Popen(cmd + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for i in range(processes)
  ]
  out = []
  try:
    for p in procs:
      text, _ = p.communicate(timeout=1200)
      if p.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{text[-3000:]}")
      out.append(json.loads([x for x in text.splitlines() if x.startswith("RESULT ")][-1][7:]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return out


def main(argv) -> None:
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  [one] = _run("one", 1)
  two = _run("two", 2)
  mib = 2**20
  print(
    f"model: tiny MoE + 2 Engram layers, {_VOCAB.value} nominal rows x 4 heads each, d_head 32, float32; "
    f"global batch {_BATCH.value} x {_SEQ.value}, Zipf {_ZIPF.value}, {_STEPS.value} timed steps"
  )
  print("| run | process | tokens/s | step ms (mean ± SE) | host tables MiB | VmRSS MiB | VmHWM MiB | sent/step |")
  print("|---|---|---|---|---|---|---|---|")
  for r in [one, *two]:
    ex = r["exchanged_per_step"]
    sent = (
      "dense grads all-reduce only"
      if r["kind"] == "two_dp"
      else (
        f"{ex['all_to_all_sent'] / 1024:.0f} KiB all_to_all ({ex['cross_process'] / 1024:.0f} KiB to the other process)"
        if r["kind"] == "two"
        else f"{ex['rows_to_device'] / 1024:.0f} KiB rows host->device"
      )
    )
    print(
      f"| {r['kind']} | {r['process']} | {r['tokens_per_s']:.0f} | {1e3 * r['step_s_mean']:.1f} ± "
      f"{1e3 * r['step_s_se']:.1f} | {r['host_table_bytes'] / mib:.1f} | {r['VmRSS'] / mib:.0f} | "
      f"{r['VmHWM'] / mib:.0f} | {sent} |"
    )
  print(f"tokens/s ratio two / one: {two[0]['tokens_per_s'] / one['tokens_per_s']:.2f}")
  if "pairs" in two[0]:
    print(
      f"tokens/s ratio two / replicated device tables in the same 2 processes (paired, {two[0]['pairs']} pairs): "
      f"{two[0]['speed_vs_dp_mean']:.2f} ± {two[0]['speed_vs_dp_se']:.2f}"
    )
  for r in two:
    print(
      f"process {r['process']}: host-table bytes / one-process = {r['host_table_bytes'] / one['host_table_bytes']:.3f}, "
      f"VmRSS / one-process = {r['VmRSS'] / one['VmRSS']:.2f}"
    )
  print(f"capacity C per table: {two[0]['exchanged_per_step']['capacity']}")


if __name__ == "__main__":
  app.run(main)
