"""gpu_check's steps (each runs in its own subprocess): env, correctness, lookup, offload, train."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
import time
import traceback
from pathlib import Path

from experiments.gpu_check.common import NOMINAL_BF16_TFLOPS, StepLog, _stats


# ------------------------------------------------------------------------------- env step
def step_env(log: StepLog, smoke: bool) -> None:
  import jax
  import jax.numpy as jnp
  import jaxlib

  from experiments.bench import lookup
  from experiments.bench.timing import time_calls

  dev = jax.devices()[0]
  versions = {}
  for dist in (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "flax",
    "optax",
    "numpy",
  ):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  stats = dev.memory_stats() or {}
  log.put(
    "device",
    {
      "backend": jax.default_backend(),
      "kind": dev.device_kind,
      "count": jax.device_count(),
      "memory_bytes": stats.get("bytes_limit"),
      "platform_version": getattr(dev.client, "platform_version", None),
    },
  )
  log.put(
    "versions", {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__, **versions}
  )
  try:
    smi = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=10,
    )
    log.put("nvidia_smi", smi.stdout.strip() or smi.stderr.strip())
  except (OSError, subprocess.SubprocessError) as e:
    log.put("nvidia_smi", f"unavailable: {e}")

  small = smoke or jax.default_backend() != "gpu"  # no GPU: keep it quick, the rest is skipped
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
    st = _stats(time_calls(f, a, b, iters=3 if small else 20))
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
  dim: int = 0  # D (gather_gate only)
  branches: int = 1  # G
  gate: str = "reference"
  expect: str = ""  # gather_gate on the GPU backend: "fused" or "fallback"


# The paper: 16 heads x 80 bf16 (C = 1280), D = 2560, G = 4. Odd ones: N not a multiple of
# any block (1000, 333, 13), G = 1, f32 (tf32 wgmma), D not a multiple of 64 (fallback).
GPU_GATHER = (
  KernelCase("gather paper bf16 d80 H16 N16384", 262_147, 80, 16384, 16, "bfloat16"),
  KernelCase("gather odd N1000 bf16 d80 H16", 5003, 80, 1000, 16, "bfloat16"),
  KernelCase("gather f32 d128 (512 B rows) N333 H4", 4099, 128, 333, 4, "float32"),
  KernelCase("gather f32 d16 (64 B rows) N13 H3", 37, 16, 13, 3, "float32"),
)
GPU_FUSED = (
  KernelCase("gather_gate paper bf16 G4 N4096", 100_003, 80, 4096, 16, "bfloat16", 2560, 4, expect="fused"),
  KernelCase("gather_gate odd N1000 bf16 G1", 5003, 80, 1000, 16, "bfloat16", 2560, 1, expect="fused"),
  KernelCase(
    "gather_gate f32 (tf32) d16 H3 D128 G1 N130 paper gate", 37, 16, 130, 3, "float32", 128, 1, "paper", expect="fused"
  ),
  KernelCase("gather_gate fallback f32 paper C G4 N1000", 5003, 80, 1000, 16, "float32", 2560, 4, expect="fallback"),
  KernelCase("gather_gate fallback bf16 D96 G4 N77", 101, 80, 77, 4, "bfloat16", 96, 4, expect="fallback"),
)
SMOKE_GATHER = (
  KernelCase("gather f32 d16 N13 H3", 37, 16, 13, 3, "float32"),
  KernelCase("gather bf16 d64 N13 H3", 37, 64, 13, 3, "bfloat16"),
)
SMOKE_FUSED = (
  KernelCase("gather_gate fused f32 d16 H2 D64 G4 N6", 37, 16, 6, 2, "float32", 64, 4, expect="fused"),
  KernelCase("gather_gate fallback f32 d16 H2 D32 G1 N6", 37, 16, 6, 2, "float32", 32, 1, "paper", expect="fallback"),
)


def _kernel_inputs(case: KernelCase, seed: int = 0) -> dict:
  """NumPy-built inputs (no compile); ids include duplicates and both boundary rows."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)
  c = case.heads * case.d
  ids = rng.integers(0, case.rows, (case.n, case.heads), dtype=np.int32)
  ids[0, 0], ids[0, -1] = case.rows - 1, 0  # boundaries
  if case.n > 2:
    ids[1] = ids[0]  # duplicates across tokens
    ids[2, :] = case.rows // 2  # duplicates within a token
  dt = jnp.dtype(case.dtype)
  out = {"table": jnp.asarray(rng.standard_normal((case.rows, case.d), np.float32), dt), "row_ids": jnp.asarray(ids)}
  if case.dim:
    g, dim = case.branches, case.dim
    normal = lambda *s: rng.standard_normal(s, np.float32)
    out.update(
      w_value=normal(c, dim) / np.sqrt(c),
      b_value=0.1 * normal(dim),
      w_key=normal(g, c, dim) / np.sqrt(c),
      b_key=0.1 * normal(g, dim),
      query_normed=normal(case.n, g, dim),
      key_norm_scale=1 + 0.1 * normal(g, dim),
    )
    out.update({k: jnp.asarray(v, dt) for k, v in out.items() if k not in ("table", "row_ids")})
  return out


GATE_ARGS = ("table", "row_ids", "w_value", "b_value", "w_key", "b_key", "query_normed", "key_norm_scale")


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
  return 5e-3 if on_gpu else 1e-4  # f32 on the GPU: the fused kernel runs tf32 wgmma


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
  return {
    "status": "ok" if ok else "mismatch",
    "forward_exact": exact,
    "grad_rel_err": errs,
    "tol": tol,
    "case": dataclasses.asdict(case),
  }


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
  errs = {"u": _rel_err(u, u_r), "gates": _rel_err(g, g_r), **{f"d_{k}": _rel_err(grads[k], grads_r[k]) for k in diff}}
  ok = all(e <= tol for e in errs.values())
  path_ok = case.expect in ("", path) or backend != "gpu"
  return {
    "status": "ok" if ok and path_ok else "mismatch",
    "gpu_path": path,
    "expected_path": case.expect,
    "rel_err": errs,
    "tol": tol,
    "case": dataclasses.asdict(case),
  }


def check_engram_layer(dtype: str, on_gpu: bool, smoke: bool) -> dict:
  """The Engram layer, impl="pallas" vs impl="xla": outputs, gates and parameter gradients."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from engram_jax import Engram, EngramConfig

  if smoke:
    cfg = EngramConfig(vocab_sizes=(13, 17), n_embed_per_ngram=32, n_head_per_ngram=2, layer_ids=(1,), pad_id=0)
    hidden, hc, b, t = 64, 2, 1, 5
  else:  # the paper's layer: 2 orders x 8 heads x 80 = d_mem 1280, D = 2560, 4 branches
    cfg = EngramConfig(
      vocab_sizes=(100_000, 100_000), n_embed_per_ngram=640, n_head_per_ngram=8, layer_ids=(1,), pad_id=0
    )
    hidden, hc, b, t = 2560, 4, 2, 512
  heads = cfg.num_heads
  base = 11 if smoke else 100_003
  sizes = [base + 2 * h for h in range(heads)]
  dt = jnp.dtype(dtype)
  module = Engram(cfg, 1, hidden, hc, table_sizes=sizes, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
  module.conv_kernel[...] = 0.3 * jax.random.normal(jax.random.key(1), module.conv_kernel.shape, dt)
  rng = np.random.default_rng(0)
  ids = np.stack([rng.integers(0, s, (b, t)) for s in sizes], -1).astype(np.int32)
  ids[0, 0, :] = [s - 1 for s in sizes]  # boundary rows of every head
  ids[0, 1] = ids[0, 0]  # duplicates
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
  errs = {"y": _rel_err(out["pallas"][0], out["xla"][0]), "gates": _rel_err(out["pallas"][1], out["xla"][1])}
  for name in ("table", "value_kernel", "key_kernel"):
    errs[f"d_{name}"] = _rel_err(out["pallas"][2][name][...], out["xla"][2][name][...])
  ok = all(e <= tol for e in errs.values())
  return {
    "status": "ok" if ok else "mismatch",
    "rel_err": errs,
    "tol": tol,
    "shape": {"B": b, "T": t, "hc": hc, "D": hidden, "heads": heads, "d": cfg.head_dim},
  }


def step_correctness(log: StepLog, smoke: bool) -> None:
  import jax

  on_gpu = jax.default_backend() == "gpu"
  # The GPU kernels on the GPU (interpret mode on CPU: the logic, not the hardware).
  backend = "gpu"
  for case in SMOKE_GATHER if smoke else GPU_GATHER:
    log.case("checks", case.name, lambda case=case: check_gather(case, backend, on_gpu), 3)
  for case in SMOKE_FUSED if smoke else GPU_FUSED:
    log.case("checks", case.name, lambda case=case: check_gather_gate(case, backend, on_gpu), 5 if smoke else 8)
  for dtype in ("float32",) if smoke else ("bfloat16", "float32"):
    log.case(
      "checks",
      f"engram layer pallas vs xla {dtype}",
      lambda dtype=dtype: check_engram_layer(dtype, on_gpu, smoke),
      8 if smoke else 15,
    )


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
    gather = tuple(
      sorted(p.gather, key=lambda c: (c.rows >= 100_000_000, c.d * (2 if c.dtype == "bfloat16" else 4) < 256))
    )
    fused, copy_bytes, iters = p.fused, p.copy_bytes, 10
  bw = lookup.copy_bandwidth(copy_bytes, iters=max(iters, 5))
  log.put("copy_GBps", bw / 1e9)
  log.put("iters", iters)
  backend = "gpu"

  def one_gather(case):
    r = lookup.bench_gather(case, bw, iters, None, backend)
    return {
      **r,
      "case": dataclasses.asdict(case),
      "pallas_GBps": r["bytes"] / r["pallas_s"] / 1e9,
      "xla_GBps": r["bytes"] / r["xla_s"] / 1e9,
      "ratio_to_copy": r["bytes"] / r["pallas_s"] / bw,
      "speedup_vs_xla": r["xla_s"] / r["pallas_s"],
    }

  def one_fused(case):
    r = lookup.bench_fused(case, bw, iters, None, backend)
    return {
      **r,
      "case": dataclasses.asdict(case),
      "speedup_fwd": r["xla_fwd_s"] / r["pallas_fwd_s"],
      "speedup_fwd_bwd": r["xla_fwd+bwd_s"] / r["pallas_fwd+bwd_s"],
    }

  # Fused first after the first goal case: it is the goal most at risk of the budget.
  ordered = [("gather", gather[0])] + [("fused", c) for c in fused] + [("gather", c) for c in gather[1:]]
  for kind, case in ordered:
    fn = one_gather if kind == "gather" else one_fused
    label = f"{kind} R={case.rows:,} d={case.d} {case.dtype} N={case.tokens} H={case.heads}" + (
      f" D={case.dim} G={case.branches}" if kind == "fused" else ""
    )
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
  log.put(
    "shape",
    {
      "train_batch": [b, t],
      "decode_batch": preset.decode_batch,
      "train_steps": train_steps,
      "decode_steps": decode_steps,
      "warmup": preset.warmup,
      "cache_fraction": cache_fraction,
      "zipf": 1.05,
      "backend": jax.default_backend(),
    },
  )
  s = offload.setup(preset.model, preset, 1.05)
  as_dict = lambda r, per_step: {
    "tokens_per_s": r.rate * per_step,
    "ms_per_step": 1e3 / r.rate,
    "h2d_bytes": r.h2d,
    "d2h_bytes": r.d2h,
    "gather_ms": r.gather_ms,
    "wait_ms": r.wait_ms,
    "hit_rate": r.hit_rate,
  }
  steps = offload.decode_inputs(s, preset, decode_steps)
  batches = offload.train_batches(s, preset, train_steps)
  reuse: list = []

  def decode(p):
    spec = offload.placement_spec(p, cache_fraction)
    return as_dict(offload.decode(s.model, spec, steps, preset.warmup, s.freqs, depth), preset.decode_batch)

  def train(p):
    spec = offload.placement_spec(p, cache_fraction)
    r = (
      offload.train_device(s.model, batches, preset.warmup, s.rate)
      if spec is None
      else offload.train_host(s.model, spec, batches, preset.warmup, s.rate, s.freqs, depth, reuse)
    )
    return as_dict(r, b * t)

  # The decode goal first: the serving benchmark's compiled decode loop (host rows read inside
  # the program), paired host/device ratios over alternated repeats. Then the training pair
  # (the 3% goal), then the prefetcher-driven decode pair of bench/offload and the hot-row cache.
  log.case("serve", "dense", lambda: _serve_case(smoke), 5 if smoke else 30)
  order = [("train", "device"), ("train", "host"), ("decode", "device"), ("decode", "host")]
  order += [(part, p) for p in placements if p not in ("device", "host") for part in ("train", "decode")]
  for part, p in order:
    fn = decode if part == "decode" else train
    log.case(part, p, lambda fn=fn, p=p: fn(p), 5 if smoke else 20)


def _serve_case(smoke: bool) -> dict:
  """experiments.bench.serve on the dense backbone: device vs host vs cached tables, greedy decode.

  GPU: the h200 preset's shapes cut to fit the step's budget (64 sequences of U(100, 512)
  tokens, 64 new tokens, 2 repeats, ~2B table parameters in pinned host memory)."""
  import dataclasses as dc

  import jax

  from experiments.bench import serve

  p = serve.PRESETS["tiny"]
  if smoke:
    p = dc.replace(p, num_sequences=4, new_tokens=8, repeats=2)
  else:
    p = dc.replace(
      serve.PRESETS["h200"],
      num_sequences=64,
      prompt_max=512,
      new_tokens=64,
      repeats=2,
      engram=dc.replace(serve.PRESETS["h200"].engram, vocab_sizes=(1_000_000, 1_000_000)),
    )
  platform = "gpu" if jax.default_backend() == "gpu" else "cpu"
  summary = serve.serve_one(p, "dense", platform)
  return {
    "ratios": {name: {"mean": rm, "se": rse, "best": best} for name, (rm, rse, best) in summary.items()},
    "num_sequences": p.num_sequences,
    "new_tokens": p.new_tokens,
    "repeats": p.repeats,
  }


# ----------------------------------------------------------------------------- train step
def small_model_config():
  """The small config's model (experiments/configs/small.py, variant engram, after its
  allocation against the MoE twin), written out because that file needs ml_collections;
  tests/test_gpu_check.py checks that the two agree."""
  from engram_jax.config import EngramConfig
  from engram_jax.layers.moe import MoEConfig
  from engram_jax.models.config import ModelConfig
  from experiments.bench.shared import backbone

  moe = MoEConfig(num_experts=39, num_shared_experts=2, top_k=6, expert_hidden=256)
  engram = EngramConfig(vocab_sizes=(21630,) * 2, n_embed_per_ngram=256, n_head_per_ngram=8, layer_ids=(1, 5), pad_id=0)
  model = backbone(16384, 512, 8, 8, 4, 64, 2048)
  return ModelConfig.engram_moe(moe, engram, **model, hc_mult=4, engram_row_multiple=1024, dtype="bfloat16")


# experiments/configs/small.py trains at 32 x 1024, but XLA's memory analysis of that step for
# an H200 (deviceless compile, `--compile_sm90` style) asks for 100 GiB of temporaries
# (58 GiB at 16 x 1024, 28 GiB at 8 x 1024): half the batch fits with room to spare.
SMALL_BATCH = (16, 1024)


def measure_train_step(cfg, batch: int, seq: int, steps: int, warmup: int) -> dict:
  """Jitted train step (engram_jax.train.steps) on synthetic tokens and uniform row ids."""
  import jax
  import numpy as np

  from engram_jax.models.accounting import count_params, flops_per_token
  from engram_jax.train.state import build_model
  from experiments.bench.shared import device_train_step, lm_batch

  model = build_model(cfg, 0)
  rng = np.random.default_rng(0)
  rows = lambda rng: {
    l: np.stack([rng.integers(0, s, (batch, seq)) for s in model.blocks[l].engram.table_sizes], -1).astype(np.int32)
    for l in cfg.engram_layer_ids
  }
  # alternate two batches: the step cannot be cached away
  batches = [jax.device_put(lm_batch(rng, cfg.vocab_size, batch, seq, rows)) for _ in range(2)]
  step, state = device_train_step(model, bias_update_rate=cfg.moe.bias_update_rate if cfg.moe else 0.0)
  times, compile_s = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics, _ = step(state, batches[i % 2])
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
  return {
    "batch": [batch, seq],
    "tokens_per_step": tokens,
    "step": st,
    "first_step_s": compile_s,
    "tokens_per_s": tps,
    "tokens_per_s_se": tps * st["se_ms"] / st["mean_ms"],
    "loss": loss,
    "model_flops_per_token": 3 * fpt,  # forward + backward = 3 x forward
    "model_tflops": 3 * fpt * tps / 1e12,
    "params": dataclasses.asdict(count_params(cfg)),
  }


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


STEP_FNS = {
  "env": step_env,
  "correctness": step_correctness,
  "lookup": step_lookup,
  "offload": step_offload,
  "train": step_train,
}


def run_step(name: str, out: Path, smoke: bool, deadline: float) -> int:
  log = StepLog(out, name, deadline)
  try:
    STEP_FNS[name](log, smoke)
    failed = [
      c["name"]
      for k, v in log.data.items()
      if isinstance(v, list)
      for c in v
      if isinstance(c, dict) and c.get("status") not in ("ok", "skipped")
    ]
    log.data["status"] = "failed" if failed else "ok"
    if failed:
      log.data["error"] = f"{len(failed)} case(s) failed or mismatched: {failed}"
  except Exception as e:  # noqa: BLE001 - recorded; the parent runs the next step
    log.data.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
    traceback.print_exc()
  log.flush()
  return 0
