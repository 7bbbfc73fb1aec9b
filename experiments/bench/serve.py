r"""Serving benchmark: greedy decode with Engram tables on the device, in host memory, or
cached (hot rows on the device, misses from host memory), shaped like the paper's
throughput test (N sequences, prompt lengths ~ Uniform[lo, hi], M new tokens each).

For each backbone (a dense one and an MoE one, both with Engram layers) the SAME model is
served with every placement in one process, through `engram_jax.inference.Generator`
(host and cached tables are read inside the compiled decode loop). Per placement it prints
  decode   tokens/s (mean +- standard error over repeats) and the decode path that ran;
  ratio    placement / device decode tokens/s, paired per repeat (same prompts, same tokens),
           mean +- SE; the goal line says whether it holds;
  bytes    host -> device per decoded token (rows read from host memory, all layers);
  prefill  prefill seconds, and for the host paths the extra time over device prefill
           against the time the host gather of the same prompts takes alone: extra << alone
           means the gather overlapped the blocks before the first Engram layer.
Greedy tokens must be identical across placements; the script fails if they are not.
Prompt tokens are Zipf-distributed over the vocabulary (as text is), which makes n-gram
rows Zipfian too, so the cache sees realistic skew.

  JAX_PLATFORMS=cpu python -m experiments.bench.serve --preset=cpu     # a few minutes
  JAX_PLATFORMS=cpu python -m experiments.bench.serve --preset=tiny    # ModelConfig.tiny shapes
  python -m experiments.bench.serve --preset=h200                      # >= 10B table params in host memory

Goals: on GPU host-table decode within 1% of device-table decode (better than the paper's
-1.9% / -2.8% on H800); on the CPU machine >= 0.9x. On CPU, host and device memory are the
same RAM: the CPU figures show software overheads (dispatch, copies), not PCIe.
Imports neither grain nor ml_collections (the GPU image lacks them).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from engram_jax.config import EngramConfig
from engram_jax.hashing import NgramHasher, TokenizerCompressor
from engram_jax.inference import Generator, SamplingConfig
from engram_jax.layers.moe import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.offloaded import model_stores
from engram_jax.models.transformer import Transformer
from engram_jax.offload import HostTable, HotRowCache, count_row_frequencies, top_rows
from experiments.bench import shared
from experiments.bench.timing import time_calls


def define_flags() -> dict:
  """The script's absl flags (defined by main only, so tests can import this module)."""
  f = {}
  f["preset"] = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Model sizes and shapes.")
  f["backbones"] = flags.DEFINE_list("backbones", ["dense", "moe"], "Backbones to serve.")
  f["placements"] = flags.DEFINE_list(
    "placements", ["device", "host", "cached"], "Table placements (device is the baseline)."
  )
  f["num_sequences"] = flags.DEFINE_integer("num_sequences", 0, "N sequences (0: the preset's).")
  f["prompt_min"] = flags.DEFINE_integer("prompt_min", 0, "Shortest prompt (0: the preset's).")
  f["prompt_max"] = flags.DEFINE_integer("prompt_max", 0, "Longest prompt (0: the preset's).")
  f["new_tokens"] = flags.DEFINE_integer("new_tokens", 0, "M tokens per sequence (0: the preset's).")
  f["repeats"] = flags.DEFINE_integer("repeats", 0, "Timed repeats per placement (0: the preset's).")
  f["cache_fraction"] = flags.DEFINE_float("cache_fraction", 0.05, "Rows on the device for 'cached'.")
  f["miss_fraction"] = flags.DEFINE_float("miss_fraction", 0.5, "'cached': host rows per step <= this fraction of B*H.")
  f["zipf"] = flags.DEFINE_float("zipf", 1.1, "Zipf exponent of the prompt tokens.")
  f["seed"] = flags.DEFINE_integer("seed", 0, "Seed of the model and the prompts.")
  f["dry_run"] = flags.DEFINE_bool("dry_run", False, "Print the configs and sizes, build nothing.")
  return f


@dataclasses.dataclass(frozen=True)
class Options:
  """What to serve beyond the preset's shapes."""

  placements: tuple[str, ...] = ("device", "host", "cached")
  cache_fraction: float = 0.05
  miss_fraction: float = 0.5
  zipf: float = 1.1
  seed: int = 0


GOAL = {"gpu": 0.99, "cpu": 0.9}  # host / device decode tokens/s


@dataclasses.dataclass(frozen=True)
class Preset:
  """A serving shape (N sequences, prompts of U(prompt_min, prompt_max) tokens, new_tokens
  each, timed repeats) and the model served."""

  num_sequences: int
  prompt_min: int
  prompt_max: int
  new_tokens: int
  repeats: int
  backbone: dict  # ModelConfig fields shared by both backbones
  moe: MoEConfig
  engram: EngramConfig
  dtype: str


_TINY = ModelConfig.tiny("engram_moe")  # hidden 32, 3 blocks, vocab 128, Engram at block 1


def _preset(shape: tuple[int, ...], backbone: tuple[int, ...], moe: MoEConfig, dtype="float32", **engram) -> Preset:
  """shape: (num_sequences, prompt_min, prompt_max, new_tokens, repeats); backbone: the
  `BACKBONE` values (one leading dense block); engram: fields that differ from ModelConfig.tiny's."""
  return Preset(
    *shape,
    backbone=shared.backbone(*backbone),
    moe=moe,
    engram=dataclasses.replace(_TINY.engram, **engram),
    dtype=dtype,
  )


PRESETS = {
  # ModelConfig.tiny's shapes.
  "tiny": _preset((8, 4, 30, 64, 30), tuple(getattr(_TINY, k) for k in shared.BACKBONE), _TINY.moe),
  # ~5.1M table parameters, 4 blocks of width 128: a few minutes on 2 loaded CPU cores.
  "cpu": _preset(
    (16, 16, 64, 48, 16),
    (2048, 128, 4, 4, 2, 32, 256),
    dataclasses.replace(_TINY.moe, expert_hidden=128),
    vocab_sizes=(20_011, 20_011),
    n_embed_per_ngram=64,
    layer_ids=(1, 3),
  ),
  # 2 layers x 2 orders x 8 heads x ~4.9M rows x 64 = 10.0B table parameters (bf16:
  # 20 GB in pinned host memory), a ~1B-parameter backbone, N=128, prompts U(100, 1024).
  "h200": _preset(
    (128, 100, 1024, 128, 3),
    (32768, 2048, 12, 16, 4, 128, 5632),
    MoEConfig(num_experts=16, num_shared_experts=1, top_k=2, expert_hidden=1408),
    "bfloat16",
    vocab_sizes=(4_900_000, 4_900_000),
    n_embed_per_ngram=512,
    n_head_per_ngram=8,
    layer_ids=(1, 6),
  ),
}


def resolve(f: dict) -> tuple[Preset, Options]:
  """The preset with the flag overrides, and the options; app.UsageError on bad values."""
  p = PRESETS[f["preset"].value]
  over = {k: f[k].value for k in ("num_sequences", "prompt_min", "prompt_max", "new_tokens", "repeats")}
  for name, value in over.items():
    if value < 0:
      raise app.UsageError(f"--{name} must be >= 0 (0 = the preset's), got {value}")
  p = dataclasses.replace(p, **{k: v for k, v in over.items() if v})
  if not 1 <= p.prompt_min <= p.prompt_max:
    raise app.UsageError(f"need 1 <= prompt_min <= prompt_max, got {p.prompt_min}, {p.prompt_max}")
  placements = tuple(f["placements"].value)
  bad = sorted(set(placements) - {"device", "host", "cached"})
  if bad or "device" not in placements:
    raise app.UsageError(
      f"--placements must include device (the baseline) and only device/host/cached, got {list(placements)}"
    )
  bad = sorted(set(f["backbones"].value) - {"dense", "moe"})
  if bad:
    raise app.UsageError(f"--backbones takes dense and/or moe, got {bad}")
  if not 0 < f["cache_fraction"].value < 1:
    raise app.UsageError(f"--cache_fraction must lie in (0, 1), got {f['cache_fraction'].value}")
  if not 0 < f["miss_fraction"].value <= 1:
    raise app.UsageError(f"--miss_fraction must lie in (0, 1], got {f['miss_fraction'].value}")
  return p, Options(
    placements=placements,
    cache_fraction=f["cache_fraction"].value,
    miss_fraction=f["miss_fraction"].value,
    zipf=f["zipf"].value,
    seed=f["seed"].value,
  )


def model_config(p: Preset, backbone: str) -> ModelConfig:
  family = "engram_dense" if backbone == "dense" else "engram_moe"
  kw = dict(p.backbone)
  if backbone == "dense":
    kw["num_dense_layers"] = kw["num_layers"]
  return ModelConfig.make(
    family, moe=None if backbone == "dense" else p.moe, engram=p.engram, dtype=p.dtype, param_dtype=p.dtype, **kw
  )


def zipf_tokens(rng: np.random.Generator, vocab: int, size: int, exponent: float) -> np.ndarray:
  weights = 1.0 / np.arange(1, vocab + 1) ** exponent
  ranks = rng.choice(vocab, size=size, p=weights / weights.sum())
  return rng.permutation(vocab)[ranks]  # frequent ids spread over the vocabulary


def mean_se(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def gather_alone_seconds(gen: Generator, prompts, iters: int = 10) -> float:
  """Fastest time of hashing the padded prompt batch on device and reading its rows from
  host memory alone (the part of prefill that host placement adds)."""
  dec = gen.decoder
  tokens, _ = dec.pad_prompts(prompts)
  bucket = -(-tokens.shape[1] // 16) * 16
  tokens = jnp.asarray(np.pad(tokens, ((0, 0), (0, bucket - tokens.shape[1]))))

  @jax.jit
  def rows(lut, toks, tables):
    return dec.program_rows(tables, dec.hasher.hash_jax(jnp.take(lut, toks, axis=0)))[0]

  return min(time_calls(rows, dec.lut, tokens, dec.tables, iters=iters))


def serve_one(p: Preset, backbone: str, platform: str, opt: Options = Options()) -> dict:
  config = model_config(p, backbone)
  rng = np.random.default_rng(opt.seed)
  vocab = config.vocab_size
  compressor = TokenizerCompressor(np.arange(vocab) % max(2, vocab - vocab // 8))
  hasher = NgramHasher(config.engram, compressor.num_compressed)
  start = time.perf_counter()
  model = Transformer(config, rngs=nnx.Rngs(opt.seed))
  table_params = sum(b.engram.table.get_value().size for b in model.blocks if b.engram is not None)
  lengths = rng.integers(p.prompt_min, p.prompt_max + 1, p.num_sequences)
  prompts = [zipf_tokens(rng, vocab, int(n), opt.zipf).tolist() for n in lengths]

  generators: dict[str, Generator] = {"device": Generator(model, hasher, compressor)}
  hosts = {}
  if {"host", "cached"} & set(opt.placements):
    # Straight from the device arrays into pinned host memory (no NumPy copy).
    hosts = {
      b.layer: HostTable(b.engram.table.get_value(), method="compute_on") for b in model.blocks if b.engram is not None
    }
  if "host" in opt.placements:
    generators["host"] = Generator(model, hasher, compressor, stores=model_stores(model, hosts), host_decode="in_loop")
  hit_note = ""
  compile_s = {}
  if "cached" in opt.placements:
    # Row frequencies of the traffic: the prompts and what the device model generates from
    # them (a production cache learns from the requests it serves).
    first = generators["device"](prompts, max_new_tokens=p.new_tokens, sampling=SamplingConfig(greedy=True))
    compile_s["device"], seen = first.compile_seconds, first.tokens
    caches = {}
    for lid, table in hosts.items():
      stream = (
        hasher.hash(compressor(np.asarray(q + c)[None]))[lid] + hasher.offsets[lid] for q, c in zip(prompts, seen)
      )
      counts = count_row_frequencies(stream, table.num_rows)
      capacity = max(1, round(opt.cache_fraction * table.num_rows))
      caches[lid] = HotRowCache(table, top_rows(counts, capacity))
    generators["cached"] = Generator(
      model, hasher, compressor, stores=model_stores(model, caches), miss_fraction=opt.miss_fraction
    )
    hit_note = f" (cache: the {opt.cache_fraction:.0%} most frequent rows of the served traffic on the device)"
  build_s = time.perf_counter() - start
  print(
    f"\n=== backbone {backbone}: {config.num_layers} blocks, hidden {config.hidden_size}, "
    f"Engram layers {list(config.engram_layer_ids)}, table parameters {table_params:,} "
    f"({table_params * np.dtype(config.jnp_param_dtype).itemsize / 2**30:.2f} GiB), "
    f"built in {build_s:.0f} s"
  )
  print(
    f"N={p.num_sequences} prompts of U({p.prompt_min}, {p.prompt_max}) tokens "
    f"(mean {lengths.mean():.0f}), {p.new_tokens} greedy tokens each{hit_note}"
  )

  greedy = SamplingConfig(greedy=True)
  kw = dict(max_new_tokens=p.new_tokens, sampling=greedy)
  results = {name: [] for name in generators}
  for name, gen in generators.items():  # compile and warm up
    compile_s[name] = compile_s.get(name, 0.0) + gen(prompts, **kw).compile_seconds
  names = list(generators)
  for rep in range(p.repeats):
    for name in names if rep % 2 == 0 else names[::-1]:  # alternate the order: load drifts
      results[name].append(generators[name](prompts, **kw))
  ref = results["device"][0].tokens
  for name, runs in results.items():
    for r in runs:
      if r.tokens != ref:
        raise SystemExit(f"FAIL: {backbone}/{name} greedy tokens differ from device tables")

  goal = GOAL["gpu" if platform == "gpu" else "cpu"]
  dev_s = np.asarray([r.decode_seconds for r in results["device"]])
  summary = {}
  print(
    f"{'placement':<9} {'path':<17} {'decode tok/s':>17} {'paired ratio':>15} "
    f"{'median':>6} {'best':>6} {'H->D B/token':>12} {'hit rate':>8} {'prefill s':>9} "
    f"{'compile s':>9}"
  )
  for name, runs in results.items():
    tps = np.asarray([r.tokens_per_second for r in runs])
    secs = np.asarray([r.decode_seconds for r in runs])
    m, se = mean_se(tps)
    ratios = dev_s / secs  # same tokens: time ratio = throughput ratio
    rm, rse = mean_se(ratios)
    best = dev_s.min() / secs.min()
    last = runs[-1]
    hit = "" if not last.cache_lookups else f"{last.cache_hit_rate:.1%}"
    pre = float(np.min([r.prefill_seconds for r in runs]))
    print(
      f"{name:<9} {last.decode_path:<17} {m:>8,.0f} +- {se:>5,.0f} {rm:>7.3f} +- {rse:.3f} "
      f"{np.median(ratios):>6.3f} {best:>6.3f} {last.host_bytes_per_token:>12,.0f} {hit:>8} "
      f"{pre:>9.4f} {compile_s[name]:>9.1f}"
    )
    summary[name] = (rm, rse, best)
  print(
    "(decode tok/s: mean +- SE over repeats; paired ratio: device time / placement time per "
    "repeat, mean +- SE; median of those; best: ratio of the fastest runs; prefill: fastest)"
  )
  dev_pre = np.asarray([r.prefill_seconds for r in results["device"]])
  for name in [n for n in results if n != "device"]:
    alone = gather_alone_seconds(generators[name], prompts)
    extra, extra_se = mean_se(np.asarray([r.prefill_seconds for r in results[name]]) - dev_pre)
    if extra + 2 * extra_se < 0.5 * alone:
      verdict = "overlapped (extra + 2 SE < half the gather)"
    elif extra - 2 * extra_se > 0.5 * alone:
      verdict = "not overlapped (the gather adds its own time)"
    else:
      verdict = "undecided (within 2 SE of half the gather)"
    print(
      f"prefill {name}: {extra * 1e3:+.2f} +- {extra_se * 1e3:.2f} ms over device prefill "
      f"(paired); the host gather of these prompts alone takes {alone * 1e3:.2f} ms -> "
      f"{verdict}"
    )
  for name in [n for n in summary if n != "device"]:
    rm, rse, best = summary[name]
    if rm - 2 * rse >= goal:
      verdict = "MET"
    elif rm + 2 * rse < goal:
      verdict = "NOT MET"
    else:
      verdict = "UNDECIDED (goal within 2 SE)"
    print(
      f"goal ({platform}): {name}/device decode >= {goal:.2f}: {verdict} "
      f"(paired {rm:.3f} +- {rse:.3f}, best {best:.3f})"
    )
  return summary


def main(argv, f: dict):
  del argv
  p, opt = resolve(f)
  platform = jax.devices()[0].platform
  print(
    f"serve benchmark, preset {f['preset'].value}, device {jax.devices()[0].device_kind} "
    f"({platform}), jax {jax.__version__}"
  )
  print(
    f"GPU goal: host-table decode within 1% of device-table decode (host/device >= "
    f"{GOAL['gpu']}; the paper: -1.9% / -2.8% on H800). CPU goal: >= {GOAL['cpu']}."
  )
  shared.note_cpu()
  if f["dry_run"].value:
    for backbone in f["backbones"].value:
      c = model_config(p, backbone)
      hasher = NgramHasher(c.engram, c.vocab_size)
      rows = sum(hasher.total_rows(l) for l in c.engram_layer_ids)
      print(
        f"{backbone}: {c.num_layers} blocks, hidden {c.hidden_size}, table parameters "
        f"{rows * c.engram.head_dim:,} ({c.param_dtype}), N={p.num_sequences}, prompts "
        f"U({p.prompt_min}, {p.prompt_max}), {p.new_tokens} new tokens, {p.repeats} repeats"
      )
    return
  for backbone in f["backbones"].value:
    serve_one(p, backbone, platform, opt)


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
