"""The model's Engram lookup on a row-sharded table (8 virtual CPU devices): the explicit
all_to_all route (`ModelConfig.engram_sharded_lookup="all_to_all"`, the default) and XLA's
partitioned gather ("xla") give the single-device loss and gradients, and really differ in
the program they compile to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import EngramConfig
from engram_jax import sharding as S
from engram_jax.models import ModelConfig, Transformer

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

ENGRAM = EngramConfig(vocab_sizes=(100, 200), n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=(1,), pad_id=0)
B, T = 4, 8


def _config(method: str, table_sharding: str = "tensor") -> ModelConfig:
  # 638 hashed rows padded to 640: divisible by the 2, 4 and 8 row shards below.
  return ModelConfig.tiny(
    "engram_moe",
    engram=ENGRAM,
    engram_row_multiple=8,
    engram_sharded_lookup=method,
    engram_table_sharding=table_sharding,
  )


def _abstract_model(method: str, table_sharding: str = "tensor") -> Transformer:
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: Transformer(_config(method, table_sharding), rngs=nnx.Rngs(0)))


def _loss(model, tokens, rows):
  logits = model(tokens, rows)[0]
  return jnp.mean(jnp.square(logits))


def _inputs(config):
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
  ids = jax.random.randint(jax.random.key(2), (B, T, ENGRAM.num_heads), 0, 50)
  ids = ids.at[0, 0].set(0).at[0, 1].set(0)  # duplicates: gradients accumulate
  return tokens, {1: ids}


@pytest.fixture(scope="module")
def single_device():
  config = _config("all_to_all")
  model = Transformer(config, rngs=nnx.Rngs(0))
  tokens, rows = _inputs(config)
  loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, tokens, rows)
  return nnx.state(model), tokens, rows, float(loss), grads


@needs_8
@pytest.mark.parametrize(
  "method,mesh_shape,table_sharding,row_shards",
  [
    ("all_to_all", dict(data=2, tensor=4), "tensor", 4),
    ("all_to_all", dict(data=2, fsdp=2, tensor=2), "tensor", 2),
    ("xla", dict(data=2, tensor=4), "tensor", 4),
    # the paper's layout: rows over all 8 devices, each data shard routes its own ids
    ("all_to_all", dict(data=2, tensor=4), "all", 8),
  ],
)
def test_sharded_model_matches_single_device(single_device, method, mesh_shape, table_sharding, row_shards):
  state, tokens, rows, want_loss, want_grads = single_device
  graphdef = nnx.graphdef(_abstract_model(method, table_sharding))
  mesh = S.make_mesh(**mesh_shape)
  if table_sharding == "tensor":
    sharded = S.shard_state(state, mesh)
  else:  # other logical names: build in place (same values as the single-device model)
    sharded = nnx.state(S.create_sharded(lambda: Transformer(_config(method, table_sharding), rngs=nnx.Rngs(0)), mesh))
  table = sharded["blocks"][1]["engram"]["table"].get_value()
  assert S.num_shards(table) == row_shards  # rows really are split

  def loss_and_grad(s, t, r):
    return jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef, s), t, r))(s)

  with jax.set_mesh(mesh):
    lowered = jax.jit(loss_and_grad).lower(sharded, tokens, rows)
    loss, grads = lowered.compile()(sharded, tokens, rows)
  # Before XLA partitions the program, only the explicit route has all_to_all collectives.
  assert ("all_to_all" in lowered.as_text()) == (method == "all_to_all")
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  for path in (("blocks", 1, "engram", "table"), ("blocks", 1, "engram", "value_kernel"), ("embed",)):
    got, want = grads, want_grads
    for key in path:
      got, want = got[key], want[key]
    np.testing.assert_allclose(
      np.asarray(got.get_value()), np.asarray(want.get_value()), rtol=2e-5, atol=1e-7, err_msg=str(path)
    )


@needs_8
def test_row_sharding_layout_follows_the_rules():
  engram = _abstract_model("all_to_all").blocks[1].engram
  xla = _abstract_model("xla").blocks[1].engram
  ids_shape = (B, T, ENGRAM.num_heads)
  assert engram.row_sharding(ids_shape) is None  # no mesh: local gather
  with jax.set_mesh(S.make_mesh(data=8)):
    assert engram.row_sharding(ids_shape) is None  # table not split
  with jax.set_mesh(S.make_mesh(data=2, fsdp=2, tensor=2)):
    layout = engram.row_sharding(ids_shape)
    assert layout["axis"] == ("tensor",) and layout["batch_axes"] == ("data", "fsdp")
    assert layout["mesh"].shape["tensor"] == 2
    assert engram.row_sharding((3, T, ENGRAM.num_heads))["batch_axes"] == ()  # 3 rows: replicated
    assert xla.row_sharding(ids_shape) is None


def test_bad_sharded_lookup_is_named():
  with pytest.raises(ValueError, match="engram_sharded_lookup"):
    _config("ragged")


@needs_8
def test_layer_with_pallas_gather_on_every_shard():
  """impl="pallas" under a row-splitting mesh: the routed lookup gathers on each shard with
  the Pallas kernel (interpret mode on CPU); output and table gradient equal one device."""
  from engram_jax.hashing import NgramHasher
  from engram_jax.layers.engram import Engram

  hasher = NgramHasher(ENGRAM, 300)
  d, sizes = 16, hasher.table_sizes[1]
  ids = jax.random.randint(jax.random.key(3), (4, 6, ENGRAM.num_heads), 0, min(sizes))
  hidden = jax.random.normal(jax.random.key(4), (4, 6, 1, d))

  def build(impl):
    return Engram(ENGRAM, 1, d, 1, table_sizes=sizes, impl=impl, row_multiple=8, rngs=nnx.Rngs(0))

  def loss_and_grad(module, h, i):
    return nnx.value_and_grad(lambda m: jnp.sum(jnp.square(m(h, i))))(module)

  want, want_grad = nnx.jit(loss_and_grad)(build("xla"), hidden, ids)
  mesh = S.make_mesh(data=2, tensor=4)
  module = S.shard_module(build("pallas"), mesh)
  assert S.num_shards(module.table) == 4
  with jax.set_mesh(mesh):
    got, grad = nnx.jit(loss_and_grad)(module, hidden, ids)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad.table[...]), np.asarray(want_grad.table[...]), rtol=1e-5, atol=1e-6)


def test_all_devices_table_keeps_its_optimizer_group():
  from engram_jax.train.optimizer import ENGRAM_TABLE, parameter_label

  for table_sharding, name in (("tensor", "engram_rows"), ("all", "engram_rows_all")):
    table = _abstract_model("all_to_all", table_sharding).blocks[1].engram.table
    assert table.get_metadata()["out_sharding"][0] == name
    assert parameter_label((), table) == ENGRAM_TABLE
