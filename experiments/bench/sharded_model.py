r"""Benchmark of the Engram model's row-sharded lookup inside a whole training step.

Times the forward+backward pass of an engram_moe Transformer whose Engram tables are split by
rows over the `tensor` mesh axis, with `ModelConfig.engram_sharded_lookup` = "xla" (XLA
partitions the layer's gather) and "all_to_all" (explicit routing), and prints the ratio
(> 1: all_to_all faster). Both variants are built from the same parameters and checked to
give the same loss before timing.

  # CPU smoke run on 8 virtual devices (timings say nothing about GPU interconnects):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m experiments.bench.sharded_model --preset=cpu
  # a multi-GPU host: 2-way data x 4-way tensor
  python -m experiments.bench.sharded_model --preset=gpu --data=2 --tensor=4
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from engram_jax import EngramConfig
from engram_jax import sharding as S
from engram_jax.layers.moe import MoEConfig
from engram_jax.models import ModelConfig, Transformer
from experiments.bench.shared import backbone
from experiments.bench.timing import time_fn

_PRESET = flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"], "Model and batch size.")
_DATA = flags.DEFINE_integer("data", 2, "Size of the 'data' mesh axis.")
_TENSOR = flags.DEFINE_integer("tensor", 4, "Size of the 'tensor' axis (table rows).")
_ITERS = flags.DEFINE_integer("iters", 0, "Timed iterations (0: preset default).")

PRESETS = {
  # (hidden, layers, engram vocab per order, embed per n-gram, heads per n-gram, batch, seq,
  #  iters)
  "cpu": dict(hidden=128, layers=4, vocab=200_000, n_embed=128, n_head=4, batch=8, seq=256, iters=5),
  "gpu": dict(hidden=1024, layers=8, vocab=5_000_000, n_embed=640, n_head=8, batch=32, seq=2048, iters=10),
}


def model_config(p: dict, method: str, tensor: int) -> ModelConfig:
  heads = {"n_embed_per_ngram": p["n_embed"], "n_head_per_ngram": p["n_head"]}
  engram = EngramConfig(vocab_sizes=(p["vocab"],) * 2, **heads, layer_ids=(1, p["layers"] // 2), pad_id=0)
  moe = MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=p["hidden"])
  h = p["hidden"]
  model = backbone(4096, h, p["layers"], 8, 4, h // 8, 4 * h)
  return ModelConfig(**model, moe=moe, engram=engram, engram_row_multiple=tensor, engram_sharded_lookup=method)


def main(argv):
  del argv
  p = dict(PRESETS[_PRESET.value])
  iters = _ITERS.value or p["iters"]
  mesh = S.make_mesh(data=_DATA.value, tensor=_TENSOR.value)
  print(
    f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}, "
    f"mesh {dict(mesh.shape)}, preset {_PRESET.value}, iters {iters}"
  )
  base = model_config(p, "all_to_all", _TENSOR.value)
  model = S.create_sharded(lambda: Transformer(base, rngs=nnx.Rngs(0)), mesh)
  state = nnx.state(model)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, base.vocab_size, (p["batch"], p["seq"])), jnp.int32)
  engram = model.blocks[1].engram
  rows = {
    layer: jnp.asarray(
      rng.integers(
        0, np.asarray(model.blocks[layer].engram.table_sizes), (p["batch"], p["seq"], engram.config.num_heads)
      ),
      jnp.int32,
    )
    for layer in base.engram.layer_ids
  }
  table_rows = sum(model.blocks[layer].engram.table.shape[0] for layer in base.engram.layer_ids)
  print(
    f"Engram tables: {table_rows:,} rows x {engram.config.head_dim} "
    f"({S.num_shards(engram.table)} row shards), {p['batch']}x{p['seq']} tokens per step"
  )

  results = {}
  for method in ("xla", "all_to_all"):
    graphdef = nnx.graphdef(
      nnx.eval_shape(lambda m=method: Transformer(model_config(p, m, _TENSOR.value), rngs=nnx.Rngs(0)))
    )

    def loss(s, t, r, graphdef=graphdef):
      logits = nnx.merge(graphdef, s)(t, r)[0]
      return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))

    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      step = jax.jit(jax.value_and_grad(loss)).lower(state, tokens, rows).compile()
      compile_s = time.perf_counter() - t0
      value, _ = step(state, tokens, rows)
      seconds = time_fn(lambda: step(state, tokens, rows), iters=iters)
    results[method] = (float(value), seconds)
    print(
      f"  {method:<11} fwd+bwd {seconds * 1e3:9.2f} ms   "
      f"{p['batch'] * p['seq'] / seconds:12,.0f} tok/s   (compile {compile_s:.1f} s, "
      f"loss {float(value):.6f})"
    )
  (loss_x, t_x), (loss_a, t_a) = results["xla"], results["all_to_all"]
  if not np.isclose(loss_x, loss_a, rtol=1e-5):
    raise SystemExit(f"the two methods disagree: loss {loss_x} vs {loss_a}")
  print(f"speedup all_to_all / xla: {t_x / t_a:.2f}x")


if __name__ == "__main__":
  app.run(main)
