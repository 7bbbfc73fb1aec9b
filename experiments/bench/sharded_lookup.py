r"""Benchmark of the row-sharded Engram lookup: XLA-partitioned gather vs all-to-all routing.

For each case prints the time of the forward pass and of forward+backward (gradient w.r.t.
the table) for method="xla", method="all_to_all" with exact buckets, and with
capacity_factor=1.25, the ratio of each all_to_all variant to xla (>1: all_to_all faster),
and the bytes each device sends per forward lookup under a simple traffic model.
The default of `sharded_gather` (method, capacity_factor) is chosen from this output.

  # CPU smoke run on 8 virtual devices (timings say nothing about GPU interconnects):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m experiments.bench.sharded_lookup --preset=cpu
  # the paper's layout (table over every device, each device with its own tokens):
  ... --layout=paper
  # a multi-GPU host:
  python -m experiments.bench.sharded_lookup --preset=gpu --tensor=8
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax.distributed import sharded_lookup as sl
from engram_jax.sharding import make_mesh
from experiments.bench.shared import GatherCase as Case
from experiments.bench.timing import time_fn

_PRESET = flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"], "Shape set to run.")
_LAYOUT = flags.DEFINE_enum(
  "layout",
  "tensor",
  ["tensor", "paper"],
  "tensor: table over 'tensor', tokens over 'data' (replicated over 'tensor'); "
  "paper: table over ('data', 'tensor'), tokens over ('data', 'tensor').",
)
_DATA = flags.DEFINE_integer("data", 1, "Size of the 'data' mesh axis.")
_TENSOR = flags.DEFINE_integer("tensor", 0, "Size of the 'tensor' axis (0: devices / data).")
_ITERS = flags.DEFINE_integer("iters", 0, "Timed iterations (0: preset default).")
_CAPACITY = flags.DEFINE_float("capacity_factor", 1.25, "Capped all_to_all variant.")


# cases: rows of the whole table; tokens per batch shard (all devices holding the same ids)
PRESETS = {
  "cpu": (
    {"iters": 5},
    (
      Case(1 << 16, 32, "float32", 512, 8),
      Case(1 << 18, 32, "float32", 2048, 8),
      Case(1 << 18, 80, "float32", 4096, 16),
    ),
  ),
  # The paper's shapes: d_h = 80 bf16 (160-byte rows), 16 heads, 16k tokens.
  "gpu": (
    {"iters": 20},
    (
      Case(10_000_000, 80, "bfloat16", 16384, 16),
      Case(36_198_400, 80, "bfloat16", 16384, 16),
      Case(36_198_400, 80, "bfloat16", 65536, 16),
    ),
  ),
}


def traffic_model(case: Case, shards: int, splits: int, factor: float | None) -> dict:
  """Bytes one device sends per forward lookup (ring collectives, ids included).

  xla (what XLA's partitioner emits, read from the HLO): with ids replicated over the table
  axes, an all-reduce of the [M, d] rows; with ids split over a table axis, an all-gather
  of the whole table. all_to_all: ids out, rows back (S buckets of C slots), then the
  all_gather over the split axes.
  """
  isz = np.dtype(jnp.dtype(case.dtype)).itemsize
  m_all = case.tokens * case.heads
  m = -(-m_all // splits)
  row = case.d * isz
  if splits == shards:
    out = {"xla": 2 * (shards - 1) / shards * m_all * row}
  else:
    out = {"xla": (shards - 1) / shards * case.rows * row}
  for name, f in (("all_to_all exact", None), (f"all_to_all cf={factor}", factor)):
    c = m if f is None else min(m, math.ceil(f * m / shards))
    away = (shards - 1) * c
    out[name] = away * (4 + row) + (splits - 1) * m * row
  return out


def bench_case(case: Case, mesh, axis, batch_axes, iters: int, factor: float) -> dict:
  dtype = jnp.dtype(case.dtype)
  shards = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
  batch = math.prod(mesh.shape[a] for a in batch_axes)
  splits = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis) if a not in batch_axes)
  rows = sl.padded_num_rows(case.rows, shards)
  table = jax.jit(lambda: jnp.ones((rows, case.d), dtype), out_shardings=NamedSharding(mesh, P(axis, None)))()
  # Hashed ids: uniform over the table.
  ids = jax.random.randint(jax.random.key(0), (batch * case.tokens, case.heads), 0, case.rows, jnp.int32)
  ids = jax.device_put(ids, NamedSharding(mesh, P(batch_axes)))
  print(
    f"R={case.rows:,} d={case.d} {case.dtype} tokens/batch-shard={case.tokens} "
    f"H={case.heads}: {shards} table shards, {batch} batch shards, ids split {splits} ways"
  )

  variants = {
    "xla": {"method": "xla"},
    "all_to_all exact": {"method": "all_to_all", "capacity_factor": None},
    f"all_to_all cf={factor}": {"method": "all_to_all", "capacity_factor": factor},
  }
  kw = {"mesh": mesh, "axis": axis, "batch_axes": batch_axes}
  want = None
  results = {}
  for name, v in variants.items():
    fwd = jax.jit(lambda t, i, v=v: sl.sharded_gather(t, i, **kw, **v))
    # sum of squares: the gradient needs the forward rows (a plain sum would skip them).
    grad = jax.jit(
      jax.value_and_grad(lambda t, i, v=v: jnp.sum(jnp.square(sl.sharded_gather(t, i, **kw, **v).astype(jnp.float32))))
    )
    got = np.asarray(fwd(table, ids)[:2].astype(jnp.float32))
    if want is None:
      want = got
    np.testing.assert_array_equal(got, want)
    results[name] = (time_fn(fwd, table, ids, iters=iters), time_fn(grad, table, ids, iters=iters))
  traffic = traffic_model(case, shards, splits, factor)
  base_f, base_b = results["xla"]
  for name, (t_f, t_b) in results.items():
    print(
      f"  {name:<22} fwd {t_f * 1e3:9.3f} ms ({base_f / t_f:5.2f}x of xla)   "
      f"fwd+bwd {t_b * 1e3:9.3f} ms ({base_b / t_b:5.2f}x of xla)   "
      f"model: {traffic[name] / 1e6:8.2f} MB sent/device fwd"
    )
  return {name: (base_f / t_f, base_b / t_b) for name, (t_f, t_b) in results.items()}


def main(argv):
  del argv
  defaults, cases = PRESETS[_PRESET.value]
  iters = _ITERS.value or defaults["iters"]
  n = len(jax.devices())
  data = _DATA.value
  tensor = _TENSOR.value or n // data
  mesh = make_mesh(data=data, tensor=tensor)
  if _LAYOUT.value == "tensor":
    axis, batch_axes = "tensor", ("data",)
  else:
    axis, batch_axes = ("data", "tensor"), ("data", "tensor")
  print(
    f"devices: {n} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"jax {jax.__version__}, mesh data={data} tensor={tensor}, layout {_LAYOUT.value}, "
    f"iters {iters}"
  )
  if jax.default_backend() == "cpu":
    print(
      "NOTE: virtual CPU devices share one host's cores and memory; collectives are "
      "memcpys. These timings do not represent GPU interconnects (NVLink/InfiniBand)."
    )
  start = time.perf_counter()
  speedups = [bench_case(case, mesh, axis, batch_axes, iters, _CAPACITY.value) for case in cases]
  print("geometric mean speedup over xla (>1: faster than xla):")
  for name in speedups[0]:
    fwd, both = (float(np.exp(np.mean([np.log(s[name][k]) for s in speedups]))) for k in (0, 1))
    print(f"  {name:<22} fwd {fwd:5.2f}x   fwd+bwd {both:5.2f}x")
  print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
