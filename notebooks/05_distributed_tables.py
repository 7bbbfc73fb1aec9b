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
# # 05 · Engram tables split across devices
#
# When a table outgrows one device, the paper splits it by rows over the GPUs: each device
# sends every row id to the device that owns the row (an all-to-all), the owners gather
# locally, and the rows come back the same way; gradients travel the reverse route. This
# notebook runs that on 8 virtual CPU devices:
#
# 1. how much table each device holds as the device count grows;
# 2. the routed lookup (`engram_jax.distributed.sharded_gather`) against a plain gather;
# 3. a model whose Engram table is split over the mesh, trained one step with the routed
#    lookup and with XLA's partitioned gather, both equal to one device.
#
# On a real machine the same code runs on GPUs; see docs/DISTRIBUTED.md for the commands
# (one GPU, a multi-GPU host, many hosts with `jax.distributed`).

# %%
import os

# 8 virtual CPU devices; must be set before JAX starts (a GPU machine needs nothing here).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from IPython.display import Markdown, display

from engram_jax import EngramConfig
from engram_jax import sharding as S
from engram_jax.distributed import capacity_table_markdown, sharded_gather
from engram_jax.models import ModelConfig, Transformer

print(jax.device_count(), "devices:", jax.devices()[0].platform)

# %% [markdown]
# ## 1. Memory per device
#
# A table split evenly by rows needs 1/n of its bytes on each of n devices (plus its Adam
# moments when trained). For the paper's Engram-27B table (5.79B parameters) and a 100B one:

# %%
display(Markdown(capacity_table_markdown()))

# %% [markdown]
# ## 2. The routed lookup
#
# A mesh of 2 data-parallel x 4 model-parallel devices. The table's rows are split over
# `tensor`; each data shard brings its own token ids. `sharded_gather` buckets the ids by
# owner, exchanges them with `all_to_all`, gathers on the owner and sends the rows back.

# %%
mesh = S.make_mesh(data=2, tensor=4)
rng = np.random.default_rng(0)
table = jnp.asarray(rng.standard_normal((4096, 16)), jnp.float32)          # [R, d]
ids = jnp.asarray(rng.integers(0, 4096, (8, 32, 4)), jnp.int32)            # [B, T, H]

routed = jax.jit(lambda t, i: sharded_gather(t, i, mesh=mesh, method="all_to_all"))
xla = jax.jit(lambda t, i: sharded_gather(t, i, mesh=mesh, method="xla"))
rows = routed(table, ids)
np.testing.assert_array_equal(np.asarray(rows), np.asarray(table)[np.asarray(ids)])
np.testing.assert_array_equal(np.asarray(xla(table, ids)), np.asarray(rows))
print("rows", rows.shape, "split like the ids:", rows.sharding.spec)
hlo = routed.lower(table, ids).as_text()
print("all_to_all collectives in the routed program:", hlo.count("all_to_all"))

# %% [markdown]
# The gradient goes the reverse way (a `custom_vjp`): each row's gradient lands on its
# owner, summed over duplicates and over the data-parallel replicas.

# %%
weight = jnp.asarray(rng.standard_normal(ids.shape + (16,)), jnp.float32)
grad = jax.jit(jax.grad(lambda t: jnp.sum(sharded_gather(t, ids, mesh=mesh) * weight)))(table)
want = np.zeros(table.shape, np.float32)
np.add.at(want, np.asarray(ids).reshape(-1), np.asarray(weight).reshape(-1, 16))
np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-5)
print("table gradient equals the single-device scatter-add; split as", grad.sharding.spec)

# %% [markdown]
# ## 3. A model with a split table
#
# `ModelConfig.engram_sharded_lookup` picks the route inside the model ("all_to_all", the
# default, or "xla": XLA partitions the layer's gather, as MaxText does), and
# `engram_table_sharding` the layout: rows over `tensor` ("tensor") or over every device of
# the mesh, data axes included ("all", the paper's layout). `engram_row_multiple` pads the
# rows so they divide evenly.

# %%
engram = EngramConfig(vocab_sizes=(100, 200), n_embed_per_ngram=16, n_head_per_ngram=2,
                      layer_ids=(1,), pad_id=0)


def config(lookup="all_to_all", layout="tensor"):
  return ModelConfig.tiny("engram_moe", engram=engram, engram_row_multiple=8,
                          engram_sharded_lookup=lookup, engram_table_sharding=layout)


tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, config().vocab_size)
row_ids = {1: jax.random.randint(jax.random.key(2), (4, 16, engram.num_heads), 0, 50)}


def loss(model, tokens, rows):
  return jnp.mean(jnp.square(model(tokens, rows)[0]))


one_device = Transformer(config(), rngs=nnx.Rngs(0))
want_loss, want_grads = nnx.jit(nnx.value_and_grad(loss))(one_device, tokens, row_ids)
want_table_grad = np.asarray(want_grads.blocks[1].engram.table[...])

results = []
for lookup, layout in (("all_to_all", "tensor"), ("xla", "tensor"), ("all_to_all", "all")):
  model = S.create_sharded(lambda: Transformer(config(lookup, layout), rngs=nnx.Rngs(0)), mesh)
  with jax.set_mesh(mesh):
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model, tokens, row_ids)
  table_grad = np.asarray(grads.blocks[1].engram.table[...])
  results.append((lookup, layout, S.num_shards(model.blocks[1].engram.table),
                  abs(float(value) - float(want_loss)),
                  float(np.abs(table_grad - want_table_grad).max())))

lines = ["| lookup | table layout | row shards | loss diff vs 1 device | max table-grad diff |",
         "|---|---|---:|---:|---:|"]
lines += [f"| {a} | {b} | {n} | {dl:.1e} | {dg:.1e} |" for a, b, n, dl, dg in results]
display(Markdown("\n".join(lines)))
assert all(dl < 1e-5 and dg < 1e-5 for *_, dl, dg in results), results

# %% [markdown]
# All three agree with one device up to float rounding. Which route is faster depends on the
# interconnect: `python -m experiments.bench.sharded_model` times a whole step with each
# (on 8 virtual CPU devices the routed lookup was 2.3x faster), and
# `python -m experiments.bench.sharded_lookup` the lookup alone. To train with it:
#
# ```bash
# python -m experiments.train --config=experiments/configs/small.py:engram --workdir=runs/s8 \
#     --config.mesh.data=4 --config.mesh.tensor=2
# # the paper's layout, tables over all 8 GPUs:
# python -m experiments.train --config=experiments/configs/small.py:engram --workdir=runs/s8_all \
#     --config.model.engram_table_sharding=all
# ```
