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
# # 01 · Tokenizer compression and n-gram hashing
#
# Engram's addresses are a pure function of the token ids: the ids are first **compressed**
# (token variants such as `Apple`, ` apple` and `APPLE` become one canonical id), then the
# last 2..N compressed ids at every position are **hashed** by several heads into prime-sized
# tables. This notebook
#
# 1. compresses a real tokenizer and shows which ids merge,
# 2. hashes a piece of text and shows that case variants land on the same rows,
# 3. measures hash collisions per head against the table size (and against the
#    random-function prediction), and why several heads per order help,
# 4. checks that the host (NumPy, int64) and device (JAX, 32-bit limbs) hashers agree bit
#    for bit, even with the paper's 64-bit multipliers.
#
# Everything here is NumPy on the host except the last section; it runs in seconds on a CPU.

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from tokenizers import Tokenizer

from engram_jax import EngramConfig, NgramHasher, TokenizerCompressor
from engram_jax.data import stdlib_files, train_bpe_tokenizer

# The notebook runs from the repository root or from notebooks/: find the root either way.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents)
            if (p / "pyproject.toml").is_file() and (p / "engram_jax").is_dir())
TESTDATA = ROOT.parent / "shared" / "testdata"
print("repo:", ROOT)

# %% [markdown]
# ## 1. Compressing a real tokenizer
#
# `compression_tokenizer.json` (in the golden test data) is a small byte-level BPE whose
# vocabulary is full of case, accent, width and whitespace variants. `TokenizerCompressor`
# decodes every id alone, normalizes the text (NFKC, NFD, strip accents, lowercase,
# collapse whitespace, strip) and gives ids with the same key one canonical id. Ids that
# decode to partial UTF-8 keep their raw token string as key.

# %%
tokenizer_path = TESTDATA / "compression_tokenizer.json"
if tokenizer_path.is_file():
  tokenizer = Tokenizer.from_file(str(tokenizer_path))
  source = tokenizer_path.name
else:  # no golden data next to the repo: a small BPE trained on the standard library
  texts = [p.read_text(encoding="utf-8", errors="replace") for _, p in stdlib_files(False)[:60]]
  tokenizer = train_bpe_tokenizer(texts, 1024)
  source = "a 1024-token BPE trained on stdlib text"
compressor = TokenizerCompressor.from_tokenizer(tokenizer)
print(f"{source}: {compressor.vocab_size} ids -> {compressor.num_compressed} compressed ids "
      f"({compressor.reduction:.1%} removed)")

# %% [markdown]
# The reference implementation's table for this tokenizer is stored next to it; ours is
# identical (the test suite checks the same thing).

# %%
expected_path = TESTDATA / "compression_expected.npz"
if tokenizer_path.is_file() and expected_path.is_file():
  expected = np.load(expected_path)
  assert np.array_equal(compressor.lookup_table, expected["lookup_table"])
  assert compressor.num_compressed == int(expected["num_compressed"])
  print("matches the reference lookup table")

# %% [markdown]
# The largest groups of raw ids that share one compressed id:

# %%
groups: dict[int, list[int]] = {}
for raw, canon in enumerate(compressor.lookup_table):
  groups.setdefault(int(canon), []).append(raw)
largest = sorted(groups.values(), key=len, reverse=True)[:8]
for ids in largest:
  shown = "  ".join(repr(tokenizer.decode([i])) for i in ids[:10])
  print(f"{len(ids)} ids:", shown + ("  ..." if len(ids) > 10 else ""))

# %% [markdown]
# ## 2. Hashing text
#
# A small Engram configuration: orders 2 and 3 (`max_ngram_size=3`), two heads per order,
# one Engram layer (block 1). Each head has its own prime modulus just above the nominal
# size; all heads of a layer share one flat table (head `h` starts at `offsets[h]`).
# `NgramHasher.from_compressor` maps the raw pad id through the compressor.

# %%
config = EngramConfig(vocab_sizes=(1000, 1000), max_ngram_size=3, n_embed_per_ngram=32,
                      n_head_per_ngram=2, layer_ids=(1,), pad_id=0)
hasher = NgramHasher.from_compressor(config, compressor)
print("multipliers:", hasher.multipliers[1])
print("table sizes (primes):", hasher.table_sizes[1], " offsets:", hasher.offsets[1])

# %%
def show_rows(text: str) -> np.ndarray:
  raw = np.asarray([tokenizer.encode(text).ids])
  compressed = compressor(raw)
  rows = hasher.hash(compressed)[1]          # [1, T, H] per-head rows, offsets not added
  print(f"{text!r}")
  print(f"  {'token':>10} {'raw':>5} {'comp':>5}   2-gram heads   3-gram heads")
  for t, tid in enumerate(raw[0]):
    r = rows[0, t]
    print(f"  {tokenizer.decode([int(tid)])!r:>10} {tid:5d} {compressed[0, t]:5d}   "
          f"{r[0]:5d} {r[1]:5d}    {r[2]:5d} {r[3]:5d}")
  return rows

a = show_rows("Hello World")
b = show_rows("HELLO world")

# %% [markdown]
# Different raw ids, same compressed ids, hence the same rows: the memory sees both spellings
# as one n-gram. The first position's 2-gram is (pad, token): positions before the start read
# the compressed pad id. In packed batches `hash(ids, segment_ids)` also stops n-grams at
# document boundaries.

# %%
if a.shape == b.shape:
  print("same rows for both spellings:", bool(np.array_equal(a, b)))

# %% [markdown]
# ## 3. Collisions per head versus table size
#
# A head maps every distinct n-gram to `mix mod p`. With M distinct n-grams and a random
# function into p rows, an n-gram shares its row with at least one other n-gram with
# probability `1 - (1 - 1/p)^(M-1)`. We count the distinct 2- and 3-grams of some Python
# source (tokenized with a BPE trained here on the standard library, compressed) and
# measure, per head, the fraction of them that collide, for several table sizes.
#
# Several heads per order are the answer to collisions: two n-grams are confused only if
# they collide in **every** head of their order (the concatenated rows differ otherwise).

# %%
t0 = time.perf_counter()
files = stdlib_files(include_tests=False)
texts = [p.read_text(encoding="utf-8", errors="replace") for _, p in files[::10][:150]]
code_tokenizer = train_bpe_tokenizer(texts, 2048)
code_compressor = TokenizerCompressor.from_tokenizer(code_tokenizer)
ids = np.concatenate([np.asarray(e.ids) for e in code_tokenizer.encode_batch(texts)])
ids = code_compressor(ids)[None]                 # one long row [1, T] of compressed ids
print(f"{ids.shape[1]:,} tokens, {code_compressor.num_compressed} compressed ids "
      f"({code_compressor.reduction:.1%} removed), {time.perf_counter() - t0:.1f}s")


# %%
def distinct_ngrams(ids: np.ndarray, order: int, pad: int) -> np.ndarray:
  """First position of every distinct n-gram of `order` in ids [1, T]."""
  cols = [np.concatenate([np.full(j, pad), ids[0, :ids.shape[1] - j]]) for j in range(order)]
  _, first = np.unique(np.stack(cols, 1), axis=0, return_index=True)
  return first


def collision_rates(nominal: int) -> dict[str, float]:
  cfg = config.replace(vocab_sizes=(nominal, nominal))
  h = NgramHasher.from_compressor(cfg, code_compressor)
  rows = h.hash(ids)[1][0]                     # [T, H]
  k = cfg.n_head_per_ngram
  out = {}
  for order in (2, 3):
    first = distinct_ngrams(ids, order, h.pad_id)
    heads = rows[first, (order - 2) * k:(order - 1) * k]   # [M, K] rows of distinct n-grams
    for j in range(k):
      _, inv, cnt = np.unique(heads[:, j], return_inverse=True, return_counts=True)
      out[f"order {order} head {j}"] = float(np.mean(cnt[inv] > 1))
    _, inv, cnt = np.unique(heads, axis=0, return_inverse=True, return_counts=True)
    out[f"order {order} all heads"] = float(np.mean(cnt[inv.reshape(-1)] > 1))
    out[f"order {order} M"] = len(first)
  return out


sizes = [1_000, 4_000, 16_000, 64_000, 256_000, 1_024_000]
stats = {n: collision_rates(n) for n in sizes}
m2, m3 = stats[sizes[0]]["order 2 M"], stats[sizes[0]]["order 3 M"]
print(f"distinct 2-grams: {m2:,}   distinct 3-grams: {m3:,}")
print(f"{'rows/head':>10} {'2g head0':>9} {'2g head1':>9} {'2g both':>9} {'3g head0':>9} "
      f"{'3g both':>9} {'3g random':>9}")
for n in sizes:
  s = stats[n]
  print(f"{n:>10,} {s['order 2 head 0']:9.4f} {s['order 2 head 1']:9.4f} "
        f"{s['order 2 all heads']:9.5f} {s['order 3 head 0']:9.4f} {s['order 3 all heads']:9.5f} "
        f"{1 - (1 - 1 / n) ** (m3 - 1):9.4f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
for order, m, color in ((2, m2, "C0"), (3, m3, "C1")):
  ax.loglog(sizes, [stats[n][f"order {order} head 0"] for n in sizes], "o-", color=color,
            label=f"order {order}, one head")
  ax.loglog(sizes, [max(stats[n][f"order {order} all heads"], 1e-6) for n in sizes], "s--",
            color=color, label=f"order {order}, both heads")
  ax.loglog(sizes, [1 - (1 - 1 / n) ** (m - 1) for n in sizes], ":", color=color, alpha=0.6,
            label=f"random fn into p rows, M={m:,}")
  ax.loglog(sizes, [max(1 - (1 - 1 / n**2) ** (m - 1), 1e-6) for n in sizes], "-.", color=color,
            alpha=0.4, label="random fn into p² rows")
ax.set_xlabel("rows per head (nominal)")
ax.set_ylabel("fraction of distinct n-grams colliding")
ax.legend(fontsize=7)
ax.set_title("Hash collisions per head")
fig.tight_layout()
plt.show()

# %% [markdown]
# One head follows the random-function curve closely. Two n-grams are only confused when
# they collide in both heads, and the pair of rows behaves like one random function into
# p0·p1 ≈ p² rows, while the tables hold only p0 + p1 rows: that is what multi-head hashing
# buys. (The plot's floor of 1e-6 stands for "no joint collision at all".)
#
# ## 4. Host and device hashers agree bit for bit
#
# `NgramHasher.hash` runs in the input pipeline with NumPy int64; `hash_jax` does the same
# arithmetic on the device, jit-able, with 32-bit limbs, so it is exact without
# `jax_enable_x64`. The paper's configuration (646,400 nominal rows, 8 heads, layers 1 and
# 15, a 100,000-id compressed vocabulary) has multipliers up to ~9e13, far outside int32,
# and products that need all 64 bits.

# %%
import jax

paper = EngramConfig()   # the paper's demo sizes
big_hasher = NgramHasher(paper, 100_000, pad_id=2)
print("multipliers of layer 1:", big_hasher.multipliers[1])
rng = np.random.default_rng(0)
batch = rng.integers(0, 100_000, size=(4, 256))
segments = np.cumsum(rng.random((4, 256)) < 0.02, axis=1)   # packed documents
for seg in (None, segments):
  host = big_hasher.hash(batch, seg)
  device = big_hasher.hash_jax(batch, seg)
  for layer in paper.layer_ids:
    assert np.array_equal(host[layer], np.asarray(device[layer]))
  print(f"segment_ids={'yes' if seg is not None else 'no '}: host == device for layers "
        f"{paper.layer_ids}, shape {host[1].shape}, device dtype {device[1].dtype}")

# %%
hash_jit = jax.jit(lambda x: big_hasher.hash_jax(x))
assert all(np.array_equal(big_hasher.hash(batch)[l], np.asarray(hash_jit(batch)[l]))
           for l in paper.layer_ids)
print("jitted device hash agrees too")
