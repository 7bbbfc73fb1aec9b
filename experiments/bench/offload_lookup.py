r"""Lookup-level benchmark of host-resident Engram tables (no model).

Per case it prints: the time of one step's row lookup from a device table (baseline),
from a host table (NumPy gather + device_put, and gather under compute_on('device_host')),
and through a hot-row cache; bytes crossing host->device per step; and the overlap the
RowPrefetcher achieves against a synthetic compute step. With --hit_rate it measures the
hot-row cache hit rate on the built-in corpus (stdlib, BPE trained in-process).

  JAX_PLATFORMS=cpu python -m experiments.bench.offload_lookup --preset=cpu_tiny
  JAX_PLATFORMS=cpu python -m experiments.bench.offload_lookup --preset=cpu_tiny --hit_rate
  python -m experiments.bench.offload_lookup --preset=h200          # one H200, < 3 min

On CPU, "host" and "device" memory are the same RAM: the CPU figures only show that the
paths work and what their software overheads are, not PCIe costs.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from engram_jax.offload.host_table import HostTable
from engram_jax.offload.hot_cache import HotRowCache, count_row_frequencies
from engram_jax.offload.prefetch import RowPrefetcher
from experiments.bench.shared import GatherCase as Case
from experiments.bench.shared import note_cpu
from experiments.bench.timing import time_fn

_PRESET = flags.DEFINE_enum("preset", "cpu_tiny", ["cpu_tiny", "h200"], "Shape set to run.")
_ITERS = flags.DEFINE_integer("iters", 0, "Timed iterations per measurement (0: preset).")
_COMPUTE_MS = flags.DEFINE_float("compute_ms", 0.0, "Synthetic compute step for the overlap test (0: preset).")
_DEPTH = flags.DEFINE_integer("prefetch_depth", 1, "RowPrefetcher depth (1: double buffering).")
_ZIPF = flags.DEFINE_float("zipf", 1.05, "Zipf exponent of the synthetic row-id stream.")
_CACHE_FRACTIONS = flags.DEFINE_list("cache_fractions", ["0.01", "0.05", "0.1"], "Cached share of the rows.")
_HIT_RATE = flags.DEFINE_bool("hit_rate", False, "Also measure hit rates on the stdlib corpus.")
_CORPUS_BYTES = flags.DEFINE_integer("corpus_bytes", 4_000_000, "Corpus bytes for --hit_rate.")
_BPE_VOCAB = flags.DEFINE_integer("bpe_vocab_size", 4096, "BPE vocabulary for --hit_rate.")
_ENGRAM_VOCAB = flags.DEFINE_list(
  "engram_vocab", ["20000", "200000"], "Nominal rows per head for --hit_rate (one run each)."
)
_HEADS = flags.DEFINE_integer("n_head_per_ngram", 4, "Engram K for --hit_rate.")


@dataclasses.dataclass(frozen=True)
class Preset:
  cases: tuple[Case, ...]
  iters: int
  compute_ms: float
  prefetch_steps: int


PRESETS = {
  "cpu_tiny": Preset(
    (Case(1 << 16, 32, "float32", 1024, 8), Case(1 << 18, 64, "float32", 2048, 16)),
    iters=10,
    compute_ms=20.0,
    prefetch_steps=40,
  ),
  # Engram-27B-like rows (d_h = 80, bf16) on a 4M-row slice; 16k tokens x 16 heads per step.
  "h200": Preset(
    (Case(1 << 22, 80, "bfloat16", 16384, 16), Case(1 << 24, 80, "bfloat16", 16384, 16)),
    iters=20,
    compute_ms=50.0,
    prefetch_steps=30,
  ),
}


def _zipf_ids(rng, case: Case, steps: int, exponent: float) -> list[np.ndarray]:
  """Flat row ids [tokens, heads] per step, Zipf over the rows in a random rank order."""
  ranks = np.arange(1, case.rows + 1, dtype=np.float64) ** -exponent
  cdf = np.cumsum(ranks / ranks.sum())
  perm = rng.permutation(case.rows)
  return [
    perm[np.minimum(np.searchsorted(cdf, rng.random((case.tokens, case.heads))), case.rows - 1)] for _ in range(steps)
  ]


def _mib(n: float) -> str:
  return f"{n / 2**20:8.2f} MiB"


def bench_case(case: Case, iters: int) -> None:
  rng = np.random.default_rng(0)
  dtype = jnp.dtype(case.dtype)
  table = rng.standard_normal((case.rows, case.d), np.float32).astype(dtype)
  stream = _zipf_ids(rng, case, 2 * iters + 4, _ZIPF.value)
  ids = stream[-1]
  row_bytes = case.d * dtype.itemsize
  step_bytes = ids.size * row_bytes
  print(
    f"\n== rows={case.rows} d={case.d} {case.dtype} tokens={case.tokens} heads={case.heads}: "
    f"table {_mib(case.rows * row_bytes)}, rows per step {_mib(step_bytes)}"
  )

  dev_table = jax.device_put(table)
  ids_dev = jnp.asarray(ids, jnp.int32)
  take = jax.jit(lambda t, i: jnp.take(t, i, axis=0))
  t_dev = time_fn(lambda: take(dev_table, ids_dev), iters=iters)
  print(f"  device table gather        {t_dev * 1e3:9.3f} ms   (baseline)   H2D 0")

  for method in ("numpy", "compute_on"):
    host = HostTable(table, method=method, check_ids=False)
    t = time_fn(lambda host=host: host.gather(ids), iters=iters)
    print(
      f"  host table [{method:10s}]    {t * 1e3:9.3f} ms   x{t / t_dev:6.2f}     H2D "
      f"{_mib(step_bytes)} ({step_bytes / t / 1e9:6.2f} GB/s)  [{host.memory_kind}]"
    )

  host = HostTable(table, method="numpy", check_ids=False)
  counts = count_row_frequencies(stream[:iters], case.rows)  # ranked on earlier steps
  for frac in (float(f) for f in _CACHE_FRACTIONS.value):
    cache = HotRowCache.from_frequencies(host, counts, fraction=frac)
    t = time_fn(lambda cache=cache: cache.lookup(ids), iters=iters)
    cache.reset_stats()
    miss_bytes = []
    for step_ids in stream[iters : 2 * iters]:
      _, hit = cache.remap(step_ids)
      misses = np.unique(step_ids[~hit]).size
      miss_bytes.append(misses * row_bytes + step_ids.size * 9)  # + slot/hit/index arrays
    print(
      f"  cached {frac:5.1%} ({cache.capacity:8d} rows) {t * 1e3:9.3f} ms   x{t / t_dev:6.2f}"
      f"     H2D {_mib(np.mean(miss_bytes))}  hit rate {cache.hit_rate:6.1%}"
      f"  (cache {_mib(cache.capacity * row_bytes)} on device)"
    )


def bench_prefetch(case: Case, steps: int, compute_ms: float) -> None:
  """Serial (gather, then compute) vs RowPrefetcher (gather t+1 during compute t)."""
  rng = np.random.default_rng(1)
  table = rng.standard_normal((case.rows, case.d), np.float32).astype(case.dtype)
  host = HostTable(table, check_ids=False)
  batches = [{"engram_ids": {0: ids}} for ids in _zipf_ids(rng, case, steps, _ZIPF.value)]

  def compute(rows):
    # Stands in for the accelerator's step: on CPU a sleep, so that it does not compete
    # with the gather thread for the same cores (which a real device step would not).
    jax.block_until_ready(rows)
    time.sleep(compute_ms / 1e3)

  warm = jax.block_until_ready(host.gather(batches[0]["engram_ids"][0]))
  start = time.perf_counter()
  for _ in batches:
    compute(warm)
  t_compute = (time.perf_counter() - start) / steps

  start = time.perf_counter()
  for b in batches:
    jax.block_until_ready(host.gather(b["engram_ids"][0]))
  t_gather = (time.perf_counter() - start) / steps

  start = time.perf_counter()
  for b in batches:
    compute(host.gather(b["engram_ids"][0]))
  t_serial = (time.perf_counter() - start) / steps

  start = time.perf_counter()
  with RowPrefetcher(batches, {0: host}, merge_heads=False, depth=_DEPTH.value) as pf:
    compute(next(pf)[1][0])
    t_fill = time.perf_counter() - start - t_compute  # thread start + first gather: not hidden
    start = time.perf_counter()
    for _, rows in pf:
      compute(rows[0])
  t_pref = (time.perf_counter() - start) / (steps - 1)
  # Share of the serial loop's lookup cost (serial - compute alone) that prefetching hid.
  hidden = (t_serial - t_pref) / max(t_serial - t_compute, 1e-9)
  print(
    f"\n== prefetch, rows={case.rows} tokens={case.tokens} heads={case.heads}, "
    f"synthetic compute {compute_ms:.1f} ms/step (sleep), {steps} steps, depth {_DEPTH.value}"
  )
  print(
    f"  compute alone {t_compute * 1e3:8.3f} | gather alone {t_gather * 1e3:8.3f} | "
    f"serial {t_serial * 1e3:8.3f} | prefetched {t_pref * 1e3:8.3f} ms/step "
    f"(+ {t_fill * 1e3:.1f} ms once to fill the pipeline)"
  )
  print(
    f"  speedup over serial x{t_serial / t_pref:5.2f} | lookup cost hidden {hidden:6.1%} | "
    f"prefetched step vs compute alone x{t_pref / t_compute:5.3f}"
  )


def bench_hit_rate() -> None:
  """Hit rates of per-order caches on the stdlib corpus (ranked on train, measured on
  validation, and in-sample on train)."""
  from engram_jax import EngramConfig, NgramHasher, TokenizerCompressor
  from engram_jax.data import DataConfig, eval_corpus, train_bpe_tokenizer, train_corpus
  from engram_jax.offload.hit_rate import measure_hit_rate

  data = DataConfig(max_bytes=_CORPUS_BYTES.value, bpe_vocab_size=_BPE_VOCAB.value)
  train, valid = train_corpus(data), eval_corpus(data)
  train_texts = [train[i] for i in range(len(train))]
  valid_texts = [valid[i] for i in range(min(len(valid), 400))]
  tok = train_bpe_tokenizer(train_texts, _BPE_VOCAB.value)
  compressor = TokenizerCompressor.from_tokenizer(tok)
  encode = lambda texts: [np.asarray(e.ids, np.int64) for e in tok.encode_batch(texts)]
  train_ids, valid_ids = encode(train_texts), encode(valid_texts)
  fractions = [float(f) for f in _CACHE_FRACTIONS.value]
  print(
    f"\n== hit rate on the stdlib corpus: {len(train_texts)} train docs "
    f"({sum(map(len, train_ids))} tokens), {len(valid_texts)} validation docs "
    f"({sum(map(len, valid_ids))} tokens), BPE {_BPE_VOCAB.value} -> "
    f"{compressor.num_compressed} compressed ids"
  )
  for nominal in (int(v) for v in _ENGRAM_VOCAB.value):
    heads = {"n_embed_per_ngram": 8 * _HEADS.value, "n_head_per_ngram": _HEADS.value}
    config = EngramConfig(vocab_sizes=(nominal,) * 2, **heads, layer_ids=(1,), pad_id=0)
    hasher = NgramHasher.from_compressor(config, compressor)
    held_out = measure_hit_rate(train_ids, hasher, fractions, eval_stream=valid_ids, compressor=compressor)
    in_sample = measure_hit_rate(train_ids, hasher, fractions, compressor=compressor)
    print(f"  table: {nominal} nominal rows/head x {config.num_heads} heads = {hasher.total_rows(1)} rows")
    for key in held_out:
      cells = "  ".join(f"{f:5.1%}: {held_out[key][f]:6.1%} ({in_sample[key][f]:6.1%})" for f in fractions)
      print(f"    {key:8s} cached share -> hit rate validation (train): {cells}")


def main(argv):
  del argv
  preset = PRESETS[_PRESET.value]
  iters = _ITERS.value or preset.iters
  print(
    f"backend={jax.default_backend()} device={jax.devices()[0]} "
    f"memories={[m.kind for m in jax.devices()[0].addressable_memories()]}"
  )
  note_cpu()
  for case in preset.cases:
    bench_case(case, iters)
  bench_prefetch(preset.cases[-1], preset.prefetch_steps, _COMPUTE_MS.value or preset.compute_ms)
  if _HIT_RATE.value:
    bench_hit_rate()


if __name__ == "__main__":
  app.run(main)
