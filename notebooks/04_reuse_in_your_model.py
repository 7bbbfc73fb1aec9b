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
# # 04 · Engram and the MoE block in your own Flax model
#
# `Engram` and `MoE` are plain Flax NNX modules with small config dataclasses; nothing ties
# them to this repository's Transformer. This notebook adds both to a small language model
# written from scratch with stock Flax layers,
#
# * in **NNX**: an embedding, a few pre-norm blocks (`nnx.MultiHeadAttention` + MLP), a
#   head; one block's MLP becomes an `MoE`, an `Engram` layer adds memory to the residual
#   stream before block 1; trained a few steps with optax;
# * in **Linen**: the same two layers inside an `nn.Module` through
#   `flax.nnx.bridge.to_linen`, trained with `jax.grad` on the Linen variables.
#
# What the host side has to provide: compressed token ids hashed into per-head row ids
# (`TokenizerCompressor` + `NgramHasher`), passed to the model next to the tokens.

# %%
import collections
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

from engram_jax import Engram, EngramConfig, NgramHasher, TokenizerCompressor
from engram_jax.data import special_ids, stdlib_files, train_bpe_tokenizer
from engram_jax.layers.moe import MoE, MoEConfig, router_bias_update, update_router_bias

# %% [markdown]
# ## Data: a BPE, the compressor and the hasher
#
# A 512-token byte-level BPE trained in a second on some standard-library modules. The
# Engram config names the block that holds the layer (`layer_ids`, also the seed of its
# hash multipliers) and the tokenizer's pad id (raw; `from_compressor` maps it).

# %%
texts = [p.read_text(encoding="utf-8", errors="replace")
         for _, p in stdlib_files(include_tests=False)[::25][:60]]
tokenizer = train_bpe_tokenizer(texts, 512)
compressor = TokenizerCompressor.from_tokenizer(tokenizer)
stream = np.concatenate([np.asarray(e.ids) for e in tokenizer.encode_batch(texts)])

engram_cfg = EngramConfig(vocab_sizes=(3001, 3001), max_ngram_size=3, n_embed_per_ngram=32,
                          n_head_per_ngram=2, layer_ids=(1,), pad_id=special_ids(tokenizer).pad)
hasher = NgramHasher.from_compressor(engram_cfg, compressor)
TABLE_SIZES = hasher.table_sizes[1]          # the prime size of each of the 4 heads
VOCAB, D, T, B = tokenizer.get_vocab_size(), 64, 64, 8
print(f"{len(stream):,} tokens, {compressor.num_compressed} compressed ids, "
      f"Engram heads {TABLE_SIZES.tolist()}")


def batches(seed=0):
  """Random windows of T + 1 tokens -> (inputs [B, T], targets [B, T], row ids [B, T, H])."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(stream) - T - 1, B)
    window = np.stack([stream[s:s + T + 1] for s in starts])
    inputs, targets = window[:, :-1], window[:, 1:]
    row_ids = hasher.hash(compressor(inputs))[1].astype(np.int32)
    yield inputs.astype(np.int32), targets.astype(np.int32), row_ids


# %% [markdown]
# ## NNX
#
# The user's model. Three changes turn it into an Engram + MoE model: an `Engram` module,
# `x = x + engram(x, row_ids)` before block 1, and an `MoE` in place of one block's MLP
# (it returns `(y, stats)`; `stats["load"]` drives the auxiliary-loss-free router balancing).

# %%
class Block(nnx.Module):
  def __init__(self, d: int, *, moe: MoEConfig | None = None, rngs: nnx.Rngs):
    self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, decode=False, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
    if moe is None:
      self.mlp = nnx.Sequential(nnx.Linear(d, 4 * d, rngs=rngs), nnx.gelu,
                                nnx.Linear(4 * d, d, rngs=rngs))
    else:
      self.mlp = MoE(moe, d, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.attn_norm(x), mask=mask)
    out = self.mlp(self.mlp_norm(x))
    y, stats = out if isinstance(self.mlp, MoE) else (out, None)
    return x + y, stats


class TinyLM(nnx.Module):
  def __init__(self, vocab: int, d: int, num_blocks: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    moe = MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=32,
                    dispatch="capacity")
    self.blocks = nnx.List([Block(d, moe=moe if i == 2 else None, rngs=rngs)
                            for i in range(num_blocks)])
    self.engram = Engram(engram_cfg, 1, d, table_sizes=TABLE_SIZES, rngs=rngs)  # block 1
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens, row_ids):
    x = self.embed(tokens)
    mask = nnx.make_causal_mask(tokens)
    router_load = None
    for i, block in enumerate(self.blocks):
      if i == 1:
        x = x + self.engram(x, row_ids)          # [B, T, D] + [B, T, D]
      x, stats = block(x, mask)
      if stats is not None:
        router_load = stats["load"]
    return self.head(self.norm(x)), router_load


model = TinyLM(VOCAB, D, 3, rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
print(f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, of which the Engram "
      f"table has {model.engram.table.size:,}")

# %% [markdown]
# The paper trains the Engram tables with Adam at 5x the backbone learning rate and without
# weight decay; `optax.multi_transform` with labels from the parameter paths does that. The
# router bias is an `nnx.Variable` but not an `nnx.Param`, so the optimizer leaves it alone
# and `update_router_bias` moves it after each step.

# %%
def param_labels(params):
  """'engram_table' for the Engram tables, 'backbone' for every other parameter."""
  def label(path, _):
    # The last attribute name; a state of nnx.Variables adds a trailing `.value` entry.
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return "engram_table" if names[-1] == "table" else "backbone"
  return jax.tree_util.tree_map_with_path(label, params)


lr = 3e-3
tx = optax.multi_transform(
    {"engram_table": optax.adam(5 * lr), "backbone": optax.adamw(lr, weight_decay=0.1)},
    param_labels)
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
groups = collections.Counter(jax.tree.leaves(param_labels(nnx.state(model, nnx.Param))))
print("parameter groups:", dict(groups))
assert groups["engram_table"] == 1


@nnx.jit
def train_step(model, optimizer, inputs, targets, row_ids):
  def loss_fn(model):
    logits, load = model(inputs, row_ids)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, load

  (loss, load), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  update_router_bias(model.blocks[2].mlp, load)
  return loss


t0 = time.perf_counter()
data = batches()
losses = [float(train_step(model, optimizer, *next(data))) for _ in range(30)]
print(f"NNX: loss {losses[0]:.2f} -> {np.mean(losses[-5:]):.2f} in 30 steps "
      f"({time.perf_counter() - t0:.1f}s); router bias {np.round(model.blocks[2].mlp.router_bias[...], 3)}")
assert np.mean(losses[-5:]) < losses[0]

# %% [markdown]
# The Engram table is a regular `nnx.Param` with logical axis names
# (`("engram_rows", "engram_dim")`) in its metadata, so a mesh and the rules in
# `engram_jax.sharding` can shard it by rows; the gates are available with
# `return_gates=True`:

# %%
inputs, targets, row_ids = next(data)
x = model.embed(inputs)
y, gates = model.engram(x, row_ids, return_gates=True)
print("table metadata:", model.engram.table.get_metadata().get("out_sharding"))
print("Engram output", y.shape, "gates", gates.shape, f"mean {float(gates.mean()):.3f}")

# %% [markdown]
# ## Linen
#
# `nnx.bridge.to_linen(Module, *args)` wraps an NNX module class as a Linen module: its
# parameters live in the Linen `params` collection (boxed with their NNX metadata), other
# variable types in collections named after them (the MoE's `RouterBias`).

# %%
moe_cfg = MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=32,
                    dispatch="capacity")
sizes = tuple(int(s) for s in TABLE_SIZES)


class LinenLM(nn.Module):
  vocab: int
  d: int

  @nn.compact
  def __call__(self, tokens, row_ids):
    x = nn.Embed(self.vocab, self.d)(tokens)
    x = x + nnx.bridge.to_linen(Engram, engram_cfg, 1, self.d, table_sizes=sizes,
                                name="engram")(x, row_ids)
    h = nn.LayerNorm()(x)
    x = x + nn.SelfAttention(num_heads=4)(h, mask=nn.make_causal_mask(tokens))
    y, stats = nnx.bridge.to_linen(MoE, moe_cfg, self.d, name="moe")(nn.LayerNorm()(x))
    x = x + y
    return nn.Dense(self.vocab)(nn.LayerNorm()(x)), stats["load"]


linen_model = LinenLM(VOCAB, D)
inputs, targets, row_ids = next(data)
variables = linen_model.init(jax.random.key(0), inputs, row_ids)
print("collections:", list(variables), " engram params:", sorted(variables["params"]["engram"]))

linen_tx = optax.adam(lr)
opt_state = linen_tx.init(variables["params"])


@jax.jit
def linen_step(variables, opt_state, inputs, targets, row_ids):
  def loss_fn(params):
    logits, load = linen_model.apply({**variables, "params": params}, inputs, row_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), load

  (loss, load), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  updates, opt_state = linen_tx.update(grads, opt_state, variables["params"])
  params = optax.apply_updates(variables["params"], updates)
  bias = jax.tree.map(lambda b: router_bias_update(b, load, moe_cfg.bias_update_rate),
                      variables["RouterBias"])
  return {**variables, "params": params, "RouterBias": bias}, opt_state, loss


t0 = time.perf_counter()
linen_losses = []
for _ in range(30):
  variables, opt_state, loss = linen_step(variables, opt_state, *next(data))
  linen_losses.append(float(loss))
print(f"Linen: loss {linen_losses[0]:.2f} -> {np.mean(linen_losses[-5:]):.2f} in 30 steps "
      f"({time.perf_counter() - t0:.1f}s)")
assert np.mean(linen_losses[-5:]) < linen_losses[0]

# %% [markdown]
# That is all the integration there is: the tokens' compressed n-grams hashed on the host,
# one module call in the residual stream. Next: notebook 03 moves the table to host memory
# and feeds the layer pre-gathered rows with `engram(x, engram_rows=...)`.
