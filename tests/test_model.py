"""The decoder Transformer: all families train (forward + backward), Engram matters, G = 1 is
a plain pre-norm residual network, decoding with the cache matches the full forward, MoE bias
balancing, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import EngramConfig
from engram_jax.layers.moe import MoEConfig, RouterBias
from engram_jax.models import (
  engram_table,
  engram_table_filter,
  engram_table_layer,
  engram_table_path,
  engram_table_value,
)
from engram_jax.models.config import ModelConfig
from engram_jax.models.transformer import (
  Transformer,
  update_moe_biases,
  updated_router_biases,
)

B, T = 2, 8


def tiny(family, hc_mult=1, **kw):
  # Two blocks: block 0 dense, block 1 MoE (+ Engram for "engram_moe").
  return ModelConfig.tiny(family, hc_mult=hc_mult, num_layers=2, **kw)


def inputs(config, key=0):
  k1, k2 = jax.random.split(jax.random.key(key))
  tokens = jax.random.randint(k1, (B, T), 0, config.vocab_size)
  engram_ids = None
  if config.engram is not None:
    e = config.engram
    engram_ids = {lid: jax.random.randint(k2, (B, T, e.num_heads), 0, min(e.vocab_sizes)) for lid in e.layer_ids}
  return tokens, engram_ids


@nnx.jit
def forward(model, tokens, engram_ids):
  return model(tokens, engram_ids)


@nnx.jit
def train_step(model, tokens, engram_ids):
  """(loss, aux, grads, logits): one compilation per config, shared by several tests."""

  def loss_fn(model):
    logits, aux = model(tokens, engram_ids)
    targets = jnp.roll(tokens, -1, axis=1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
    return jnp.mean(nll) + aux["balance_loss"], (aux, logits)

  (loss, (aux, logits)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, aux, grads, logits


_MODELS = {}


def model_for(family, hc_mult):
  """One model per (family, hc_mult) for the whole module (reuses compilations)."""
  if (family, hc_mult) not in _MODELS:
    config = tiny(family, hc_mult)
    _MODELS[family, hc_mult] = (config, Transformer(config, rngs=nnx.Rngs(0)))
  return _MODELS[family, hc_mult]


@pytest.mark.parametrize("hc_mult", [1, 4])
@pytest.mark.parametrize("family", ["dense", "moe", "engram_moe"])
def test_forward_backward(family, hc_mult):
  config, model = model_for(family, hc_mult)
  tokens, engram_ids = inputs(config)
  loss, aux, grads, logits = train_step(model, tokens, engram_ids)
  assert logits.shape == (B, T, config.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(float(loss)) and 3.0 < float(loss) < 8.0  # ~log(128) at init
  flat = {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert all(np.isfinite(g).all() for g in flat.values())

  def grad_norm(fragment):
    hits = [np.abs(g).sum() for k, g in flat.items() if fragment in k]
    assert hits, f"no parameter matching {fragment!r}"
    return sum(hits)

  for name in ("embed", "q_proj", "o_proj", "w_down", "final_norm"):
    assert grad_norm(name) > 0, name
  if hc_mult > 1:
    assert grad_norm("phi") > 0 and grad_norm("alpha") > 0
  else:
    assert not any("phi" in k for k in flat)
  if config.moe is not None:
    assert set(aux["router"]) == {1}
    stats = aux["router"][1]
    assert int(stats["tokens_per_expert"].sum()) == B * T * config.moe.top_k
    assert grad_norm("router']") > 0
  if config.engram is not None:
    assert aux["engram_gates"][1].shape == (B, T, hc_mult)
    assert grad_norm("table") > 0 and grad_norm("value_kernel") > 0
  else:
    assert aux["engram_gates"] == {}


def test_engram_ids_change_logits():
  config, model = model_for("engram_moe", 4)
  tokens, engram_ids = inputs(config)
  logits = train_step(model, tokens, engram_ids)[3]
  other = {lid: (r + 1) % min(config.engram.vocab_sizes) for lid, r in engram_ids.items()}
  logits2 = train_step(model, tokens, other)[3]
  assert np.abs(np.asarray(logits - logits2)).max() > 1e-3
  # Pre-gathered rows (the host-offload path) are the same computation as row ids.
  lid = config.engram.layer_ids[0]
  engram_rows = {lid: model.blocks[lid].engram.lookup(engram_ids[lid])}
  offloaded = nnx.jit(lambda m, t, e: m(t, engram_rows=e)[0])(model, tokens, engram_rows)
  np.testing.assert_allclose(offloaded, logits, atol=1e-5)


def test_engram_row_errors():
  config, model = model_for("engram_moe", 4)
  tokens, engram_ids = inputs(config)
  with pytest.raises(ValueError, match=r"Engram layer 1 needs engram_ids\[1\]"):
    model(tokens)
  with pytest.raises(ValueError, match="not Engram layers"):
    model(tokens, {**engram_ids, 0: engram_ids[1]})
  with pytest.raises(ValueError, match="tokens must be"):
    model(tokens[0], engram_ids)


def test_engram_table_paths_name_exactly_the_tables():
  config, model = model_for("engram_moe", 4)
  (lid,) = config.engram_layer_ids
  state = nnx.state(model)
  table = engram_table(model, lid)
  assert engram_table_value(state, lid).get_value() is table.get_value()
  tables, rest = nnx.split_state(state, engram_table_filter(), ...)
  assert [tuple(p) for p, _ in nnx.to_flat_state(tables)] == [engram_table_path(lid)]
  assert not any(engram_table_layer(p) is not None for p, _ in nnx.to_flat_state(rest))
  empty, _ = nnx.split_state(state, engram_table_filter([0]), ...)
  assert not nnx.to_flat_state(empty)
  # jax key paths (tree_map_with_path over a State) name the same layer
  found = []
  jax.tree_util.tree_map_with_path(
    lambda p, v: found.append(engram_table_layer(p)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  assert [f for f in found if f is not None] == [lid]
  with pytest.raises(ValueError, match="block 0 has no Engram layer"):
    engram_table(model, 0)


def test_g1_model_is_a_plain_prenorm_residual_network():
  config, model = model_for("moe", 1)
  tokens, _ = inputs(config)

  @nnx.jit
  def by_hand(model, tokens):
    x = model.embed[...][tokens]
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    for block in model.blocks:
      x = x + block.attn(block.attn_norm(x), positions)[0]
      h = block.ffn_norm(x)
      x = x + (block.ffn(h)[0] if block.is_moe else block.ffn(h))
    return model.final_norm(x) @ model.head[...]

  logits = train_step(model, tokens, None)[3]
  np.testing.assert_allclose(logits, by_hand(model, tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,hc_mult", [("dense", 1), ("engram_moe", 4)])
def test_cached_decoding_matches_full_forward(family, hc_mult):
  config, model = model_for(family, hc_mult)
  tokens, engram_ids = inputs(config)
  full = train_step(model, tokens, engram_ids)[3]

  @nnx.jit
  def step(model, tokens, engram_ids, cache):
    return model(tokens, engram_ids, cache=cache)

  # Prefill 4 tokens, then 4 more in one call: both calls have T = 4 (one compilation).
  cache = model.init_cache(B, 16)
  half = lambda r, s: None if r is None else {k: v[:, s] for k, v in r.items()}
  first, aux = step(model, tokens[:, :4], half(engram_ids, slice(0, 4)), cache)
  second, aux = step(model, tokens[:, 4:], half(engram_ids, slice(4, 8)), aux["cache"])
  np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=2e-5)
  assert np.asarray(aux["cache"].lengths).tolist() == [8, 8]
  if config.engram is not None:
    assert set(aux["cache"].engram) == {1}


def test_moe_bias_updates_in_place_and_pure():
  config = tiny("moe")
  model = Transformer(config, rngs=nnx.Rngs(5))  # its own: the update mutates it
  tokens, _ = inputs(config)
  aux = train_step(model, tokens, None)[1]
  load = np.asarray(aux["router"][1]["load"])
  before = nnx.state(model, RouterBias)
  pure = updated_router_biases(before, aux["router"], rate=0.1)
  update_moe_biases(model, aux["router"], rate=0.1)
  bias = np.asarray(model.blocks[1].ffn.router_bias[...])
  expected = 0.1 * np.sign(load.mean() - load)
  np.testing.assert_allclose(bias, expected, atol=1e-7)
  assert np.abs(expected).sum() > 0  # this routing is not perfectly balanced
  pure_leaves = jax.tree.leaves(pure)
  assert len(pure_leaves) == 1
  np.testing.assert_allclose(pure_leaves[0], bias)
  with pytest.raises(ValueError, match="lacks MoE blocks"):
    update_moe_biases(model, {})


def test_config_validation_and_families():
  base = {
    "vocab_size": 64,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 4,
    "ffn_hidden": 32,
  }
  assert ModelConfig.dense(**base).family == "dense"
  moe = MoEConfig(4, 0, 1, 8)
  engram = EngramConfig(vocab_sizes=(11, 13), n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=(1,))
  assert ModelConfig.moe_model(moe, **base).family == "moe"
  config = ModelConfig.engram_moe(moe, engram, **base)
  assert config.family == "engram_moe" and config.moe_layer_ids == (1,)
  assert ModelConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="layer_ids"):
    ModelConfig.engram_moe(moe, engram.replace(layer_ids=(1, 5)), **base)
  with pytest.raises(ValueError, match="divisible by num_kv_heads"):
    ModelConfig.dense(**{**base, "num_kv_heads": 3})
  with pytest.raises(ValueError, match="needs moe"):
    ModelConfig.make("moe", **base)
  with pytest.raises(ValueError, match="hc_mult"):
    ModelConfig.dense(**base, hc_mult=0)
  with pytest.raises(ValueError, match="dtype"):
    ModelConfig.dense(**base, dtype="float64")
  with pytest.raises(ValueError, match="num_dense_layers"):
    ModelConfig.dense(**base, num_dense_layers=3)


def test_packed_documents_do_not_see_each_other():
  # Row [doc A (3 tokens) | doc B (5)] vs [doc B | doc A]: B's logits agree, so neither
  # attention nor the Engram short conv reaches across the document boundary.
  config, model = model_for("engram_moe", 4)
  tokens, engram_ids = inputs(config)
  swap = lambda a: jnp.concatenate([a[:, 3:], a[:, :3]], axis=1)
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]] * B)
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]] * B)
  run = nnx.jit(lambda m, t, r, s, p: m(t, r, segment_ids=s, positions=p)[0])
  packed = run(model, tokens, engram_ids, segments, positions)
  alone = run(model, swap(tokens), {k: swap(v) for k, v in engram_ids.items()}, swap(segments), swap(positions))
  np.testing.assert_allclose(packed[:, 3:], alone[:, :5], atol=1e-5)
  np.testing.assert_allclose(packed[:, :3], alone[:, 5:], atol=1e-5)
