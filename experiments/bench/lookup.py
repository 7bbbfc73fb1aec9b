r"""Benchmark of the Engram lookup ops: XLA path vs Pallas kernels.

Prints, per case: time of each impl, bytes moved, achieved GB/s, the ratio to
the device's copy bandwidth (measured in the same run), and the speedup of the
kernel over the XLA composition (forward, and forward+backward for the fused op).

  # real check (one H200, < 5 min):
  python -m experiments.bench.lookup --preset=h200
  # CPU smoke run (kernels in interpret mode: the timings say nothing about speed):
  JAX_PLATFORMS=cpu python -m experiments.bench.lookup --preset=cpu_tiny

Goals on an H200: gather >= 85% of copy bandwidth for rows >= 256 bytes;
fused op >= 1.3x faster than the XLA composition, forward and backward.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import pallas_kernels as pk
from experiments.bench.shared import GatherCase
from experiments.bench.timing import time_fn
from pallas_kernels import reference

_PRESET = flags.DEFINE_enum("preset", "cpu_tiny", ["cpu_tiny", "small", "h200"], "Shape set to run.")
_ITERS = flags.DEFINE_integer("iters", 0, "Timed iterations (0: preset default).")
_BACKEND = flags.DEFINE_enum("backend", None, ["gpu", "tpu"], "Kernel to run (default: from the device; tpu on CPU).")
_BLOCK_ROWS = flags.DEFINE_integer("block_rows", 0, "Tokens per kernel block (0: the kernel's default).")
_BLOCK_D = flags.DEFINE_integer("block_d", 0, "D tile of the fused kernel (0: the kernel's default).")
_SKIP_FUSED = flags.DEFINE_bool("skip_fused", False, "Only benchmark the gather.")


@dataclasses.dataclass(frozen=True)
class FusedCase(GatherCase):
  dim: int  # D
  branches: int  # G


@dataclasses.dataclass(frozen=True)
class Preset:
  copy_bytes: int
  gather: tuple[GatherCase, ...]
  fused: tuple[FusedCase, ...]
  iters: int


PRESETS = {
  "cpu_tiny": Preset(
    copy_bytes=64 << 20,
    gather=(GatherCase(4096, 32, "float32", 64, 4), GatherCase(4096, 128, "bfloat16", 64, 4)),
    fused=(FusedCase(4096, 32, "float32", 32, 4, 128, 4),),
    iters=2,
  ),
  "small": Preset(
    copy_bytes=1 << 30,
    gather=(GatherCase(1 << 20, 80, "bfloat16", 4096, 16), GatherCase(1 << 20, 128, "bfloat16", 4096, 16)),
    fused=(FusedCase(1 << 20, 80, "bfloat16", 4096, 16, 2560, 4),),
    iters=10,
  ),
  # The paper's shapes: d_mem 1280 = 16 heads x 80, D = 2560, G = 4, 16k tokens.
  "h200": Preset(
    copy_bytes=4 << 30,
    gather=(
      GatherCase(1_000_000, 80, "bfloat16", 16384, 16),  # 160-byte rows
      GatherCase(10_000_000, 80, "bfloat16", 16384, 16),
      GatherCase(100_000_000, 80, "bfloat16", 16384, 16),  # 16 GB table
      GatherCase(10_000_000, 128, "bfloat16", 16384, 16),  # 256-byte rows
      GatherCase(10_000_000, 128, "float32", 16384, 16),  # 512-byte rows
      GatherCase(1_000_000, 512, "float32", 16384, 16),
    ),  # 2 KiB rows
    fused=(FusedCase(10_000_000, 80, "bfloat16", 16384, 16, 2560, 4),),
    iters=20,
  ),
}


def copy_bandwidth(nbytes: int, iters: int) -> float:
  """Device copy bandwidth in bytes/s: read + write of an nbytes buffer."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  t = time_fn(jax.jit(lambda a: a + 1.0), x, iters=max(iters, 3))
  return 2 * x.nbytes / t


def make_ids(key, tokens, heads, rows):
  return jax.random.randint(key, (tokens, heads), 0, rows, jnp.int32)


def fmt_row(name, seconds, nbytes, copy_bw):
  bw = nbytes / seconds
  return (
    f"  {name:<22} {seconds * 1e3:10.3f} ms  {nbytes / 1e6:10.2f} MB  {bw / 1e9:8.2f} GB/s  {bw / copy_bw:6.1%} of copy"
  )


def bench_gather(case: GatherCase, copy_bw: float, iters: int, block_rows: int, backend) -> dict:
  """Prints and returns {xla_s, pallas_s, bytes, row_bytes} (median seconds per call)."""
  dtype = jnp.dtype(case.dtype)
  table = jnp.ones((case.rows, case.d), dtype)
  ids = make_ids(jax.random.key(0), case.tokens, case.heads, case.rows)
  row_bytes = case.d * dtype.itemsize
  # Rows read + rows written + ids read.
  nbytes = 2 * case.tokens * case.heads * row_bytes + ids.nbytes
  print(f"gather R={case.rows:,} d={case.d} {case.dtype} ({row_bytes} B rows) N={case.tokens} H={case.heads}")
  xla = jax.jit(reference.gather_rows)
  kern = jax.jit(lambda t, i: pk.gather_rows(t, i, impl="pallas", block_rows=block_rows, backend=backend))
  np.testing.assert_array_equal(np.asarray(kern(table, ids), np.float32), np.asarray(xla(table, ids), np.float32))
  t_xla = time_fn(xla, table, ids, iters=iters)
  t_k = time_fn(kern, table, ids, iters=iters)
  print(fmt_row("xla", t_xla, nbytes, copy_bw))
  print(fmt_row("pallas", t_k, nbytes, copy_bw))
  print(f"  speedup pallas/xla: {t_xla / t_k:.3g}x")
  del table
  return {"xla_s": t_xla, "pallas_s": t_k, "bytes": nbytes, "row_bytes": row_bytes}


def bench_fused(case: FusedCase, copy_bw: float, iters: int, block_rows: int, backend, block_d=None) -> dict:
  """Prints and returns {gpu_path, bytes, {xla,pallas}_{fwd,fwd+bwd}_s} (median seconds)."""
  dtype = jnp.dtype(case.dtype)
  k = jax.random.split(jax.random.key(1), 8)
  c = case.heads * case.d
  g, dim, n = case.branches, case.dim, case.tokens
  table = jnp.ones((case.rows, case.d), dtype)
  args = (
    table,
    make_ids(k[0], n, case.heads, case.rows),
    (jax.random.normal(k[1], (c, dim)) / np.sqrt(c)).astype(dtype),
    jnp.zeros((dim,), dtype),
    (jax.random.normal(k[2], (g, c, dim)) / np.sqrt(c)).astype(dtype),
    jnp.zeros((g, dim), dtype),
    jax.random.normal(k[3], (n, g, dim)).astype(dtype),
    jnp.ones((g, dim), dtype),
  )
  isz = dtype.itemsize
  # Compulsory traffic of the fused forward: rows, weights and queries read, u written.
  nbytes = n * c * isz + (1 + g) * c * dim * isz + n * g * dim * isz + n * g * dim * isz + n * g * 4
  print(f"gather_gate R={case.rows:,} d={case.d} {case.dtype} N={n} H={case.heads} D={dim} G={g}")
  path = None
  if (backend or jax.default_backend()) == "gpu":
    from pallas_kernels import gather_gate_gpu

    plan = gather_gate_gpu.fused_plan(args[0], args[1], args[2], args[4], args[6], block_d=block_d)
    path = ("unfused (gather kernel + XLA gate): " if isinstance(plan, str) else "fused ") + str(plan)
    print(f"  GPU pallas path: {path}")

  def fwd(impl):
    return jax.jit(lambda *a: pk.gather_gate(*a, impl=impl, block_rows=block_rows, block_d=block_d, backend=backend))

  def fwd_bwd(impl):
    def loss(*a):
      u, gates = pk.gather_gate(*a, impl=impl, block_rows=block_rows, block_d=block_d, backend=backend)
      return jnp.sum(u.astype(jnp.float32)) + jnp.sum(gates)

    float_idx = (0, 2, 3, 4, 5, 6, 7)
    grad = jax.grad(lambda *fa: loss(fa[0], args[1], *fa[1:]), argnums=tuple(range(7)))
    return jax.jit(lambda *a: grad(*[a[i] for i in float_idx]))

  u_x, g_x = fwd("xla")(*args)
  u_k, g_k = fwd("pallas")(*args)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
  np.testing.assert_allclose(np.asarray(g_k), np.asarray(g_x), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(u_k, np.float32), np.asarray(u_x, np.float32), atol=tol, rtol=tol)
  results = {}
  for label, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
    for impl in ("xla", "pallas"):
      results[label, impl] = time_fn(make(impl), *args, iters=iters)
      print(fmt_row(f"{impl} {label}", results[label, impl], nbytes, copy_bw))
    print(f"  speedup pallas/xla {label}: {results[label, 'xla'] / results[label, 'pallas']:.3g}x")
  return {"gpu_path": path, "bytes": nbytes, **{f"{impl}_{label}_s": t for (label, impl), t in results.items()}}


def main(argv):
  del argv
  preset = PRESETS[_PRESET.value]
  iters = _ITERS.value or preset.iters
  block_rows = _BLOCK_ROWS.value or None
  dev = jax.devices()[0]
  print(
    f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
    f"preset {_PRESET.value}, iters {iters}, block_rows {block_rows}"
  )
  if jax.default_backend() == "cpu":
    print("NOTE: on CPU the Pallas kernels run in interpret mode; their times measure the interpreter, not the kernel.")
  copy_bw = copy_bandwidth(preset.copy_bytes, iters)
  print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s ({preset.copy_bytes >> 20} MiB buffer)")
  start = time.perf_counter()
  for case in preset.gather:
    bench_gather(case, copy_bw, iters, block_rows, _BACKEND.value)
  if not _SKIP_FUSED.value:
    for case in preset.fused:
      bench_fused(case, copy_bw, iters, block_rows, _BACKEND.value, _BLOCK_D.value or None)
  print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
