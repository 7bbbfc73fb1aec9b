"""The Engram NNX layer: reference parity, gradients, errors, reuse in other models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from engram_jax import Engram, EngramConfig, NgramHasher
from engram_jax.interop import load_reference_engram
from tests.conftest import engram_config_from_meta, load_golden

GOLDEN, META = load_golden("engram_reference_forward")


def _reference_module(name):
  meta = META[name]
  cfg = engram_config_from_meta(meta)
  hasher = NgramHasher(cfg, meta["compressed_vocab"])
  layer = meta["layer_id"]
  module = Engram(
    cfg, layer, meta["hidden_size"], meta["hc_mult"], table_sizes=hasher.table_sizes[layer], rngs=nnx.Rngs(0)
  )
  prefix = f"{name}/param/"
  load_reference_engram(module, {k[len(prefix) :]: GOLDEN[k] for k in GOLDEN.files if k.startswith(prefix)})
  return module, hasher, layer


@pytest.mark.parametrize("name", ["hc4", "hc1"])
def test_forward_matches_reference(name):
  module, hasher, layer = _reference_module(name)
  row_ids = hasher.hash(GOLDEN[f"{name}/input_ids"])[layer]
  np.testing.assert_array_equal(row_ids, GOLDEN[f"{name}/hash_ids"])
  hidden = jnp.asarray(GOLDEN[f"{name}/hidden_states"], jnp.float32)
  y, gates = jax.jit(lambda h, r: module(h, r, return_gates=True))(hidden, row_ids)
  np.testing.assert_allclose(np.asarray(y), GOLDEN[f"{name}/output"], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(gates), GOLDEN[f"{name}/gates"][..., 0], atol=1e-5)
  # the device hasher feeds the same rows
  np.testing.assert_array_equal(np.asarray(hasher.hash_jax(GOLDEN[f"{name}/input_ids"])[layer]), row_ids)


def test_three_dim_hidden_when_single_branch():
  module, hasher, layer = _reference_module("hc1")
  row_ids = hasher.hash(GOLDEN["hc1/input_ids"])[layer]
  hidden = jnp.asarray(GOLDEN["hc1/hidden_states"], jnp.float32)
  y3 = module(hidden[:, :, 0], row_ids)
  assert y3.shape == hidden[:, :, 0].shape
  np.testing.assert_allclose(np.asarray(y3), GOLDEN["hc1/output"][:, :, 0], atol=1e-4)


def test_paper_gate_differs_from_reference_gate():
  module, hasher, layer = _reference_module("hc4")
  row_ids = hasher.hash(GOLDEN["hc4/input_ids"])[layer]
  hidden = jnp.asarray(GOLDEN["hc4/hidden_states"], jnp.float32)
  rows = module.lookup(row_ids)
  ref_gates = module.gates(hidden, rows)
  module.gate = "paper"
  paper_gates = module.gates(hidden, rows)
  # paper: sigmoid(s); reference: sigmoid(sign(s) sqrt|s|): invert and compare scores
  s_paper = jnp.log(paper_gates / (1 - paper_gates))
  s_ref = jnp.log(ref_gates / (1 - ref_gates))
  np.testing.assert_allclose(
    np.asarray(s_ref), np.asarray(jnp.sign(s_paper) * jnp.sqrt(jnp.maximum(jnp.abs(s_paper), 1e-6))), atol=1e-3
  )


def _tiny(hc=2, d=8, seed=0):
  cfg = EngramConfig(vocab_sizes=(13, 17), n_embed_per_ngram=4, n_head_per_ngram=2, layer_ids=(1,), pad_id=0)
  hasher = NgramHasher(cfg, 11)
  module = Engram(cfg, 1, d, hc, table_sizes=hasher.table_sizes[1], rngs=nnx.Rngs(seed))
  # non-zero conv so every path carries gradient
  module.conv_kernel[...] = 0.3 * jax.random.normal(jax.random.key(1), module.conv_kernel.shape)
  ids = np.random.default_rng(seed).integers(0, 11, (2, 7))
  hidden = jax.random.normal(jax.random.key(2), (2, 7, hc, d))
  return module, hasher.hash(ids)[1], hidden


def test_gradients_finite_and_match_finite_differences():
  module, row_ids, hidden = _tiny()
  graphdef, params = nnx.split(module, nnx.Param)

  @jax.jit
  def loss(p, h):
    m = nnx.merge(graphdef, p)
    return jnp.sum(jnp.sin(m(h, row_ids)))

  grads = jax.jit(jax.grad(loss))(params, hidden)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
  # directional finite difference along a random direction of all params
  direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), params)
  eps = 1e-3
  plus = jax.tree.map(lambda p, d: p + eps * d, params, direction)
  minus = jax.tree.map(lambda p, d: p - eps * d, params, direction)
  fd = (loss(plus, hidden) - loss(minus, hidden)) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  np.testing.assert_allclose(float(fd), float(analytic), rtol=2e-2)


def test_table_gradient_touches_only_looked_up_rows():
  module, row_ids, hidden = _tiny()
  graphdef, params = nnx.split(module, nnx.Param)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(hidden, row_ids) ** 2))(params)
  table_grad = np.asarray(grads["table"][...])
  touched = np.unique((row_ids + np.asarray(module.offsets)).ravel())
  nonzero = np.flatnonzero(np.abs(table_grad).sum(-1))
  assert set(nonzero.tolist()) <= set(touched.tolist())
  assert len(nonzero) > 0.9 * len(touched)


def test_segment_ids_keep_conv_inside_documents():
  module, row_ids, hidden = _tiny()
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]] * 2)
  y_packed = module(hidden, row_ids, segment_ids=seg)
  y_second = module(hidden[:, 3:], row_ids[:, 3:])
  np.testing.assert_allclose(np.asarray(y_packed[:, 3:]), np.asarray(y_second), atol=1e-5)
  assert not np.allclose(np.asarray(module(hidden, row_ids)[:, 3:]), np.asarray(y_second), atol=1e-5)


def test_conv_state_decoding_equals_full_sequence():
  module, row_ids, hidden = _tiny()
  rows = module.lookup(row_ids)
  y_full, g_full, _ = module.fuse(hidden, rows)
  state = module.init_conv_state(2)
  outs = []
  for t in range(hidden.shape[1]):
    y, _, state = module.fuse(hidden[:, t : t + 1], rows[:, t : t + 1], conv_state=state)
    outs.append(y)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y_full), atol=1e-5)


def test_zero_conv_init_means_output_is_gated_value():
  cfg = EngramConfig(vocab_sizes=(13, 17), n_embed_per_ngram=4, n_head_per_ngram=2, layer_ids=(1,))
  hasher = NgramHasher(cfg, 11, pad_id=0)
  module = Engram(cfg, 1, 8, 1, table_sizes=hasher.table_sizes[1], rngs=nnx.Rngs(0))
  assert not np.asarray(module.conv_kernel[...]).any()
  row_ids = hasher.hash(np.arange(10).reshape(2, 5))[1]
  hidden = jax.random.normal(jax.random.key(0), (2, 5, 8))
  y, gates = module(hidden, row_ids, return_gates=True)
  rows = module.lookup(row_ids)
  value = rows @ module.value_kernel[...] + module.value_bias[...]
  np.testing.assert_allclose(np.asarray(y), np.asarray(gates * value), atol=1e-6)


def test_parameters_carry_logical_axis_names():
  module, _, _ = _tiny()
  names = {path: v.get_metadata().get("out_sharding") for path, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}
  names = {"/".join(map(str, p)): n for p, n in names.items()}
  assert names["table"] == ("engram_rows", "engram_dim")
  assert names["key_kernel"] == ("hc", "engram_mem", "embed")
  assert names["conv_kernel"] == ("conv_taps", "hc", "embed")
  assert all(n is not None for n in names.values())


def test_bad_inputs_raise_clear_errors():
  module, row_ids, hidden = _tiny()
  bad = row_ids.copy()
  bad[0, 0, 1] = 10_000
  with pytest.raises(ValueError, match=r"row id 10000 at position \(0, 0, 1\) is outside head 1"):
    module(hidden, bad)
  with pytest.raises(ValueError, match="heads"):
    module(hidden, row_ids[..., :3])
  with pytest.raises(ValueError, match="hidden must be"):
    module(hidden[..., :5], row_ids)
  with pytest.raises(ValueError, match="only accepted when hc_mult == 1"):
    module(hidden[:, :, 0], row_ids)
  with pytest.raises(ValueError, match="exactly one"):
    module(hidden)
  cfg = module.config
  with pytest.raises(ValueError, match="not in EngramConfig.layer_ids"):
    Engram(cfg, 5, 8, table_sizes=[13] * 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="table_sizes"):
    Engram(cfg, 1, 8, table_sizes=[13] * 3, rngs=nnx.Rngs(0))


def test_reference_loader_rejects_mismatches():
  module, _, _ = _reference_module("hc1")
  prefix = "hc1/param/"
  sd = {k[len(prefix) :]: GOLDEN[k] for k in GOLDEN.files if k.startswith(prefix)}
  with pytest.raises(ValueError, match="missing"):
    load_reference_engram(module, {k: v for k, v in sd.items() if not k.startswith("value_proj.bias")})
  bad = dict(sd)
  bad["multi_head_embedding.offsets"] = sd["multi_head_embedding.offsets"] + 1
  with pytest.raises(ValueError, match="hash constants"):
    load_reference_engram(module, bad)


def test_prefetched_rows_equal_gathered_rows():
  module, row_ids, hidden = _tiny()
  np.testing.assert_array_equal(
    np.asarray(module(hidden, engram_rows=module.lookup(row_ids))), np.asarray(module(hidden, row_ids))
  )


class _TinyNNXModel(nnx.Module):
  """A user's own NNX model with an Engram layer in its residual stream."""

  def __init__(self, cfg, table_sizes, rngs):
    self.embed = nnx.Embed(11, 8, rngs=rngs)
    self.engram = Engram(cfg, 1, 8, table_sizes=table_sizes, rngs=rngs)
    self.out = nnx.Linear(8, 11, rngs=rngs)

  def __call__(self, tokens, row_ids):
    x = self.embed(tokens)
    x = x + self.engram(x, row_ids)
    return self.out(x)


def test_reuse_inside_a_plain_nnx_model_trains():
  cfg = EngramConfig(vocab_sizes=(13, 17), n_embed_per_ngram=4, n_head_per_ngram=2, layer_ids=(1,))
  hasher = NgramHasher(cfg, 11, pad_id=0)
  model = _TinyNNXModel(cfg, hasher.table_sizes[1], nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 11, (4, 9))
  row_ids = hasher.hash(tokens)[1]
  import optax

  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):
      logits = m(tokens[:, :-1], row_ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(15)]
  assert losses[-1] < losses[0] - 0.1


def test_reuse_inside_linen_through_bridge():
  cfg = EngramConfig(vocab_sizes=(13, 17), n_embed_per_ngram=4, n_head_per_ngram=2, layer_ids=(1,))
  hasher = NgramHasher(cfg, 11, pad_id=0)
  sizes = tuple(int(s) for s in hasher.table_sizes[1])

  class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, row_ids):
      engram = nnx.bridge.to_linen(Engram, cfg, 1, 8, table_sizes=sizes)
      return x + engram(x, row_ids)

  tokens = np.random.default_rng(0).integers(0, 11, (2, 6))
  row_ids = hasher.hash(tokens)[1]
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  block = LinenBlock()
  variables = block.init(jax.random.key(1), x, row_ids)
  y = block.apply(variables, x, row_ids)
  assert y.shape == x.shape and not np.allclose(np.asarray(y), np.asarray(x))
  grads = jax.grad(lambda v: jnp.sum(block.apply(v, x, row_ids) ** 2))(variables)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("hc", [1, 2])
def test_pallas_impl_equals_xla_in_interpret_mode(hc):
  """impl="pallas" runs the fused gather-gate kernel (interpret mode on CPU)."""
  module, row_ids, hidden = _tiny(hc=hc)
  y_xla, g_xla = module(hidden, row_ids, return_gates=True)
  module.impl = "pallas"
  y_k, g_k = module(hidden, row_ids, return_gates=True)
  np.testing.assert_allclose(np.asarray(y_k), np.asarray(y_xla), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(g_k), np.asarray(g_xla), atol=2e-6)
  graphdef, params = nnx.split(module, nnx.Param)

  def loss(p, impl):
    m = nnx.merge(graphdef, p)
    m.impl = impl
    return jnp.sum(m(hidden, row_ids) ** 2)

  g_ref, g_pallas = jax.grad(loss)(params, "xla"), jax.grad(loss)(params, "pallas")
  for name in ("table", "value_kernel", "key_kernel"):
    np.testing.assert_allclose(np.asarray(g_pallas[name][...]), np.asarray(g_ref[name][...]), atol=1e-4, rtol=1e-4)
