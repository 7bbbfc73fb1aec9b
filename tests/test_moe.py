"""DeepSeek-V3 MoE: routing, dispatch modes, capacity drops, gradients, bias balancing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.layers.moe import (
  MoE,
  MoEConfig,
  RouterBias,
  router_bias_update,
  update_router_bias,
)

D = 16


def _rngs(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU; keeps the tests quick.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# Jitted: one compile per input signature is much cheaper than op-by-op eager compiles.
forward = nnx.jit(lambda module, x: module(x))


def _make(seed=0, dtype=jnp.float32, **overrides):
  cfg = {"num_experts": 4, "num_shared_experts": 1, "top_k": 2, "expert_hidden": 8}
  cfg.update(overrides)
  return MoE(MoEConfig(**cfg), D, dtype=dtype, param_dtype=dtype, rngs=_rngs(seed))


def _with_dispatch(moe, dispatch, capacity_factor=None):
  """Same weights and bias, another dispatch mode (MoE.config is static)."""
  cfg = {**vars(moe.config), "dispatch": dispatch}
  if capacity_factor is not None:
    cfg["capacity_factor"] = capacity_factor
  graphdef, state = nnx.split(moe)
  other = nnx.merge(graphdef, state)
  other.config = MoEConfig(**cfg)
  return other


def _reference(moe, x):
  """Token-by-token dense reference: shared + sum of gate * expert(x) over chosen experts."""
  tokens = np.asarray(x, np.float64).reshape(-1, D)
  router = np.asarray(moe.router[...], np.float64)
  bias = np.asarray(moe.router_bias[...], np.float64)
  wg, wu, wd = (np.asarray(w[...], np.float64) for w in (moe.w_gate, moe.w_up, moe.w_down))
  out = np.zeros_like(tokens)
  for n, tok in enumerate(tokens):
    s = 1 / (1 + np.exp(-(tok @ router)))
    chosen = np.argsort(-(s + bias), kind="stable")[: moe.config.top_k]
    gates = s[chosen] / s[chosen].sum() * moe.config.routed_scaling
    for e, g in zip(chosen, gates):
      gate = tok @ wg[e]
      out[n] += g * (gate / (1 + np.exp(-gate)) * (tok @ wu[e])) @ wd[e]
  if moe.shared is not None:
    out += np.asarray(moe.shared(jnp.asarray(tokens, jnp.float32)), np.float64)
  return out.reshape(x.shape)


def test_dropless_matches_dense_reference():
  moe = _make(num_experts=8, top_k=3, routed_scaling=2.5)
  x = _normal(1, (2, 5, D))
  y, stats = forward(moe, x)
  np.testing.assert_allclose(y, _reference(moe, x), rtol=1e-4, atol=1e-5)
  assert int(stats["tokens_per_expert"].sum()) == 2 * 5 * 3
  np.testing.assert_allclose(stats["load"].sum(), 1.0, rtol=1e-6)
  assert int(stats["dropped"]) == 0 and float(stats["balance_loss"]) == 0.0


def test_dispatch_modes_agree_when_nothing_is_dropped():
  moe = _make(num_experts=8, top_k=2)
  x = _normal(2, (2, 6, D))
  y_dropless, s_dropless = forward(moe, x)
  y_capacity, s_capacity = forward(_with_dispatch(moe, "capacity", capacity_factor=8.0), x)
  np.testing.assert_allclose(y_capacity, y_dropless, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s_capacity["tokens_per_expert"], s_dropless["tokens_per_expert"])
  assert int(s_capacity["dropped"]) == 0


def test_capacity_drops_are_counted_and_zeroed():
  # Router weights 0 => all affinities 0.5; the bias makes every token pick experts 0
  # (first) and 1 (second). 16 tokens, k=2, E=4, factor 1 => C = ceil(16*2/4) = 8, so
  # each expert keeps tokens 0..7 and drops 8..15: 2 * 8 = 16 dropped assignments.
  moe = _make(dispatch="capacity", capacity_factor=1.0)
  moe.router[...] = jnp.zeros_like(moe.router[...])
  moe.router_bias[...] = jnp.array([1.0, 0.5, 0.0, 0.0])
  assert moe.config.capacity(16) == 8
  x = _normal(3, (2, 8, D))
  y, stats = forward(moe, x)
  assert int(stats["dropped"]) == 16
  np.testing.assert_array_equal(stats["tokens_per_expert"], [16, 16, 0, 0])
  np.testing.assert_allclose(stats["load"], [0.5, 0.5, 0.0, 0.0])
  tokens = x.reshape(16, D)
  y = y.reshape(16, D)
  shared_only = moe.shared(tokens)
  y_dropless, _ = forward(_with_dispatch(moe, "dropless"), x)
  np.testing.assert_allclose(y[:8], y_dropless.reshape(16, D)[:8], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y[8:], shared_only[8:], rtol=1e-5, atol=1e-6)
  assert not np.allclose(y[:8], shared_only[:8], atol=1e-3)


def _directional_check(loss, args, grads, direction, eps=1e-6):
  """Central finite difference of loss along `direction` vs <grads, direction>."""
  pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
  analytic = sum(np.vdot(np.asarray(g), v) for g, v in pairs)

  def shifted(sign):
    return jax.tree.map(lambda a, v: np.asarray(a) + sign * eps * v, args, direction)

  numeric = (loss(*shifted(1.0)) - loss(*shifted(-1.0))) / (2 * eps)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def _probe_loss(graphdef, rest, probe):
  @jax.jit
  def loss(params, x):
    y, stats = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y * probe) + stats["balance_loss"]

  return loss


def test_gradients_float64_match_finite_differences_and_agree_across_dispatch():
  # Nothing is dropped (C = ceil(4 * 5 * 2 / 4) = 10 >= 5 tokens), so both dispatch
  # modes compute the same function and must have the same gradient.
  with jax.enable_x64(True):
    dropless = _make(dtype=jnp.float64, capacity_factor=4.0, balance_loss_weight=0.1)
    x = _normal(4, (1, 5, D), jnp.float64)
    probe = _normal(5, (1, 5, D), jnp.float64)
    rng = np.random.default_rng(6)
    all_grads = []
    for moe in (dropless, _with_dispatch(dropless, "capacity")):
      graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
      loss = _probe_loss(graphdef, rest, probe)
      args = (params, x)
      grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args)
      random_dir = jax.tree.map(lambda a: rng.standard_normal(a.shape), args)
      # The router only gets gradient through the gates and the balance loss: check
      # it on its own so the (larger) expert terms cannot hide an error there.
      router_dir = jax.tree.map(np.zeros_like, random_dir)
      router_dir[0]["router"] = random_dir[0]["router"]
      _directional_check(loss, args, grads, random_dir)
      _directional_check(loss, args, grads, router_dir)
      assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
      assert np.abs(grads[0]["router"][...]).max() > 0
      all_grads.append(grads)
    for a, b in zip(*map(jax.tree.leaves, all_grads), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_bias_changes_selection_but_not_gate_normalization():
  moe = _make(num_experts=8, top_k=2, routed_scaling=2.0)
  x = _normal(7, (12, D))
  ids_before, _, affinities = moe.route(x)
  moe.router_bias[...] = jnp.zeros(8).at[5].set(10.0)
  ids, gates, affinities_after = moe.route(x)
  np.testing.assert_array_equal(affinities_after, affinities)  # bias not in affinities
  assert bool(jnp.all(jnp.any(ids == 5, axis=-1)))  # bias forces expert 5
  assert bool(jnp.any(ids != ids_before))
  chosen = jnp.take_along_axis(affinities, ids, axis=-1)
  np.testing.assert_allclose(gates, 2.0 * chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(gates.sum(-1), 2.0, rtol=1e-6)


def test_router_bias_is_not_a_param():
  moe = _make()
  assert isinstance(moe.router_bias, RouterBias)
  assert not isinstance(moe.router_bias, nnx.Param)
  param_paths = {path for path, _ in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
  assert ("router_bias",) not in param_paths and ("router",) in param_paths
  assert moe.w_gate.out_sharding == ("experts", "embed", "expert_mlp")
  assert moe.w_down.out_sharding == ("experts", "expert_mlp", "embed")
  assert moe.router.out_sharding == ("embed", "experts")


def test_router_bias_update_rule():
  bias = jnp.zeros(4)
  new = router_bias_update(bias, jnp.array([0.5, 0.25, 0.25, 0.0]), 0.1)
  np.testing.assert_allclose(new, [-0.1, 0.0, 0.0, 0.1])
  with pytest.raises(ValueError, match="load shape"):
    router_bias_update(bias, jnp.ones(3), 0.1)


def test_bias_updates_move_load_toward_balance():
  moe = _make(num_experts=4, top_k=1, bias_update_rate=0.02)
  # Inputs with a positive mean and a raised router column: expert 0 wins most tokens.
  moe.router[...] = moe.router[...].at[:, 0].add(0.5)
  x = _normal(8, (64, D)) + 0.5
  route = nnx.jit(lambda m, x: m.route(x)[0])

  def load():
    ids = route(moe, x)
    return jnp.bincount(ids.reshape(-1), length=4) / ids.size

  initial = load()
  assert float(initial.max()) > 0.6
  for _ in range(60):
    update_router_bias(moe, load())
  final = load()
  assert float(final.max()) < 0.45
  assert float(jnp.abs(final - 0.25).sum()) < 0.5 * float(jnp.abs(initial - 0.25).sum())
  assert float(moe.router_bias[...][0]) < 0  # the overloaded expert was pushed down


def test_balance_loss_matches_formula():
  moe = _make(num_experts=4, top_k=2, balance_loss_weight=0.3)
  x = _normal(9, (2, 5, D))
  _, stats = forward(moe, x)
  ids, _, s = moe.route(x.reshape(10, D))
  ids, s = np.asarray(ids).reshape(2, 5, 2), np.asarray(s, np.float64).reshape(2, 5, 4)
  expected = 0.0
  for b in range(2):
    f = np.array([(ids[b] == e).sum() for e in range(4)]) * 4 / (2 * 5)
    p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
    expected += (f * p).sum() / 2
  np.testing.assert_allclose(stats["balance_loss"], 0.3 * expected, rtol=1e-5)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"top_k": 5}, "top_k"),
    ({"num_experts": 0}, "num_experts"),
    ({"expert_hidden": -3}, "expert_hidden"),
    ({"num_shared_experts": -1}, "num_shared_experts"),
    ({"dispatch": "sparse"}, "dispatch"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"routed_scaling": 0.0}, "routed_scaling"),
    ({"balance_loss_weight": -1.0}, "balance_loss_weight"),
  ],
)
def test_bad_config_raises(overrides, message):
  cfg = {"num_experts": 4, "num_shared_experts": 1, "top_k": 2, "expert_hidden": 8}
  cfg.update(overrides)
  with pytest.raises(ValueError, match=message):
    MoEConfig(**cfg)
