# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Tables in host memory, prefetching and a hot-row cache
#
# Engram's row addresses depend only on the token ids, so they are known as soon as a
# batch is tokenized, before the forward pass starts. That allows three things the paper
# builds on (ENGRAM_SPEC.md §7):
#
# 1. **host placement**: the table lives in host memory; only the rows a batch touches
#    cross to the device, so traffic scales with rows touched, not with table size;
# 2. **prefetching**: the rows of batch t+1 are gathered while the device computes batch t;
# 3. **a hot-row cache**: n-gram frequencies are Zipfian, so a device cache of the most
#    frequent rows serves a share of the lookups far larger than its share of the rows;
#    only the tail goes to the host.
#
# On a CPU "host" and "device" memory are the same RAM: everything below runs and gives the
# same rows, but a transfer costs a memcpy. The timings are only meaningful on a GPU/TPU
# (see `experiments/bench/offload_lookup.py`).

# %%
import itertools
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from engram_jax import EngramConfig, TokenizerCompressor
from engram_jax.data import (
  DataConfig,
  EngramRowHasher,
  load_or_train_tokenizer,
  make_eval_batches,
  make_train_iterator,
)
from engram_jax.models import ModelConfig, Transformer
from engram_jax.offload import (
  HostTable,
  HotRowCache,
  RowPrefetcher,
  count_row_frequencies,
  flat_rows_np,
  host_memory_kind,
  measure_hit_rate,
)
from engram_jax.offload.placement import memory_kinds

# %% [markdown]
# ## A small model and a stream of batches
#
# A BPE trained on standard-library code, a tiny dense model with one Engram layer
# (block 1) whose heads have ~25,000 rows each, and the training input pipeline: every
# batch carries `engram_ids = {layer: int32 [B, T, H]}`, hashed on the host.

# %%
data = DataConfig(seq_len=128, batch_size=8, bpe_vocab_size=1024, tokenizer_train_bytes=500_000,
                  max_bytes=3_000_000, stdlib_include_tests=False, num_eval_batches=8)
tokenizer = load_or_train_tokenizer(data)
compressor = TokenizerCompressor.from_tokenizer(tokenizer)
engram_cfg = EngramConfig(vocab_sizes=(25_000, 25_000), max_ngram_size=3, n_embed_per_ngram=32,
                          n_head_per_ngram=2, layer_ids=(1,), pad_id=0)
model_cfg = ModelConfig.tiny("engram_dense", vocab_size=1024, engram=engram_cfg,
                             engram_compressed_vocab=compressor.num_compressed)
model = Transformer(model_cfg, rngs=nnx.Rngs(0))
LAYER = 1
engram = model.blocks[LAYER].engram
row_hasher = EngramRowHasher.build(engram_cfg, tokenizer, pad_id=0, compressor=compressor)
offsets = row_hasher.hasher.offsets[LAYER]
train_batches = make_train_iterator(data, tokenizer, row_hasher=row_hasher)
print(f"Engram table of block {LAYER}: {engram.table.shape} "
      f"({engram.table[...].nbytes / 2**20:.1f} MiB), heads {engram.table_sizes}")

# %% [markdown]
# ## 1. Memory kinds and host tables
#
# JAX devices expose memories of several kinds; a host table goes to `pinned_host` when the
# backend has it (copies to the device can then be asynchronous DMA). `HostTable` offers
# two host gathers: `"numpy"` (the master copy is a NumPy array, rows are taken on the
# host and `device_put`) and `"compute_on"` (a `jax.Array` in `pinned_host` memory,
# gathered inside `jit` under `compute_on("device_host")`).

# %%
device = jax.devices()[0]
print("device:", device, " memory kinds:", memory_kinds(device),
      " host kind used:", host_memory_kind(device))
table = np.asarray(engram.table[...])
host_numpy = HostTable(table, method="numpy")
host_pinned = HostTable(table, method="compute_on")
print("numpy table:", type(host_numpy.array).__name__, host_numpy.memory_kind)
print("compute_on table:", host_pinned.array.sharding.memory_kind)

# %% [markdown]
# Gathering a batch's rows on the host gives exactly what the layer's own lookup reads.
# The model takes such pre-gathered rows through `engram_rows={layer: rows [B, T, d_mem]}`
# instead of hashed row ids (`engram_ids`), with identical logits.

# %%
batch = next(train_batches)
ids = batch["engram_ids"][LAYER]                        # [B, T, H] hashed per-head ids
flat = flat_rows_np(ids, offsets)                       # + head offsets, int64
want = np.asarray(engram.lookup(jnp.asarray(ids)))      # [B, T, H * d_h]
for host in (host_numpy, host_pinned):
  rows = host.gather(flat)                              # [B, T, H, d_h] on the device
  assert np.array_equal(np.asarray(rows).reshape(want.shape), want)
print("host gathers == device lookup:", want.shape)


@nnx.jit
def forward(model, tokens, engram_ids=None, engram_rows=None):
  return model(tokens, engram_ids, engram_rows=engram_rows)[0]


rows = host_numpy.gather(flat).reshape(want.shape)
logits_host = forward(model, batch["tokens"], engram_rows={LAYER: rows})
logits_device = forward(model, batch["tokens"], engram_ids={LAYER: ids})
print("logits equal:", bool(jnp.array_equal(logits_host, logits_device)))
moved = rows.nbytes
print(f"bytes moved for this batch: {moved / 2**10:.0f} KiB, "
      f"{moved / table.nbytes:.1%} of the table")

# %% [markdown]
# ## 2. The prefetch pipeline
#
# `RowPrefetcher` wraps the batch iterator (the row ids were already hashed by the input
# pipeline). A background thread gathers every host-placed layer's rows and waits for their
# copy to the device, up to `depth` batches ahead of the consumer, which receives
# `(batch, {layer: rows})` in the input order. Below, the same forward pass runs over 16
# batches with the gathers inline and with the prefetcher. On a CPU expect no gain: the
# "copy" is a memcpy and the thread competes for the same cores as the computation.

# %%
N = 16
batches = list(itertools.islice(train_batches, N))
forward(model, batches[0]["tokens"], engram_rows={LAYER: rows}).block_until_ready()

t0 = time.perf_counter()
for b in batches:
  r = host_numpy.gather(flat_rows_np(b["engram_ids"][LAYER], offsets))
  forward(model, b["tokens"], engram_rows={LAYER: r.reshape(want.shape)}).block_until_ready()
inline = time.perf_counter() - t0

t0 = time.perf_counter()
outputs = []
with RowPrefetcher(iter(batches), {LAYER: host_numpy}, offsets={LAYER: offsets}, depth=2) as pf:
  for b, engram_rows in pf:                   # rows are already [B, T, H * d_h] on the device
    outputs.append(forward(model, b["tokens"], engram_rows=engram_rows).block_until_ready())
prefetched_time = time.perf_counter() - t0
print(f"{N} steps: inline gathers {inline * 1e3:.0f} ms, prefetched {prefetched_time * 1e3:.0f} ms")
assert jnp.array_equal(outputs[0], forward(model, batches[0]["tokens"],
                                           engram_ids=batches[0]["engram_ids"]))

# %% [markdown]
# For training, the rows of batch t+1 are read before step t's sparse update of the host
# table lands; `patch_updated_rows` re-reads just the rows both steps touch (see
# `engram_jax/offload/prefetch.py`). Inference needs no patching.
#
# ## 3. The hot-row cache
#
# Count how often every row is read on some training batches, keep the most frequent 5% of
# the rows on the device, and serve held-out (validation) batches from it: hits are read
# from the device cache, only the distinct missing rows are gathered from the host.

# %%
count_batches = list(itertools.islice(train_batches, 100))
counts = count_row_frequencies(
    (flat_rows_np(b["engram_ids"][LAYER], offsets) for b in count_batches), host_numpy.num_rows)
print(f"{counts.sum():,} lookups on {len(count_batches)} batches touched "
      f"{(counts > 0).mean():.1%} of the {host_numpy.num_rows:,} rows")

cache = HotRowCache.from_frequencies(host_numpy, counts, fraction=0.05)
val_batches = make_eval_batches(data, tokenizer, row_hasher=row_hasher)
for b in val_batches:
  vflat = flat_rows_np(b["engram_ids"][LAYER], offsets)
  got = cache.lookup(vflat)
  assert np.array_equal(np.asarray(got), np.asarray(host_numpy.gather(vflat)))
print(f"cache of {cache.capacity:,} rows ({cache.capacity / host_numpy.num_rows:.0%} of the "
      f"table): hit rate {cache.hit_rate:.1%} on {cache.lookups:,} held-out lookups")

# %% [markdown]
# `measure_hit_rate` gives the same figure per n-gram order and for a range of cache sizes,
# ranking rows on one token stream and measuring on another. Bigrams repeat far more than
# trigrams, so their cache serves a larger share.

# %%
def token_rows(batches):
  for b in batches:
    yield b["tokens"]


fractions = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
rates = measure_hit_rate(token_rows(count_batches), row_hasher.hasher, fractions,
                         layer_id=LAYER, eval_stream=token_rows(val_batches),
                         compressor=compressor)
print("cache fraction " + " ".join(f"{f:>7.1%}" for f in fractions))
for name, by_fraction in rates.items():
  print(f"{name:>14} " + " ".join(f"{by_fraction[f]:7.1%}" for f in fractions))

fig, ax = plt.subplots(figsize=(5.5, 3.4))
for name, by_fraction in rates.items():
  ax.semilogx(fractions, [by_fraction[f] for f in fractions], "o-", label=name)
ax.set_xlabel("fraction of rows cached on the device")
ax.set_ylabel("held-out hit rate")
ax.set_ylim(0, 1)
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
plt.show()
# The "all" curve at 5% is the cache above, measured without document boundaries.
assert abs(rates["all"][0.05] - cache.hit_rate) < 0.02

# %% [markdown]
# Two caveats. The ranking here uses only 100 batches (~100k tokens), so many held-out
# n-grams were never seen and cannot be cached; `save_frequencies` / `load_frequencies`
# keep counts gathered on a much larger stream. And `measure_hit_rate` hashes each packed
# row as one sequence, while the pipeline stops n-grams at document boundaries: a small
# difference at the few positions after a document starts.
