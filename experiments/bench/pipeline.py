r"""Throughput of the host input pipeline (grain, with Engram hashing on the host).

Prints batches/s and tokens/s of `make_train_iterator` for an Engram config like the tiny
training one (seq_len 128, batch 16, N=3, K=4, 2 Engram layers) with 0 and 2 workers,
next to baselines measured in the same run: the same pipeline without hashing, and the
hashing alone (one NumPy call per batch, as the pipeline does, vs one per row).

  python -m experiments.bench.pipeline                 # defaults: whole stdlib corpus
  python -m experiments.bench.pipeline --max_bytes=4000000 --batches=200 --workers=0

The train step's rate is the figure to compare with: the pipeline must be much faster.
It also prints the mean number of distinct documents per training batch of the tiny
config (`experiments/configs/tiny.py`'s data), with one document stream per row (the
default, `rows_per_stream=1`) against one stream for the whole batch (the old packing), and
the pipeline rate of both.
"""

from __future__ import annotations

import time

from absl import app, flags

from engram_jax.config import EngramConfig
from engram_jax.data import (
  DataConfig,
  EngramRowHasher,
  load_or_train_tokenizer,
  make_train_iterator,
  special_ids,
)

_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per batch.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker process counts to measure.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Timed batches per case.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed batches first (worker start-up).")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", None, "Cap on the training corpus.")
_VOCAB = flags.DEFINE_integer("bpe_vocab_size", 4096, "Trained BPE vocabulary.")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", "/tmp/engram_jax_bench_tokenizer", "Tokenizer cache directory.")
_NGRAM = flags.DEFINE_integer("max_ngram_size", 3, "Engram N.")
_HEADS = flags.DEFINE_integer("n_head_per_ngram", 4, "Engram K.")
_LAYERS = flags.DEFINE_list("engram_layers", ["1", "2"], "Engram layer ids.")
_TABLE = flags.DEFINE_integer("engram_vocab", 20_000, "Nominal rows per head.")
_MIXING_BATCHES = flags.DEFINE_integer(
  "mixing_batches", 200, "Batches of the tiny config counted for documents per batch (0: skip)."
)
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed train steps of the tiny model (0: skip).")


def engram_config() -> EngramConfig:
  n, heads = _NGRAM.value, {"n_embed_per_ngram": 8 * _HEADS.value, "n_head_per_ngram": _HEADS.value}
  layers = tuple(int(x) for x in _LAYERS.value)
  return EngramConfig(vocab_sizes=(_TABLE.value,) * (n - 1), max_ngram_size=n, **heads, layer_ids=layers, pad_id=0)


def pipeline_rate(
  config: DataConfig, tokenizer, engram: EngramConfig | None, *, batches: int, warmup: int, **kwargs
) -> tuple[float, float]:
  """(batches/s, tokens/s) of the training iterator after `warmup` batches."""
  it = make_train_iterator(config, tokenizer, engram, **kwargs)
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    it.close()
  rate = batches / seconds
  return rate, rate * config.batch_size * config.seq_len


def hashing_rates(config: DataConfig, tokenizer, engram: EngramConfig, *, batches: int) -> tuple[float, float]:
  """Batches/s of the host hashing alone (compress + NgramHasher.hash + int32 cast), as the
  pipeline does it (one call per batch) and one call per row."""
  it = make_train_iterator(config.replace(num_workers=0, prefetch_buffer_size=0), tokenizer)
  try:
    sample = [next(it) for _ in range(min(batches, 50))]
  finally:
    it.close()
  hasher = EngramRowHasher.build(engram, tokenizer, special_ids(tokenizer).pad)
  start = time.perf_counter()
  for i in range(batches):
    hasher(sample[i % len(sample)])
  per_batch = batches / (time.perf_counter() - start)
  start = time.perf_counter()
  for i in range(batches):
    b = sample[i % len(sample)]
    for r in range(config.batch_size):
      hasher.ids(b["tokens"][r : r + 1], b["segment_ids"][r : r + 1])
  per_row = batches / (time.perf_counter() - start)
  return per_batch, per_row


def train_step_rate(config: DataConfig, tokenizer, *, steps: int) -> float:
  """Steps/s of the tiny config's Engram+MoE train step (its own Engram layout, which hashes
  less than the pipeline cases above: the comparison is conservative)."""
  import jax

  from engram_jax import sharding as sharding_lib
  from engram_jax.data import EngramRowHasher, special_ids
  from engram_jax.train.optimizer import make_optimizer
  from engram_jax.train.state import create_train_state
  from engram_jax.train.steps import batch_shardings, make_train_step
  from experiments.configs import common, tiny

  run = tiny.get_config("engram")
  run.model.vocab_size = tokenizer.get_vocab_size()
  model_config = common.model_config(run)
  hasher = EngramRowHasher.build(model_config.engram, tokenizer, special_ids(tokenizer).pad)
  batch = next(iter(make_train_iterator(config, tokenizer, row_hasher=hasher)))
  train_config = common.train_config(run)
  mesh = sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])
  graphdef, state, shardings, (tx, lr) = create_train_state(
    model_config, lambda p: make_optimizer(train_config, p), 0, mesh
  )
  batch_sh = batch_shardings(batch, mesh)
  step = jax.jit(
    make_train_step(graphdef, tx, lr, bias_update_rate=1e-3),
    in_shardings=(shardings, batch_sh),
    out_shardings=(shardings, None, None),
    donate_argnums=(0,),
  )
  with jax.set_mesh(mesh):
    device_batch = jax.device_put(batch, batch_sh)
    state, metrics, _ = step(state, device_batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics, _ = step(state, device_batch)
    jax.block_until_ready(metrics)
  return steps / (time.perf_counter() - start)


def documents_per_batch(config: DataConfig, tokenizer, *, batches: int) -> tuple[float, int, float]:
  """(mean, min) distinct documents per training batch and batches/s of the pipeline
  (no hashing)."""
  import numpy as np

  from engram_jax.data.packing import documents_in_batch

  eos = special_ids(tokenizer).eos
  it = make_train_iterator(config, tokenizer, None)
  try:
    start = time.perf_counter()
    counts = [documents_in_batch(next(it), config.rows_per_stream, eos) for _ in range(batches)]
    rate = batches / (time.perf_counter() - start)
  finally:
    it.close()
  return float(np.mean(counts)), int(np.min(counts)), rate


def tiny_mixing_report(batches: int) -> None:
  from experiments.configs import common, tiny

  data = common.data_config(tiny.get_config("engram"))
  tokenizer = load_or_train_tokenizer(data)
  for rows in (1, data.batch_size):
    cfg = data.replace(rows_per_stream=rows)
    mean, low, rate = documents_per_batch(cfg, tokenizer, batches=batches)
    what = "one stream per row (default)" if rows == 1 else "one stream per batch (old packing)"
    print(
      f"tiny config, {what:<36} {mean:6.2f} documents/batch (min {low}), {rate:7.1f} batches/s "
      f"({cfg.batch_size // rows} streams x {rows} rows)",
      flush=True,
    )


def main(argv):
  del argv
  if _MIXING_BATCHES.value:
    tiny_mixing_report(_MIXING_BATCHES.value)
  config = DataConfig(
    seq_len=_SEQ_LEN.value,
    batch_size=_BATCH.value,
    max_bytes=_MAX_BYTES.value,
    bpe_vocab_size=_VOCAB.value,
    tokenizer_dir=_TOKENIZER_DIR.value,
  )
  start = time.perf_counter()
  tokenizer = load_or_train_tokenizer(config)
  print(
    f"tokenizer: {tokenizer.get_vocab_size()} ids ({time.perf_counter() - start:.1f} s, cache {_TOKENIZER_DIR.value})"
  )
  engram = engram_config()
  print(
    f"engram: N={engram.max_ngram_size} K={engram.n_head_per_ngram} "
    f"layers={engram.layer_ids}; batch {config.batch_size} x {config.seq_len} tokens"
  )
  tokens_per_batch = config.batch_size * config.seq_len
  kw = {"batches": _BATCHES.value, "warmup": _WARMUP.value}

  per_batch, per_row = hashing_rates(config, tokenizer, engram, batches=_BATCHES.value)
  for name, rate in (("hashing alone, per batch", per_batch), ("hashing alone, per row", per_row)):
    print(f"{name:<42} {rate:9.1f} batches/s {rate * tokens_per_batch:12.0f} tokens/s")
  rates = {}
  for workers in (int(w) for w in _WORKERS.value):
    cfg = config.replace(num_workers=workers)
    for name, eng in (("no hashing (dense/moe)", None), ("with Engram hashing", engram)):
      bps, tps = pipeline_rate(cfg, tokenizer, eng, **kw)
      rates[(workers, eng is not None)] = bps
      print(f"workers={workers} pipeline, {name:<24} {bps:9.1f} batches/s {tps:12.0f} tokens/s", flush=True)
  print(f"hashing per batch is {per_batch / per_row:.1f}x faster than per row")
  if _TRAIN_STEPS.value:
    steps_per_s = train_step_rate(config, tokenizer, steps=_TRAIN_STEPS.value)
    print(
      f"train step (tiny Engram+MoE config)          {steps_per_s:9.1f} batches/s "
      f"{steps_per_s * tokens_per_batch:12.0f} tokens/s"
    )
    best = max(rates[(w, True)] for w in (int(w) for w in _WORKERS.value))
    print(
      f"the pipeline with hashing produces batches {best / steps_per_s:.0f}x faster than the train step consumes them"
    )
  for workers in (int(w) for w in _WORKERS.value):
    print(
      f"workers={workers}: the pipeline with hashing runs at "
      f"{rates[(workers, True)] / rates[(workers, False)]:.2f}x the rate without"
    )


if __name__ == "__main__":
  app.run(main)
