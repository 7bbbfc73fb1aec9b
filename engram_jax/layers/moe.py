"""DeepSeek-V3 mixture of experts: sigmoid router, auxiliary-loss-free balancing.

Shapes (B batch, T tokens, N = B*T, D hidden, E routed experts, k = top_k,
F = expert_hidden, C = capacity per expert):
  x              [B, T, D]
  router         [D, E]      logical axes ("embed", "experts")
  router_bias    [E]         RouterBias, NOT a Param: used only to choose experts
  w_gate, w_up   [E, D, F]   ("experts", "embed", "expert_mlp")
  w_down         [E, F, D]   ("experts", "expert_mlp", "embed")
  shared         SwiGLU(D, num_shared_experts * F), always on

Routing, per token: affinities s = sigmoid(x @ router) [E]; the k experts with the
largest s + router_bias are chosen; their gates are s of the chosen experts divided by
the sum over the chosen ones, times routed_scaling. The bias is tuned outside the
gradient (`update_router_bias`): raised for under-loaded experts, lowered for
over-loaded ones.

Dispatch:
  "dropless": the N*k assignments are sorted by expert and run as grouped matmuls
    (`jax.lax.ragged_dot`); nothing is dropped.
  "capacity": each expert takes at most C = ceil(capacity_factor * N * k / E)
    assignments through one-hot dispatch/combine einsums; first choices of all tokens
    take precedence over second choices, and so on (earlier tokens first within a
    rank). Overflow assignments are dropped (contribute zero) and counted. The
    dispatch/combine tensors are [N, E, C], i.e. O(N^2 k) memory: call it on
    token groups of modest size (e.g. per sequence) for long inputs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.config import check_float, check_int
from engram_jax.layers.ffn import SwiGLU
from engram_jax.layers.params import annotated

#: `MoEConfig.dispatch` values: "dropless" (sorted grouped matmuls, nothing dropped) and
#: "capacity" (at most C assignments per expert; see the module docstring).
DISPATCH_MODES = ("dropless", "capacity")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """MoE hyper-parameters (validated on construction)."""

  num_experts: int
  num_shared_experts: int
  top_k: int
  expert_hidden: int
  routed_scaling: float = 1.0
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  bias_update_rate: float = 1e-3
  balance_loss_weight: float = 0.0

  def __post_init__(self):
    for name in ("num_experts", "top_k", "expert_hidden"):
      check_int("MoEConfig", name, getattr(self, name), low=1)
    check_int("MoEConfig", "num_shared_experts", self.num_shared_experts, low=0)
    for name, low_open in (
      ("routed_scaling", True),
      ("capacity_factor", True),
      ("bias_update_rate", False),
      ("balance_loss_weight", False),
    ):
      check_float("MoEConfig", name, getattr(self, name), low=0.0, low_open=low_open)
    if self.top_k > self.num_experts:
      raise ValueError(f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
    if self.dispatch not in DISPATCH_MODES:
      raise ValueError(f"MoEConfig.dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")

  def capacity(self, num_tokens: int) -> int:
    """Per-expert capacity C = ceil(capacity_factor * num_tokens * top_k / E)."""
    return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)


class RouterBias(nnx.Variable):
  """Per-expert selection bias; not an nnx.Param, so `nnx.Param` optimizers skip it."""


def router_bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Auxiliary-loss-free update: bias + rate * sign(mean(load) - load), bias and load [E].

  Under-loaded experts get a larger bias (chosen more often). `load` may be
  fractions or counts per expert (only its sign relative to the mean matters).
  Pure function, for use inside jitted train steps.
  """
  if load.shape != bias.shape:
    raise ValueError(f"load shape {load.shape} must match router bias shape {bias.shape}")
  load = load.astype(jnp.float32)
  step = rate * jnp.sign(jnp.mean(load) - load)
  return (bias + step).astype(bias.dtype)


def update_router_bias(moe: MoE, load: jax.Array, rate: float | None = None) -> None:
  """In-place `router_bias_update` of moe.router_bias [E] from load [E] (rate defaults to the config's)."""
  rate = moe.config.bias_update_rate if rate is None else rate
  moe.router_bias.set_value(router_bias_update(moe.router_bias.get_value(), load, rate))


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Rows of lhs [M, K] sorted by group, times the group's rhs [G, K, N] -> [M, N].

  group_sizes [G] int32 sums to M. `ragged_dot` everywhere; it is differentiable
  (a TPU megablox kernel could be swapped in here).
  """
  return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


class MoE(nnx.Module):
  """Routed experts (top-k of E) plus always-on shared experts."""

  def __init__(
    self,
    config: MoEConfig,
    hidden_size: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
  ):
    if not isinstance(config, MoEConfig):
      raise TypeError(f"MoE expects a MoEConfig, got {type(config).__name__}")
    if hidden_size <= 0:
      raise ValueError(f"MoE hidden_size must be positive, got {hidden_size}")
    self.config = config
    self.hidden_size = hidden_size
    self.dtype = dtype
    # Routing runs in at least float32: top-k on bf16 affinities ties too often.
    self.router_dtype = jnp.promote_types(dtype, jnp.float32)
    e, d, f = config.num_experts, hidden_size, config.expert_hidden

    router = nnx.initializers.lecun_normal()(rngs.params(), (d, e), param_dtype)
    self.router = annotated(router, ("embed", "experts"))
    self.router_bias = annotated(jnp.zeros((e,), jnp.float32), ("experts",), kind=RouterBias)

    # LeCun normal per expert: fan-in is the contracted axis, experts are a batch axis.
    init = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )
    in_names, out_names = ("experts", "embed", "expert_mlp"), ("experts", "expert_mlp", "embed")
    self.w_gate = annotated(init(rngs.params(), (e, d, f), param_dtype), in_names)
    self.w_up = annotated(init(rngs.params(), (e, d, f), param_dtype), in_names)
    self.w_down = annotated(init(rngs.params(), (e, f, d), param_dtype), out_names)

    self.shared: SwiGLU | None = nnx.data(None)
    if config.num_shared_experts > 0:
      self.shared = SwiGLU(d, config.num_shared_experts * f, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chooses experts for x [N, D].

    Returns:
      expert_ids [N, k] int32 (top-k of affinities + router_bias),
      gates [N, k] (chosen affinities normalized over the chosen, times
        routed_scaling; the bias does not enter them), router dtype,
      affinities [N, E] sigmoid scores, router dtype.
    """
    cfg = self.config
    logits = x.astype(self.router_dtype) @ self.router[...].astype(self.router_dtype)
    affinities = jax.nn.sigmoid(logits)
    bias = jax.lax.stop_gradient(self.router_bias[...]).astype(self.router_dtype)
    _, expert_ids = jax.lax.top_k(affinities + bias, cfg.top_k)
    chosen = jnp.take_along_axis(affinities, expert_ids, axis=-1)
    gates = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * cfg.routed_scaling
    return expert_ids.astype(jnp.int32), gates, affinities

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, T, D] -> (y [B, T, D], stats).

    stats:
      "tokens_per_expert" [E] int32: routed assignments per expert (before any
        capacity drop); "load" [E] float32: the same as fractions (sums to 1);
      "dropped" int32 scalar: assignments dropped by capacity (0 for dropless);
      "balance_loss" scalar (float32, float64 for float64 modules):
        balance_loss_weight * sequence-level balance loss (0.0 when the weight is 0).
    """
    cfg = self.config
    if x.ndim != 3 or x.shape[-1] != self.hidden_size:
      raise ValueError(f"MoE expects x of shape [B, T, {self.hidden_size}], got {x.shape}")
    b, t, d = x.shape
    tokens = x.reshape(b * t, d).astype(self.dtype)
    expert_ids, gates, affinities = self.route(tokens)
    gates = gates.astype(self.dtype)

    if cfg.dispatch == "dropless":
      routed = self._dropless(tokens, expert_ids, gates)
      dropped = jnp.zeros((), jnp.int32)
    else:
      routed, dropped = self._capacity(tokens, expert_ids, gates)
    y = routed if self.shared is None else routed + self.shared(tokens)

    tokens_per_expert = jnp.bincount(expert_ids.reshape(-1), length=cfg.num_experts)
    tokens_per_expert = tokens_per_expert.astype(jnp.int32)
    stats = {
      "tokens_per_expert": tokens_per_expert,
      "load": tokens_per_expert.astype(jnp.float32) / (b * t * cfg.top_k),
      "dropped": dropped,
      "balance_loss": self._balance_loss(expert_ids.reshape(b, t, -1), affinities.reshape(b, t, -1)),
    }
    return y.reshape(b, t, d), stats

  def _expert_weights(self):
    return tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))

  def _dropless(self, tokens, expert_ids, gates):
    """Sort the N*k assignments by expert, grouped SwiGLU, scatter-add back: [N, D]."""
    k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_ids, stable=True)  # [N*k]
    token_of = order // k  # source token
    group_sizes = jnp.bincount(flat_ids, length=self.config.num_experts).astype(jnp.int32)
    w_gate, w_up, w_down = self._expert_weights()
    xs = tokens[token_of]  # [N*k, D]
    hidden = jax.nn.silu(grouped_matmul(xs, w_gate, group_sizes)) * grouped_matmul(xs, w_up, group_sizes)  # [N*k, F]
    ys = grouped_matmul(hidden, w_down, group_sizes)  # [N*k, D]
    ys = ys * gates.reshape(-1)[order][:, None]
    return jnp.zeros_like(tokens).at[token_of].add(ys)

  def _capacity(self, tokens, expert_ids, gates):
    """One-hot dispatch into [E, C, D] buffers; returns ([N, D], dropped int32)."""
    n, k = expert_ids.shape
    e = self.config.num_experts
    c = self.config.capacity(n)
    onehot = jax.nn.one_hot(expert_ids, e, dtype=jnp.int32)  # [N, k, E]
    # Rank-major order (all first choices, then all second choices, ...).
    rank_major = onehot.transpose(1, 0, 2).reshape(k * n, e)
    slot = (jnp.cumsum(rank_major, axis=0) - 1).reshape(k, n, e).transpose(1, 0, 2)
    slot = jnp.sum(slot * onehot, axis=-1)  # [N, k]
    kept = slot < c
    # one_hot of index c is all zeros: dropped assignments vanish from dispatch.
    slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, c), c, dtype=self.dtype)  # [N,k,C]
    expert_onehot = onehot.astype(self.dtype)
    # A token picks an expert at most once, so summing over k never collides.
    dispatch = jnp.einsum("nke,nkc->nec", expert_onehot, slot_onehot)  # [N, E, C]
    combine = jnp.einsum("nke,nkc,nk->nec", expert_onehot, slot_onehot, gates)

    w_gate, w_up, w_down = self._expert_weights()
    expert_in = jnp.einsum("nec,nd->ecd", dispatch, tokens)  # [E, C, D]
    hidden = jax.nn.silu(jnp.einsum("ecd,edf->ecf", expert_in, w_gate)) * jnp.einsum(
      "ecd,edf->ecf", expert_in, w_up
    )  # [E, C, F]
    expert_out = jnp.einsum("ecf,efd->ecd", hidden, w_down)  # [E, C, D]
    routed = jnp.einsum("nec,ecd->nd", combine, expert_out)
    dropped = (n * k - jnp.sum(kept)).astype(jnp.int32)
    return routed, dropped

  def _balance_loss(self, expert_ids, affinities):
    """Weighted DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    Per sequence of T tokens: f_i = E / (k T) * #{t: i chosen at t},
    P_i = mean_t s_{i,t} / sum_j s_{j,t}, loss = sum_i f_i P_i.
    expert_ids [B, T, k], affinities [B, T, E] -> scalar in the router dtype.
    """
    cfg = self.config
    if cfg.balance_loss_weight == 0:
      return jnp.zeros((), self.router_dtype)
    _, t, _ = expert_ids.shape
    e, k = cfg.num_experts, cfg.top_k
    counts = jnp.sum(jax.nn.one_hot(expert_ids, e, dtype=self.router_dtype), axis=(1, 2))
    f = counts * (e / (k * t))  # [B, E]
    normalized = affinities / jnp.sum(affinities, axis=-1, keepdims=True)
    p = jnp.mean(normalized, axis=1)  # [B, E]
    return cfg.balance_loss_weight * jnp.mean(jnp.sum(f * p, axis=-1))
