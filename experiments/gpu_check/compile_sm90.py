"""Deviceless compile for an H200 (sm_90a): Mosaic GPU kernels through ptxas, whole train steps."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from experiments.gpu_check.common import _now, write_json
from experiments.gpu_check.steps import GATE_ARGS, GPU_FUSED, GPU_GATHER, SMALL_BATCH, KernelCase, small_model_config

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
      out[-1].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
    elif out and (m := _PTXAS_USED.search(line)):
      out[-1].update(registers=int(m.group(1)), barriers=int(m.group(2) or 0), static_smem_bytes=int(m.group(3) or 0))
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
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"  # read by the plugin when it runs ptxas
  import jax
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding

  import pallas_kernels as pk
  from pallas_kernels import gather_gate_gpu

  topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=H200_TARGET_CONFIG)
  sharding = SingleDeviceSharding(topo.devices[0])
  rec: dict[str, Any] = {"started": _now(), "jax": jax.__version__, "target": topo.devices[0].device_kind, "cases": []}

  def structs(case: KernelCase) -> dict:
    import jax.numpy as jnp

    dt = jnp.dtype(case.dtype)
    c, g, dim = case.heads * case.d, case.branches, case.dim
    shapes = {"table": (case.rows, case.d), "row_ids": (case.n, case.heads)}
    if dim:
      shapes.update(
        w_value=(c, dim),
        b_value=(dim,),
        w_key=(g, c, dim),
        b_key=(g, dim),
        query_normed=(case.n, g, dim),
        key_norm_scale=(g, dim),
      )
    return {
      k: jax.ShapeDtypeStruct(v, jnp.int32 if k == "row_ids" else dt, sharding=sharding) for k, v in shapes.items()
    }

  for case in GPU_GATHER + GPU_FUSED:
    x = structs(case)
    if case.dim:
      fn = lambda *a, case=case: pk.gather_gate(
        *a, gate=case.gate, impl="pallas", backend="gpu", interpret=False
      )  # on CPU: no interpret mode
      args = [x[k] for k in GATE_ARGS]
      plan = gather_gate_gpu.fused_plan(x["table"], x["row_ids"], x["w_value"], x["w_key"], x["query_normed"])
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
    ks = ", ".join(
      f"{k['function']} {k.get('arch')}: {k.get('registers')} regs, "
      f"{k.get('spill_store_bytes')}/{k.get('spill_load_bytes')} B spills"
      for k in entry.get("kernels", [])
    )
    print(f"[{entry['status']}] {case.name} ({path or 'gather'}): {ks or entry.get('error', '')[:300]}", flush=True)
    rec["cases"].append(entry)
    write_json(out / COMPILE_RECORD, rec)
  # Whole train steps: XLA's compile time and memory analysis for the H200 (what would not fit
  # shows here). The tiny model always; the small config and the offload model on request.
  from engram_jax.models.config import ModelConfig

  models = [("tiny engram_moe 2 x 32", ModelConfig.tiny("engram_moe"), 2, 32)]
  if train_models:
    from experiments.bench import offload

    p = offload._presets()["h200"]
    models += [
      ("small 16 x 1024", small_model_config(), *SMALL_BATCH),
      ("small 32 x 1024 (configs/small.py)", small_model_config(), 32, 1024),
      ("offload h200 preset, 4 blocks", p.model.replace(num_layers=4), *p.train_batch),
    ]
  for name, cfg, b, t in models:
    entry = {"name": f"train step {name}"}
    try:
      entry.update(status="ok", **compile_train_step(cfg, b, t, sharding))
    except Exception as e:  # noqa: BLE001 - recorded
      entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:3000])
    print(
      f"[{entry['status']}] {entry['name']}: "
      + (
        f"compile {entry['compile_s']:.0f} s, temp {entry['temp_bytes'] / 2**30:.1f} GiB, "
        f"arguments {entry['argument_bytes'] / 2**30:.1f} GiB"
        if entry["status"] == "ok"
        else entry["error"][:300]
      ),
      flush=True,
    )
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

  from engram_jax.train.optimizer import make_optimizer
  from engram_jax.train.state import TrainState, build_model, split_model
  from engram_jax.train.steps import make_train_step
  from experiments.bench.shared import TRAIN

  model = nnx.eval_shape(lambda: build_model(cfg, 0))
  graphdef, params, rest = split_model(model)
  tx, lr = make_optimizer(TRAIN, params)
  sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  state = jax.tree.map(
    sds,
    TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params, rest=rest, opt_state=jax.eval_shape(tx.init, params)
    ),
  )
  tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding)
  batch_sds = {
    "tokens": tok,
    "targets": tok,
    "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=sharding),
    "engram_ids": {
      l: jax.ShapeDtypeStruct((batch, seq, cfg.engram.num_heads), jnp.int32, sharding=sharding)
      for l in cfg.engram_layer_ids
    },
  }
  rate = cfg.moe.bias_update_rate if cfg.moe else 0.0
  step = jax.jit(make_train_step(graphdef, tx, lr, bias_update_rate=rate), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.trace(state, batch_sds).lower()
  t1 = time.perf_counter()
  mem = lowered.compile().memory_analysis()
  return {
    "batch": [batch, seq],
    "lower_s": t1 - t0,
    "compile_s": time.perf_counter() - t1,
    "temp_bytes": mem.temp_size_in_bytes,
    "argument_bytes": mem.argument_size_in_bytes,
    "output_bytes": mem.output_size_in_bytes,
  }
