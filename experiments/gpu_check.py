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

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
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
      entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                   traceback=traceback.format_exc()[-3000:])
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


def _time_calls(fn, *args, iters: int) -> list[float]:
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


# ------------------------------------------------------------------------------- env step
def step_env(log: StepLog, smoke: bool) -> None:
  import jax
  import jax.numpy as jnp
  import jaxlib

  from experiments.bench import lookup

  dev = jax.devices()[0]
  versions = {}
  for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
               "jax-cuda13-pjrt", "flax", "optax", "numpy"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  stats = dev.memory_stats() or {}
  log.put("device", {"backend": jax.default_backend(), "kind": dev.device_kind,
                     "count": jax.device_count(), "memory_bytes": stats.get("bytes_limit"),
                     "platform_version": getattr(dev.client, "platform_version", None)})
  log.put("versions", {"python": platform.python_version(), "jax": jax.__version__,
                       "jaxlib": jaxlib.__version__, **versions})
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    log.put("nvidia_smi", smi.stdout.strip() or smi.stderr.strip())
  except (OSError, subprocess.SubprocessError) as e:
    log.put("nvidia_smi", f"unavailable: {e}")

  small = smoke or jax.default_backend() != "gpu"   # no GPU: keep it quick, the rest is skipped
  copy_bytes = (64 << 20) if small else (4 << 30)

  def copy():
    bw = lookup.copy_bandwidth(copy_bytes, iters=3 if small else 20)
    return {"copy_GBps": bw / 1e9, "buffer_bytes": copy_bytes}
  log.case("measures", "hbm_copy_bandwidth", copy)

  def matmul():
    n = 256 if small else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    st = _stats(_time_calls(f, a, b, iters=3 if small else 20))
    return {"shape": [n, n, n], **st, "tflops": 2 * n**3 / (st["median_ms"] * 1e-3) / 1e12}
  log.case("measures", "bf16_matmul", matmul)


# ----------------------------------------------------------------------- correctness step
@dataclasses.dataclass(frozen=True)
class KernelCase:
  name: str
  rows: int
  d: int
  n: int
  heads: int
  dtype: str
  dim: int = 0        # D (gather_gate only)
  branches: int = 1   # G
  gate: str = "reference"
  expect: str = ""    # gather_gate on the GPU backend: "fused" or "fallback"


# The paper: 16 heads x 80 bf16 (C = 1280), D = 2560, G = 4. Odd ones: N not a multiple of
# any block (1000, 333, 13), G = 1, f32 (tf32 wgmma), D not a multiple of 64 (fallback).
GPU_GATHER = (
    KernelCase("gather paper bf16 d80 H16 N16384", 262_147, 80, 16384, 16, "bfloat16"),
    KernelCase("gather odd N1000 bf16 d80 H16", 5003, 80, 1000, 16, "bfloat16"),
    KernelCase("gather f32 d128 (512 B rows) N333 H4", 4099, 128, 333, 4, "float32"),
    KernelCase("gather f32 d16 (64 B rows) N13 H3", 37, 16, 13, 3, "float32"),
)
GPU_FUSED = (
    KernelCase("gather_gate paper bf16 G4 N4096", 100_003, 80, 4096, 16, "bfloat16", 2560, 4,
               expect="fused"),
    KernelCase("gather_gate odd N1000 bf16 G1", 5003, 80, 1000, 16, "bfloat16", 2560, 1,
               expect="fused"),
    KernelCase("gather_gate f32 (tf32) d16 H3 D128 G1 N130 paper gate", 37, 16, 130, 3,
               "float32", 128, 1, "paper", expect="fused"),
    KernelCase("gather_gate fallback f32 paper C G4 N1000", 5003, 80, 1000, 16, "float32",
               2560, 4, expect="fallback"),
    KernelCase("gather_gate fallback bf16 D96 G4 N77", 101, 80, 77, 4, "bfloat16", 96, 4,
               expect="fallback"),
)
SMOKE_GATHER = (
    KernelCase("gather f32 d16 N13 H3", 37, 16, 13, 3, "float32"),
    KernelCase("gather bf16 d64 N13 H3", 37, 64, 13, 3, "bfloat16"),
)
SMOKE_FUSED = (
    KernelCase("gather_gate fused f32 d16 H2 D64 G4 N6", 37, 16, 6, 2, "float32", 64, 4,
               expect="fused"),
    KernelCase("gather_gate fallback f32 d16 H2 D32 G1 N6", 37, 16, 6, 2, "float32", 32, 1,
               "paper", expect="fallback"),
)


def _kernel_inputs(case: KernelCase, seed: int = 0) -> dict:
  """NumPy-built inputs (no compile); ids include duplicates and both boundary rows."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  c = case.heads * case.d
  ids = rng.integers(0, case.rows, (case.n, case.heads), dtype=np.int32)
  ids[0, 0], ids[0, -1] = case.rows - 1, 0       # boundaries
  if case.n > 2:
    ids[1] = ids[0]                               # duplicates across tokens
    ids[2, :] = case.rows // 2                    # duplicates within a token
  dt = jnp.dtype(case.dtype)
  out = {"table": jnp.asarray(rng.standard_normal((case.rows, case.d), np.float32), dt),
         "row_ids": jnp.asarray(ids)}
  if case.dim:
    g, dim = case.branches, case.dim
    normal = lambda *s: rng.standard_normal(s, np.float32)
    out.update(w_value=normal(c, dim) / np.sqrt(c), b_value=0.1 * normal(dim),
               w_key=normal(g, c, dim) / np.sqrt(c), b_key=0.1 * normal(g, dim),
               query_normed=normal(case.n, g, dim), key_norm_scale=1 + 0.1 * normal(g, dim))
    out.update({k: jnp.asarray(v, dt) for k, v in out.items() if k not in ("table", "row_ids")})
  return out


GATE_ARGS = ("table", "row_ids", "w_value", "b_value", "w_key", "b_key", "query_normed",
             "key_norm_scale")


def _rel_err(a, b) -> float:
  """max |a - b| / max |b| (float64): scale-free, so one tolerance serves every shape."""
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not np.isfinite(a).all():
    return float("inf")
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _tol(dtype: str, on_gpu: bool) -> float:
  if dtype == "bfloat16":
    return 2e-2
  return 5e-3 if on_gpu else 1e-4   # f32 on the GPU: the fused kernel runs tf32 wgmma


def _vjp_all(fn, x: dict, names, seed=1):
  """Outputs of fn and the gradients of a random linear functional of them w.r.t. names."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  def f(*diff):
    full = dict(x)
    full.update(zip(names, diff))
    return fn(full)
  outs, vjp = jax.vjp(f, *[x[k] for k in names])
  rng = np.random.default_rng(seed)
  cot = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), outs)
  return outs, dict(zip(names, vjp(cot)))


def check_gather(case: KernelCase, backend: str, on_gpu: bool) -> dict:
  import jax
  import numpy as np

  import pallas_kernels as pk
  from pallas_kernels import reference
  x = _kernel_inputs(case)
  kern = jax.jit(lambda a: pk.gather_rows(a["table"], a["row_ids"], impl="pallas", backend=backend))
  ref = jax.jit(lambda a: reference.gather_rows(a["table"], a["row_ids"]))
  out, out_r = kern(x), ref(x)
  exact = bool(np.array_equal(np.asarray(out, np.float32), np.asarray(out_r, np.float32)))
  (_, grads), (_, grads_r) = (_vjp_all(kern, x, ("table",)), _vjp_all(ref, x, ("table",)))
  errs = {"d_table": _rel_err(grads["table"], grads_r["table"])}
  tol = _tol(case.dtype, on_gpu)
  ok = exact and all(e <= tol for e in errs.values())
  return {"status": "ok" if ok else "mismatch", "forward_exact": exact, "grad_rel_err": errs,
          "tol": tol, "case": dataclasses.asdict(case)}


def check_gather_gate(case: KernelCase, backend: str, on_gpu: bool) -> dict:
  import jax

  import pallas_kernels as pk
  from pallas_kernels import reference
  x = _kernel_inputs(case)
  args = lambda a: [a[k] for k in GATE_ARGS]
  kern = lambda a: pk.gather_gate(*args(a), gate=case.gate, impl="pallas", backend=backend)
  ref = lambda a: reference.gather_gate(*args(a), gate=case.gate)
  # Which GPU path ran: the kernel's jitted wrapper is named in the traced program.
  path = None
  if backend == "gpu":
    path = "fused" if "name=gather_gate_fused_gpu" in str(jax.make_jaxpr(kern)(x)) else "fallback"
  diff = [k for k in GATE_ARGS if k != "row_ids"]
  (u, g), grads = _vjp_all(jax.jit(kern), x, diff)
  (u_r, g_r), grads_r = _vjp_all(jax.jit(ref), x, diff)
  tol = _tol(case.dtype, on_gpu)
  errs = {"u": _rel_err(u, u_r), "gates": _rel_err(g, g_r),
          **{f"d_{k}": _rel_err(grads[k], grads_r[k]) for k in diff}}
  ok = all(e <= tol for e in errs.values())
  path_ok = case.expect in ("", path) or backend != "gpu"
  return {"status": "ok" if ok and path_ok else "mismatch", "gpu_path": path,
          "expected_path": case.expect, "rel_err": errs, "tol": tol,
          "case": dataclasses.asdict(case)}


def check_engram_layer(dtype: str, on_gpu: bool, smoke: bool) -> dict:
  """The Engram layer, impl="pallas" vs impl="xla": outputs, gates and parameter gradients."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from engram_jax import Engram, EngramConfig
  if smoke:
    cfg = EngramConfig(vocab_sizes=(13, 17), n_embed_per_ngram=32, n_head_per_ngram=2,
                       layer_ids=(1,), pad_id=0)
    hidden, hc, b, t = 64, 2, 1, 5
  else:  # the paper's layer: 2 orders x 8 heads x 80 = d_mem 1280, D = 2560, 4 branches
    cfg = EngramConfig(vocab_sizes=(100_000, 100_000), n_embed_per_ngram=640, n_head_per_ngram=8,
                       layer_ids=(1,), pad_id=0)
    hidden, hc, b, t = 2560, 4, 2, 512
  heads = cfg.num_heads
  base = 11 if smoke else 100_003
  sizes = [base + 2 * h for h in range(heads)]
  dt = jnp.dtype(dtype)
  module = Engram(cfg, 1, hidden, hc, table_sizes=sizes, dtype=dt, param_dtype=dt,
                  rngs=nnx.Rngs(0))
  module.conv_kernel[...] = 0.3 * jax.random.normal(jax.random.key(1), module.conv_kernel.shape, dt)
  rng = np.random.default_rng(0)
  ids = np.stack([rng.integers(0, s, (b, t)) for s in sizes], -1).astype(np.int32)
  ids[0, 0, :] = [s - 1 for s in sizes]   # boundary rows of every head
  ids[0, 1] = ids[0, 0]                   # duplicates
  h = jax.random.normal(jax.random.key(2), (b, t, hc, hidden), dt)
  graphdef, params = nnx.split(module, nnx.Param)

  def run(p, impl):
    m = nnx.merge(graphdef, p)
    m.impl = impl
    return m(h, jnp.asarray(ids), return_gates=True)

  def loss(p, impl):
    y, _ = run(p, impl)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  out = {}
  for impl in ("xla", "pallas"):
    y, gates = jax.jit(run, static_argnums=1)(params, impl)
    grads = jax.jit(jax.grad(loss), static_argnums=1)(params, impl)
    out[impl] = (y, gates, grads)
  tol = _tol(dtype, on_gpu)
  errs = {"y": _rel_err(out["pallas"][0], out["xla"][0]),
          "gates": _rel_err(out["pallas"][1], out["xla"][1])}
  for name in ("table", "value_kernel", "key_kernel"):
    errs[f"d_{name}"] = _rel_err(out["pallas"][2][name][...], out["xla"][2][name][...])
  ok = all(e <= tol for e in errs.values())
  return {"status": "ok" if ok else "mismatch", "rel_err": errs, "tol": tol,
          "shape": {"B": b, "T": t, "hc": hc, "D": hidden, "heads": heads, "d": cfg.head_dim}}


def step_correctness(log: StepLog, smoke: bool) -> None:
  import jax
  on_gpu = jax.default_backend() == "gpu"
  # The GPU kernels on the GPU (interpret mode on CPU: the logic, not the hardware).
  backend = "gpu"
  for case in SMOKE_GATHER if smoke else GPU_GATHER:
    log.case("checks", case.name, lambda case=case: check_gather(case, backend, on_gpu), 3)
  for case in SMOKE_FUSED if smoke else GPU_FUSED:
    log.case("checks", case.name, lambda case=case: check_gather_gate(case, backend, on_gpu),
             5 if smoke else 8)
  for dtype in ("float32",) if smoke else ("bfloat16", "float32"):
    log.case("checks", f"engram layer pallas vs xla {dtype}",
             lambda dtype=dtype: check_engram_layer(dtype, on_gpu, smoke), 8 if smoke else 15)


# ---------------------------------------------------------------------------- lookup step
def step_lookup(log: StepLog, smoke: bool) -> None:
  import jax

  from experiments.bench import lookup
  if smoke:
    gather = (lookup.GatherCase(4096, 128, "bfloat16", 64, 4),)
    fused = (lookup.FusedCase(4096, 16, "float32", 8, 2, 64, 1),)
    copy_bytes, iters = 64 << 20, 1
  else:
    p = lookup.PRESETS["h200"]
    # The goal's cases (rows >= 256 B) and the fused op first; the 100M-row table last.
    gather = tuple(sorted(p.gather, key=lambda c: (c.rows >= 100_000_000,
                                                   c.d * (2 if c.dtype == "bfloat16" else 4) < 256)))
    fused, copy_bytes, iters = p.fused, p.copy_bytes, 10
  bw = lookup.copy_bandwidth(copy_bytes, iters=max(iters, 5))
  log.put("copy_GBps", bw / 1e9)
  log.put("iters", iters)
  backend = "gpu"

  def one_gather(case):
    r = lookup.bench_gather(case, bw, iters, None, backend)
    return {**r, "case": dataclasses.asdict(case), "pallas_GBps": r["bytes"] / r["pallas_s"] / 1e9,
            "xla_GBps": r["bytes"] / r["xla_s"] / 1e9, "ratio_to_copy": r["bytes"] / r["pallas_s"] / bw,
            "speedup_vs_xla": r["xla_s"] / r["pallas_s"]}

  def one_fused(case):
    r = lookup.bench_fused(case, bw, iters, None, backend)
    return {**r, "case": dataclasses.asdict(case),
            "speedup_fwd": r["xla_fwd_s"] / r["pallas_fwd_s"],
            "speedup_fwd_bwd": r["xla_fwd+bwd_s"] / r["pallas_fwd+bwd_s"]}

  # Fused first after the first goal case: it is the goal most at risk of the budget.
  ordered = [("gather", gather[0])] + [("fused", c) for c in fused] + [("gather", c) for c in gather[1:]]
  for kind, case in ordered:
    fn = one_gather if kind == "gather" else one_fused
    label = (f"{kind} R={case.rows:,} d={case.d} {case.dtype} N={case.tokens} H={case.heads}"
             + (f" D={case.dim} G={case.branches}" if kind == "fused" else ""))
    log.case(kind, label, lambda fn=fn, case=case: fn(case), 4 if smoke else 10)
  jax.clear_caches()


# --------------------------------------------------------------------------- offload step
def step_offload(log: StepLog, smoke: bool) -> None:
  import jax

  from experiments.bench import offload
  preset = offload._presets()["cpu_tiny" if smoke else "h200"]
  if smoke:
    preset = dataclasses.replace(preset, warmup=1)
    train_steps, decode_steps, placements = 2, 3, ("device", "host")
  else:
    # The h200 preset (1B-parameter table, B=16 x T=512, 64 decode sequences) with 4 blocks
    # instead of 12, so that its 4 compiles fit the budget. Less compute to hide the host
    # gather behind than the 12-block model: the host/device ratio is a conservative one.
    preset = dataclasses.replace(preset, model=preset.model.replace(num_layers=4))
    train_steps, decode_steps, placements = 10, 32, ("device", "host", "cached")
  cache_fraction, depth = 0.1, 1
  b, t = preset.train_batch
  log.put("shape", {"train_batch": [b, t], "decode_batch": preset.decode_batch,
                    "train_steps": train_steps, "decode_steps": decode_steps, "warmup": preset.warmup,
                    "cache_fraction": cache_fraction, "zipf": 1.05, "backend": jax.default_backend()})
  s = offload.setup(preset.model, preset, 1.05)
  as_dict = lambda r, per_step: {"tokens_per_s": r.rate * per_step, "ms_per_step": 1e3 / r.rate,
                                 "h2d_bytes": r.h2d, "d2h_bytes": r.d2h, "gather_ms": r.gather_ms,
                                 "wait_ms": r.wait_ms, "hit_rate": r.hit_rate}
  steps = offload.decode_inputs(s, preset, decode_steps)
  batches = offload.train_batches(s, preset, train_steps)
  reuse: list = []

  def decode(p):
    spec = offload.placement_spec(p, cache_fraction)
    return as_dict(offload.decode(s.model, spec, steps, preset.warmup, s.freqs, depth), preset.decode_batch)

  def train(p):
    spec = offload.placement_spec(p, cache_fraction)
    r = (offload.train_device(s.model, batches, preset.warmup, s.rate) if spec is None else
         offload.train_host(s.model, spec, batches, preset.warmup, s.rate, s.freqs, depth, reuse))
    return as_dict(r, b * t)

  # The goals' pairs first (device and host: decode, the 1% goal, then training, 3%), the hot-row
  # cache last. HOOK: experiments/bench/serve.py (host-table decode serving, another branch) is
  # not on this branch; when it lands, time its decode loop here next to offload.decode and
  # record it as decode/<name>.
  order = [("decode", "device"), ("decode", "host"), ("train", "device"), ("train", "host")]
  order += [(part, p) for p in placements if p not in ("device", "host") for part in ("train", "decode")]
  for part, p in order:
    fn = decode if part == "decode" else train
    log.case(part, p, lambda fn=fn, p=p: fn(p), 5 if smoke else 20)


# ----------------------------------------------------------------------------- train step
def small_model_config():
  """The small config's model (experiments/configs/small.py, variant engram, after its
  allocation against the MoE twin), written out because that file needs ml_collections;
  tests/test_gpu_check.py checks that the two agree."""
  from engram_jax.models.config import ModelConfig
  return ModelConfig.from_dict({
      "vocab_size": 16384, "hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
      "head_dim": 64, "ffn_hidden": 2048, "num_dense_layers": 1,
      "moe": {"num_experts": 39, "num_shared_experts": 2, "top_k": 6, "expert_hidden": 256,
              "routed_scaling": 1.0, "dispatch": "dropless", "capacity_factor": 1.25,
              "bias_update_rate": 0.001, "balance_loss_weight": 0.0},
      "hc_mult": 4, "sinkhorn_iters": 20, "rope_theta": 10000.0,
      "engram": {"vocab_sizes": [21630, 21630], "max_ngram_size": 3, "n_embed_per_ngram": 256,
                 "n_head_per_ngram": 8, "layer_ids": [1, 5], "pad_id": 0, "seed": 0,
                 "kernel_size": 4, "allow_layer_zero": False},
      "engram_compressed_vocab": None, "engram_gate": "reference", "engram_impl": "xla",
      "engram_short_conv": True, "engram_multi_branch": True, "engram_fold_rows": None,
      "engram_row_multiple": 1024, "engram_sharded_lookup": "all_to_all",
      "engram_table_sharding": "tensor", "engram_mode": "engram", "tie_embeddings": False,
      "norm_eps": 1e-06, "dtype": "bfloat16", "param_dtype": "float32"})


# experiments/configs/small.py trains at 32 x 1024, but XLA's memory analysis of that step for
# an H200 (deviceless compile, `--compile_sm90` style) asks for 100 GiB of temporaries
# (28 GiB at 8 x 1024, linear in the batch): half the batch fits with room to spare.
SMALL_BATCH = (16, 1024)


def measure_train_step(cfg, batch: int, seq: int, steps: int, warmup: int) -> dict:
  """Jitted train step (engram_jax.train.steps) on synthetic tokens and uniform row ids."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from engram_jax.models.accounting import count_params, flops_per_token
  from engram_jax.train.config import TrainConfig
  from engram_jax.train.optimizer import make_optimizer
  from engram_jax.train.state import TrainState, build_model, split_model
  from engram_jax.train.steps import make_train_step
  model = build_model(cfg, 0)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):  # alternate two batches: the step cannot be cached away
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    rows = {l: np.stack([rng.integers(0, s, (batch, seq)) for s in model.blocks[l].engram.table_sizes],
                        -1).astype(np.int32) for l in cfg.engram_layer_ids}
    batches.append(jax.device_put({"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                                   "loss_mask": np.ones((batch, seq), np.float32), "engram_rows": rows}))
  graphdef, params, rest = split_model(model)
  tcfg = TrainConfig(total_steps=1000, learning_rate=1e-3, warmup_steps=0, progress_bar=False)
  tx, lr = make_optimizer(tcfg, params)
  rate = cfg.moe.bias_update_rate if cfg.moe else 0.0
  step = jax.jit(make_train_step(graphdef, tx, lr, bias_update_rate=rate), donate_argnums=(0,))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
  times, compile_s = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batches[i % 2])
    loss = float(metrics["loss"])
    dt = time.perf_counter() - t0
    if i == 0:
      compile_s = dt
    if i >= warmup:
      times.append(dt)
  st = _stats(times)
  tokens = batch * seq
  fpt = flops_per_token(cfg, seq)
  tps = tokens / (st["median_ms"] * 1e-3)
  return {"batch": [batch, seq], "tokens_per_step": tokens, "step": st, "first_step_s": compile_s,
          "tokens_per_s": tps, "tokens_per_s_se": tps * st["se_ms"] / st["mean_ms"],
          "loss": loss, "model_flops_per_token": 3 * fpt,   # forward + backward = 3 x forward
          "model_tflops": 3 * fpt * tps / 1e12, "params": dataclasses.asdict(count_params(cfg))}


def step_train(log: StepLog, smoke: bool) -> None:
  import jax

  from engram_jax.models.config import ModelConfig
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in kind), None)
  if smoke:
    cfg, (b, t), steps, warm = ModelConfig.tiny("engram_moe"), (2, 32), 2, 1
  else:
    cfg, (b, t), steps, warm = small_model_config(), SMALL_BATCH, 10, 2
  log.put("nominal_bf16_tflops", peak)
  # On CPU the Pallas Engram runs in interpret mode (about 15x slower): smoke times xla only.
  for impl in ("xla",) if smoke else ("xla", "pallas"):
    def run(impl=impl):
      r = measure_train_step(cfg.replace(engram_impl=impl), b, t, steps, warm)
      r["mfu_nominal"] = r["model_tflops"] / peak if peak else None
      return r
    # pallas only when the xla run left time for a second compile
    log.case("runs", f"{'tiny' if smoke else 'small'} engram_impl={impl}", run, 10 if smoke else 60)


STEP_FNS = {"env": step_env, "correctness": step_correctness, "lookup": step_lookup,
            "offload": step_offload, "train": step_train}


def run_step(name: str, out: Path, smoke: bool, deadline: float) -> int:
  log = StepLog(out, name, deadline)
  try:
    STEP_FNS[name](log, smoke)
    failed = [c["name"] for k, v in log.data.items() if isinstance(v, list) for c in v
              if isinstance(c, dict) and c.get("status") not in ("ok", "skipped")]
    log.data["status"] = "failed" if failed else "ok"
    if failed:
      log.data["error"] = f"{len(failed)} case(s) failed or mismatched: {failed}"
  except Exception as e:  # noqa: BLE001 - recorded; the parent runs the next step
    log.data.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                    traceback=traceback.format_exc()[-4000:])
    traceback.print_exc()
  log.flush()
  return 0


# ---------------------------------------------------------------------------------- parent
def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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
    self.rec = {"mode": "smoke" if smoke else "gpu", "started": _now(), "finished": None,
                "argv": sys.argv[1:], "total_budget_s": self.total_s,
                "steps": [{"name": s, "status": "pending", "budget_s": self.budgets[s]} for s in steps]}

  def write(self) -> None:
    self.rec["elapsed_s"] = round(time.time() - self.start, 1)
    self.rec["goals"] = evaluate_goals(self.rec)
    write_json(self.out / RECORD, self.rec)
    (self.out / MARKDOWN).write_text(render_markdown(self.rec))

  def _child(self, st: dict, budget: float) -> None:
    name = st["name"]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"   # the step's log is complete up to the moment it is killed
    if self.smoke:
      env.setdefault("JAX_PLATFORMS", "cpu")
    else:  # a rerun on the same machine reuses the compiled kernels
      env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/engram_gpu_check_jax_cache")
    # Soft deadline for the step's own cases, a little before the hard kill.
    deadline = time.time() + budget - min(5.0, 0.1 * budget)
    cmd = [sys.executable, "-m", "experiments.gpu_check", f"--out={self.out}", f"--_step={name}",
           f"--_deadline={deadline}"] + (["--smoke"] if self.smoke else [])
    log_path = self.out / "steps" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as logf:
      self.proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
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
        os.killpg(self.proc.pid, signal.SIGKILL)   # the step's own process group only
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


# ------------------------------------------------------------------------------- summary
@dataclasses.dataclass(frozen=True)
class Goal:
  key: str
  text: str
  target: str


GOALS = (
    Goal("correctness", "GPU kernels and the Engram layer agree with the jnp reference",
         "every check passes"),
    Goal("gather_bw", "gather_rows bandwidth, rows >= 256 B", ">= 85% of copy bandwidth"),
    Goal("fused_fwd", "fused gather_gate vs XLA, forward (paper shapes)", ">= 1.3x"),
    Goal("fused_fwd_bwd", "fused gather_gate vs XLA, forward+backward", ">= 1.3x"),
    Goal("host_decode", "host-resident tables vs device tables, decode", ">= 0.99x device"),
    Goal("host_train", "host-resident tables vs device tables, training", ">= 0.97x device"),
    Goal("small_train", "small config train step: tokens/s and MFU", "recorded"),
)


def _step(rec: dict, name: str) -> dict:
  return next((s for s in rec["steps"] if s["name"] == name), {"status": "pending"})


def _cases(step: dict, key: str) -> list[dict]:
  return [c for c in (step.get("results") or {}).get(key, []) if isinstance(c, dict)]


def _unmeasured(step: dict, what: str) -> tuple[str, str]:
  """Status of a goal whose figure is missing: failed when its step failed or timed out."""
  st = step.get("status")
  if st in ("failed", "timed_out", "killed"):
    return "failed", f"{what}: step {st}" + (f" ({step['error'][:160]})" if step.get("error") else "")
  failed = [c for c in _cases(step, what) if c.get("status") == "failed"]
  if failed:
    return "failed", f"{failed[0]['name']}: {failed[0].get('error', '')[:160]}"
  return "not measured", f"step {st or 'pending'}"


def evaluate_goals(rec: dict) -> list[dict]:
  """Goal rows from whatever the record holds. Without a GPU (smoke) a goal that would be met
  or missed reads "not measured (CPU)"; failures read "failed" everywhere."""
  on_gpu = rec.get("mode") == "gpu" and _backend_of(rec) == "gpu"
  rows = []

  def row(goal: Goal, status: str, figure: str):
    if not on_gpu and status in ("met", "missed"):
      status = "not measured (CPU)"
    rows.append({"goal": goal.key, "text": goal.text, "target": goal.target, "status": status,
                 "figure": figure})

  g = {x.key: x for x in GOALS}
  # correctness
  corr = _step(rec, "correctness")
  checks = _cases(corr, "checks")
  bad = [c for c in checks if c.get("status") not in ("ok", "skipped")]
  ran = [c for c in checks if c.get("status") != "skipped"]
  if bad:
    worst = bad[0]
    row(g["correctness"], "failed", f"{len(bad)}/{len(ran)} checks fail, e.g. {worst['name']}: "
        + (worst.get("error") or json.dumps(worst.get("rel_err") or worst.get("grad_rel_err")))[:200])
  elif ran and corr.get("status") == "ok":
    row(g["correctness"], "met", f"{len(ran)}/{len(ran)} checks pass"
        + ("" if on_gpu else " (interpret mode)"))
  elif ran:
    row(g["correctness"], "failed" if corr.get("status") in ("timed_out", "killed", "failed")
        else "not measured", f"{len(ran)} checks pass, step {corr.get('status')}")
  else:
    row(g["correctness"], *_unmeasured(corr, "checks"))
  # gather bandwidth (rows of 256 B and more: the worst case counts)
  look = _step(rec, "lookup")
  big = [c for c in _cases(look, "gather") if c.get("status") == "ok" and c.get("row_bytes", 0) >= 256]
  small = [c for c in _cases(look, "gather") if c.get("status") == "ok" and c.get("row_bytes", 0) < 256]
  if big:
    worst = min(big, key=lambda c: c["ratio_to_copy"])
    fig = (f"worst {worst['ratio_to_copy']:.1%} ({worst['pallas_GBps']:.0f} GB/s, "
           f"{worst['row_bytes']} B rows, R={worst['case']['rows']:,}) over {len(big)} cases")
    if small:
      fig += "; 160 B rows: " + ", ".join(f"{c['ratio_to_copy']:.1%}" for c in small)
    row(g["gather_bw"], "met" if worst["ratio_to_copy"] >= 0.85 else "missed", fig)
  else:
    row(g["gather_bw"], *_unmeasured(look, "gather"))
  # fused vs XLA
  fused = [c for c in _cases(look, "fused") if c.get("status") == "ok"]
  for key, field, label in (("fused_fwd", "speedup_fwd", "fwd"), ("fused_fwd_bwd", "speedup_fwd_bwd",
                                                                  "fwd+bwd")):
    if fused:
      c = fused[0]
      fig = (f"{c[field]:.2f}x (xla {1e3 * c[f'xla_{label}_s']:.2f} ms, pallas "
             f"{1e3 * c[f'pallas_{label}_s']:.2f} ms, median; path {c.get('gpu_path') or 'n/a'})")
      row(g[key], "met" if c[field] >= 1.3 else "missed", fig)
    else:
      row(g[key], *_unmeasured(look, "fused"))
  # host vs device
  off = _step(rec, "offload")
  for key, part, target in (("host_decode", "decode", 0.99), ("host_train", "train", 0.97)):
    cases = {c["name"]: c for c in _cases(off, part) if c.get("status") == "ok"}
    if "device" in cases and "host" in cases:
      dev, host = cases["device"]["tokens_per_s"], cases["host"]["tokens_per_s"]
      fig = f"host {host / dev:.3f}x device ({host:,.0f} vs {dev:,.0f} tokens/s, median step)"
      if "cached" in cases:
        fig += f"; cached {cases['cached']['tokens_per_s'] / dev:.3f}x"
      row(g[key], "met" if host / dev >= target else "missed", fig)
    else:
      row(g[key], *_unmeasured(off, part))
  # small config throughput
  tr = _step(rec, "train")
  runs = [c for c in _cases(tr, "runs") if c.get("status") == "ok"]
  if runs:
    figs = []
    for c in runs:
      mfu = c.get("mfu_nominal")
      figs.append(f"{c['name']}: {c['tokens_per_s']:,.0f} +- {c['tokens_per_s_se']:,.0f} tokens/s, "
                  f"{c['model_tflops']:.1f} TFLOP/s" + (f", MFU {mfu:.1%}" if mfu else ""))
    row(g["small_train"], "met", "; ".join(figs))
  else:
    row(g["small_train"], *_unmeasured(tr, "runs"))
  return rows


def _backend_of(rec: dict):
  return ((_step(rec, "env").get("results") or {}).get("device") or {}).get("backend")


def _fmt(x) -> str:
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def render_markdown(rec: dict) -> str:
  env = _step(rec, "env").get("results") or {}
  dev, ver = env.get("device") or {}, env.get("versions") or {}
  meas = {c["name"]: c for c in env.get("measures", []) if c.get("status") == "ok"}
  lines = [f"# gpu_check ({rec.get('mode')}) started {rec.get('started')}, "
           f"finished {rec.get('finished') or '(not finished)'}", ""]
  if dev:
    mem = dev.get("memory_bytes")
    lines.append(f"Device: {dev.get('kind')} ({dev.get('backend')}, {dev.get('count')} device(s)"
                 + (f", {mem / 2**30:.1f} GiB" if mem else "") + f"); jax {ver.get('jax')}, "
                 f"jaxlib {ver.get('jaxlib')}" + "".join(f", {k} {v}" for k, v in ver.items()
                                                         if k.startswith("jax-cuda")))
  if "hbm_copy_bandwidth" in meas:
    lines.append(f"Copy bandwidth {meas['hbm_copy_bandwidth']['copy_GBps']:.1f} GB/s; ")
  if "bf16_matmul" in meas:
    m = meas["bf16_matmul"]
    lines.append(f"bf16 matmul {m['shape'][0]}^3: {m['tflops']:.1f} TFLOP/s "
                 f"({m['median_ms']:.3f} ms median, mean {m['mean_ms']:.3f} +- {m['se_ms']:.3f} ms).")
  lines += ["", "## Goals", "", "| goal | target | status | figure |", "| --- | --- | --- | --- |"]
  for r in rec.get("goals") or evaluate_goals(rec):
    lines.append(f"| {r['text']} | {r['target']} | **{r['status']}** | {r['figure']} |")
  lines += ["", "## Steps", "", "| step | status | budget s | wall s | note |", "| --- | --- | --- | --- | --- |"]
  for st in rec["steps"]:
    note = (st.get("error") or "").replace("\n", " ").replace("|", "/")[:200]
    lines.append(f"| {st['name']} | {st['status']} | {_fmt(st.get('budget_s'))} | "
                 f"{_fmt(st.get('wall_s', ''))} | {note} |")
  for st in rec["steps"]:
    res = st.get("results") or {}
    cases = [(k, c) for k, v in res.items() if isinstance(v, list) for c in v if isinstance(c, dict)]
    if not cases:
      continue
    lines += ["", f"### {st['name']}", ""]
    for k, c in cases:
      keep = {kk: vv for kk, vv in c.items() if kk not in ("name", "status", "traceback", "case", "params")}
      lines.append(f"- {k} / {c['name']}: **{c.get('status')}** "
                   + json.dumps(keep, default=_json_default)[:600])
  return "\n".join(lines) + "\n"


def readme_block(rec: dict) -> str:
  """The README's "GPU status" block for a record."""
  dev = (_step(rec, "env").get("results") or {}).get("device") or {}
  ver = (_step(rec, "env").get("results") or {}).get("versions") or {}
  on_gpu = rec.get("mode") == "gpu" and dev.get("backend") == "gpu"
  head = (f"Last check: {rec.get('started')}, {dev.get('kind', '?')}, jax {ver.get('jax', '?')}, "
          f"`{'make gpu-check' if on_gpu else 'gpu_check --smoke (CPU, interpret mode)'}`"
          f" ({rec.get('elapsed_s', '?')} s).")
  if not on_gpu:
    head += " No GPU goal has been measured on a GPU yet."
  lines = [README_BEGIN, head, "", "| goal | target | status | figure |", "| --- | --- | --- | --- |"]
  for r in rec.get("goals") or evaluate_goals(rec):
    lines.append(f"| {r['text']} | {r['target']} | {r['status']} | {r['figure']} |")
  lines.append(README_END)
  return "\n".join(lines)


def update_readme(readme: Path, rec: dict) -> None:
  text = readme.read_text()
  pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
  if len(pattern.findall(text)) != 1:
    raise ValueError(f"{readme}: expected one block between {README_BEGIN!r} and {README_END!r}, "
                     f"found {len(pattern.findall(text))}")
  readme.write_text(pattern.sub(lambda m: readme_block(rec), text))


# ----------------------------------------------------------------- deviceless sm_90 compile
# A GpuTargetConfigProto for an H200 (XLA's h100_sxm spec with the H200's memory and
# bandwidth): with it the CUDA PJRT plugin makes a compile-only topology, and jit(...).compile()
# runs the whole GPU pipeline without a GPU: Mosaic GPU kernels -> PTX -> ptxas -> sm_90a.
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150300000000 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H200"
"""
COMPILE_RECORD = "compile_sm90.json"
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[dict]:
  """ptxas -v output (MOSAIC_GPU_DUMP_PTXAS=1) -> one dict per entry function."""
  out: list[dict] = []
  for line in text.splitlines():
    if m := _PTXAS_ENTRY.search(line):
      out.append({"function": m.group(1), "arch": m.group(2)})
    elif out and (m := _PTXAS_SPILL.search(line)):
      out[-1].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                     spill_load_bytes=int(m.group(3)))
    elif out and (m := _PTXAS_USED.search(line)):
      out[-1].update(registers=int(m.group(1)), barriers=int(m.group(2) or 0),
                     static_smem_bytes=int(m.group(3) or 0))
  return out


class _CaptureFds:
  """Captures what C++ code writes to fds 1 and 2 (ptxas -v output) into a string."""

  def __enter__(self):
    import tempfile
    sys.stdout.flush()
    sys.stderr.flush()
    self.tmp = tempfile.TemporaryFile(mode="w+b")
    self.saved = [os.dup(1), os.dup(2)]
    os.dup2(self.tmp.fileno(), 1)
    os.dup2(self.tmp.fileno(), 2)
    return self

  def __exit__(self, *exc):
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(self.saved[0], 1)
    os.dup2(self.saved[1], 2)
    for fd in self.saved:
      os.close(fd)
    self.tmp.seek(0)
    self.text = self.tmp.read().decode(errors="replace")
    self.tmp.close()
    return False


def compile_sm90(out: Path, train_models: bool = False) -> dict:
  """Lowers and compiles both Mosaic GPU kernels (and the XLA around them) for an H200 without
  a GPU, at every correctness shape; records ptxas's registers, spills and smem per kernel.
  Needs the CUDA plugin (jax-cuda12-plugin + jax-cuda12-pjrt) and ptxas (nvidia-cuda-nvcc-cu12
  or a CUDA toolkit): `make gpu-compile` installs them into .gpu_compile/."""
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"   # read by the plugin when it runs ptxas
  import jax
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding

  import pallas_kernels as pk
  from pallas_kernels import gather_gate_gpu
  topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                      target_config=H200_TARGET_CONFIG)
  sharding = SingleDeviceSharding(topo.devices[0])
  rec: dict[str, Any] = {"started": _now(), "jax": jax.__version__, "target": topo.devices[0].device_kind,
                         "cases": []}

  def structs(case: KernelCase) -> dict:
    import jax.numpy as jnp
    dt = jnp.dtype(case.dtype)
    c, g, dim = case.heads * case.d, case.branches, case.dim
    shapes = {"table": (case.rows, case.d), "row_ids": (case.n, case.heads)}
    if dim:
      shapes.update(w_value=(c, dim), b_value=(dim,), w_key=(g, c, dim), b_key=(g, dim),
                    query_normed=(case.n, g, dim), key_norm_scale=(g, dim))
    return {k: jax.ShapeDtypeStruct(v, jnp.int32 if k == "row_ids" else dt, sharding=sharding)
            for k, v in shapes.items()}

  for case in GPU_GATHER + GPU_FUSED:
    x = structs(case)
    if case.dim:
      fn = lambda *a, case=case: pk.gather_gate(*a, gate=case.gate, impl="pallas", backend="gpu",
                                                interpret=False)  # on CPU: no interpret mode
      args = [x[k] for k in GATE_ARGS]
      plan = gather_gate_gpu.fused_plan(x["table"], x["row_ids"], x["w_value"], x["w_key"],
                                        x["query_normed"])
      path = "fallback" if isinstance(plan, str) else "fused"
    else:
      fn = lambda t, i: pk.gather_rows(t, i, impl="pallas", backend="gpu", interpret=False)
      args, path = [x["table"], x["row_ids"]], None
    entry: dict[str, Any] = {"name": case.name, "gpu_path": path, "expected_path": case.expect or None}
    start = time.perf_counter()
    try:
      with _CaptureFds() as cap:
        lowered = jax.jit(fn).trace(*args).lower()
        lowered.compile()
      kernels = parse_ptxas(cap.text)
      entry.update(status="ok", kernels=kernels)
      if not kernels:
        entry.update(status="failed", error="no ptxas output: the Mosaic kernel was not compiled")
      elif any(k.get("spill_store_bytes") or k.get("spill_load_bytes") for k in kernels):
        entry.update(status="spills")
      elif case.expect and path != case.expect:
        entry.update(status="failed", error=f"path {path}, expected {case.expect}")
    except Exception as e:  # noqa: BLE001 - a ptxas/Mosaic error is the finding; record it
      entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:3000])
    entry["seconds"] = round(time.perf_counter() - start, 2)
    ks = ", ".join(f"{k['function']} {k.get('arch')}: {k.get('registers')} regs, "
                   f"{k.get('spill_store_bytes')}/{k.get('spill_load_bytes')} B spills" for k in entry.get("kernels", []))
    print(f"[{entry['status']}] {case.name} ({path or 'gather'}): {ks or entry.get('error', '')[:300]}",
          flush=True)
    rec["cases"].append(entry)
    write_json(out / COMPILE_RECORD, rec)
  # Whole train steps: XLA's compile time and memory analysis for the H200 (what would not fit
  # shows here). The tiny model always; the small config and the offload model on request.
  from engram_jax.models.config import ModelConfig
  models = [("tiny engram_moe 2 x 32", ModelConfig.tiny("engram_moe"), 2, 32)]
  if train_models:
    from experiments.bench import offload
    p = offload._presets()["h200"]
    models += [("small 16 x 1024", small_model_config(), *SMALL_BATCH),
               ("small 32 x 1024 (configs/small.py)", small_model_config(), 32, 1024),
               ("offload h200 preset, 4 blocks", p.model.replace(num_layers=4), *p.train_batch)]
  for name, cfg, b, t in models:
    entry = {"name": f"train step {name}"}
    try:
      entry.update(status="ok", **compile_train_step(cfg, b, t, sharding))
    except Exception as e:  # noqa: BLE001 - recorded
      entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:3000])
    print(f"[{entry['status']}] {entry['name']}: " + (
        f"compile {entry['compile_s']:.0f} s, temp {entry['temp_bytes'] / 2**30:.1f} GiB, "
        f"arguments {entry['argument_bytes'] / 2**30:.1f} GiB" if entry["status"] == "ok"
        else entry["error"][:300]), flush=True)
    rec.setdefault("train_steps", []).append(entry)
    write_json(out / COMPILE_RECORD, rec)
  rec["finished"] = _now()
  write_json(out / COMPILE_RECORD, rec)
  return rec


def compile_train_step(cfg, batch: int, seq: int, sharding) -> dict:
  """Deviceless compile of the jitted train step (abstract model and optimizer state)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from engram_jax.train.config import TrainConfig
  from engram_jax.train.optimizer import make_optimizer
  from engram_jax.train.state import TrainState, build_model, split_model
  from engram_jax.train.steps import make_train_step
  model = nnx.eval_shape(lambda: build_model(cfg, 0))
  graphdef, params, rest = split_model(model)
  tx, lr = make_optimizer(TrainConfig(total_steps=1000, learning_rate=1e-3, warmup_steps=0,
                                      progress_bar=False), params)
  sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  state = jax.tree.map(sds, TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                       rest=rest, opt_state=jax.eval_shape(tx.init, params)))
  tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding)
  batch_sds = {"tokens": tok, "targets": tok,
               "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=sharding),
               "engram_rows": {l: jax.ShapeDtypeStruct((batch, seq, cfg.engram.num_heads), jnp.int32,
                                                       sharding=sharding) for l in cfg.engram_layer_ids}}
  rate = cfg.moe.bias_update_rate if cfg.moe else 0.0
  step = jax.jit(make_train_step(graphdef, tx, lr, bias_update_rate=rate), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.trace(state, batch_sds).lower()
  t1 = time.perf_counter()
  mem = lowered.compile().memory_analysis()
  return {"batch": [batch, seq], "lower_s": t1 - t0, "compile_s": time.perf_counter() - t1,
          "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
          "output_bytes": mem.output_size_in_bytes}


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="Record directory.")
  p.add_argument("--smoke", action="store_true", help="CPU: interpret mode, tiny shapes.")
  p.add_argument("--steps", default=",".join(STEPS), help=f"Comma list, a subset of {STEPS}.")
  p.add_argument("--budget_scale", type=float, default=1.0, help="Multiplies every time budget.")
  p.add_argument("--total_s", type=float, default=None, help="Total budget (default: 335 s GPU).")
  p.add_argument("--update_readme_from", type=Path, default=None,
                 help="Do not run: rewrite README's GPU status block from this record directory.")
  p.add_argument("--readme", type=Path, default=Path("README.md"))
  p.add_argument("--compile_sm90", action="store_true",
                 help="Do not run: compile the Mosaic GPU kernels for an H200 without a GPU "
                      "(needs the CUDA plugin and ptxas; see `make gpu-compile`).")
  p.add_argument("--compile_sm90_train", action="store_true",
                 help="With --compile_sm90: also the small config's and the offload model's train "
                      "steps (minutes each on a CPU).")
  p.add_argument("--_step", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  a.out = a.out.resolve()   # the steps run from the repository root
  if a._step:
    return run_step(a._step, a.out, a.smoke, a._deadline or time.time() + 600)
  if a.compile_sm90:
    rec = compile_sm90(a.out, a.compile_sm90_train)
    print(f"record: {a.out / COMPILE_RECORD}")
    return 0 if all(c["status"] == "ok" for c in rec["cases"] + rec["train_steps"]) else 1
  if a.update_readme_from is not None:
    rec = load_record(a.update_readme_from)
    update_readme(a.readme, rec)
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
