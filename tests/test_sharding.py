"""Logical axis rules, meshes, sharded construction, and sharded == single-device forward.

Runs on 8 virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from engram_jax import sharding as S
from engram_jax.models.config import ModelConfig
from engram_jax.models.transformer import Transformer

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

MESHES = {"dp2_tp4": {"data": 2, "tensor": 4}, "dp2_fsdp2_ep2": {"data": 2, "fsdp": 2, "expert": 2}}
B, T = 4, 8


def test_logical_to_spec_rules():
  mesh = S.make_mesh(data=2, tensor=4) if jax.device_count() >= 8 else None
  if mesh is None:
    pytest.skip("needs 8 devices")
  # Each mesh axis used once per array: "embed" would take fsdp, but size-1 axes drop.
  assert S.logical_to_spec(("batch", "sequence", "embed"), mesh, (4, 8, 32)) == P("data", None, None)
  assert S.logical_to_spec(("vocab", "embed"), mesh, (128, 32)) == P("tensor", None)
  # tensor=4 does not divide 2 kv heads: that dimension is replicated instead.
  assert S.logical_to_spec(("embed", "kv_heads", "head_dim"), mesh, (32, 2, 8)) == P(None, None, None)
  assert S.logical_to_spec(("heads", "mlp"), mesh, (4, 64)) == P("tensor", None)  # used once
  with pytest.raises(ValueError, match="unknown logical axis name 'bogus'"):
    S.logical_to_spec(("bogus",), mesh)
  with pytest.raises(ValueError, match="do not match shape"):
    S.logical_to_spec(("vocab",), mesh, (4, 4))


def test_make_mesh():
  mesh = S.make_mesh(data=2, fsdp=2, expert=2) if jax.device_count() >= 8 else S.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
  assert np.prod(list(mesh.shape.values())) == len(mesh.devices.flat)
  with pytest.raises(ValueError, match="needs 1024 devices"):
    S.make_mesh(data=1024)
  with pytest.raises(ValueError, match="positive int"):
    S.make_mesh(tensor=0)


@needs_8
def test_abstract_sharded_and_input_shardings():
  config = ModelConfig.tiny("engram_moe")
  mesh = S.make_mesh(data=2, tensor=4)
  _, state = S.abstract_sharded(lambda: Transformer(config, rngs=nnx.Rngs(0)), mesh)
  table = state["blocks"][1]["engram"]["table"].get_value()
  assert isinstance(table, jax.ShapeDtypeStruct) and table.sharding.spec == P("tensor", None)
  tokens = S.named_sharding(("batch", "sequence"), mesh, (8, 16))
  assert tokens.spec == P("data", None)


def test_constrain_is_a_noop_without_mesh():
  x = jnp.ones((4, 8, 32))
  assert S.constrain(x, ("batch", "sequence", "activation_embed")) is x


@pytest.mark.parametrize("family", ["dense", "moe", "engram_moe", "engram_dense"])
def test_every_parameter_name_is_covered_by_the_rules(family):
  model = nnx.eval_shape(lambda: Transformer(ModelConfig.tiny(family, hc_mult=4), rngs=nnx.Rngs(0)))
  mesh = S.make_mesh()
  names = set()
  for _, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None, f"unannotated variable of shape {var.get_value().shape}"
    names.update(a for a in axes if a is not None)
    S.variable_sharding(var, mesh)  # raises on unknown names / rank mismatch
  assert {"vocab", "embed", "heads", "kv_heads", "mlp"} <= names
  if "engram" in family:
    assert {"engram_rows", "engram_dim"} <= names


# -------------------------------------------------------------------- sharded vs reference
_CASES = {}


def reference(family):
  """(config, model, tokens, rows, logits) on the default device, once per family."""
  if family not in _CASES:
    config = ModelConfig.tiny(family, num_layers=2)
    model = Transformer(config, rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(7))
    tokens = jax.random.randint(k1, (B, T), 0, config.vocab_size)
    rows = None
    if config.engram is not None:
      rows = {1: jax.random.randint(k2, (B, T, config.engram.num_heads), 0, 50)}
    logits = nnx.jit(lambda m, t, r: m(t, r)[0])(model, tokens, rows)
    _CASES[family] = (config, model, tokens, rows, logits)
  return _CASES[family]


@needs_8
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("family", ["dense", "moe", "engram_moe"])
def test_sharded_forward_matches_single_device(family, mesh_name):
  config, model, tokens, rows, want = reference(family)
  mesh = S.make_mesh(**MESHES[mesh_name])
  graphdef, state = nnx.split(model)
  sharded = nnx.merge(graphdef, S.shard_state(state, mesh))

  # Parameters really are partitioned as the rules say.
  embed = sharded.embed
  block = sharded.blocks[1]
  if mesh_name == "dp2_tp4":
    assert S.spec_of(embed) == P("tensor") and S.num_shards(embed) == 4
    assert S.spec_of(block.attn.q_proj) == P(None, "tensor")
    if config.engram is not None:
      assert S.spec_of(block.engram.table) == P("tensor")  # rows over the model axis
      assert S.num_shards(block.engram.table) == 4
    if config.moe is not None:
      assert S.spec_of(block.ffn.w_gate) == P(None, None, "tensor")
  else:
    assert S.spec_of(embed) == P(None, "fsdp")
    if config.engram is not None:
      assert S.num_shards(block.engram.table) == 1  # no tensor axis here
    if config.moe is not None:
      assert S.spec_of(block.ffn.w_gate) == P("expert", "fsdp")
      assert S.spec_of(block.ffn.w_down) == P("expert", None, "fsdp")
      assert S.num_shards(block.ffn.w_gate) == 4

  with jax.set_mesh(mesh):
    got = nnx.jit(lambda m, t, r: m(t, r)[0])(sharded, tokens, rows)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  assert S.num_shards(got) > 1  # the batch really was split


@needs_8
def test_create_sharded_builds_in_place_with_the_same_values():
  config = ModelConfig.tiny("dense", num_layers=1)
  mesh = S.make_mesh(data=2, tensor=4)
  model = S.create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(3)), mesh)
  assert S.spec_of(model.embed) == P("tensor") and S.num_shards(model.embed) == 4
  assert S.spec_of(model.blocks[0].ffn.w_up) == P(None, "tensor")
  # Same values as building on one device (jit and eager draw the same random numbers).
  plain = Transformer(config, rngs=nnx.Rngs(3))
  pairs = ((model.embed, plain.embed), (model.blocks[0].ffn.w_up, plain.blocks[0].ffn.w_up))
  for got, want in pairs:
    np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), rtol=1e-6)


@needs_8
def test_engram_row_multiple_makes_any_table_row_shardable():
  from engram_jax import EngramConfig

  # head primes 101 + 103 + 211 + 223 = 638 rows: not divisible by the 4 tensor shards
  engram = EngramConfig(vocab_sizes=(100, 200), n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=(1,), pad_id=0)
  mesh = S.make_mesh(data=2, tensor=4)
  tables = {}
  for multiple in (1, 8):
    cfg = ModelConfig.tiny("engram_moe", engram=engram, engram_row_multiple=multiple)
    # The target layout, without allocating (create_sharded places exactly these).
    _, state = S.abstract_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    tables[multiple] = state["blocks"][1]["engram"]["table"].get_value()
  assert tables[1].shape[0] == 638 and S.num_shards(tables[1]) == 1  # silently replicated
  assert tables[8].shape[0] == 640 and S.spec_of(tables[8]) == P("tensor")
  assert S.num_shards(tables[8]) == 4
