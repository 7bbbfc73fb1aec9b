"""Parameter and FLOP accounting from a `ModelConfig` alone, and the sparsity-allocation solver.

Notation: D hidden, V vocab, L blocks, H/Hkv/hd attention heads/kv heads/head dim,
F dense FFN width, G = hc_mult, E routed experts, S shared experts, k = top_k,
Fe = expert_hidden, L_moe = MoE blocks; per Engram layer: R table rows (sum of the head
primes), d_h row width, d_mem = (N-1)*K*d_h, taps = conv kernel size.

Parameters (every `nnx.Param`; the MoE router bias is not a Param and not counted):
  embedding            V*D
  head                 D*V (0 when tied)
  final norm           D
  per block            attention 2*D*H*hd + 2*D*Hkv*hd, norms 2*D,
                       2 hyper-connections (G > 1 only) 2*(G*D*M + M + 3), M = 2G + G^2
  dense FFN            3*D*F
  MoE                  router D*E, routed 3*E*D*Fe, shared 3*D*S*Fe
  Engram layer         table R*d_h (R padded to engram_row_multiple), value d_mem*D + D, keys G*(d_mem*D + D),
                       three per-branch norms 3*G*D, conv taps*G*D

Active parameters per token: everything a token's forward touches, except the embedding
(a lookup, not compute): the head D*V (even when tied), every dense part, the router,
shared and top-k routed experts, Engram projections/norms/conv, and of the Engram table
only the (N-1)*K looked-up rows (d_mem parameters per Engram layer).

Sparse parameters = inactive ones = total - embedding - head params - (active - D*V)
  = routed inactive (E - k)*3*D*Fe*L_moe + table inactive sum_l (R_l*d_h - d_mem).
rho (the paper's allocation ratio) = routed inactive / sparse (1 when there is nothing
sparse): the share of the sparse budget held by routed experts; Engram tables hold 1 - rho.

Forward FLOPs per token = 2 * (active matmul parameters) + 4 * L * T * H * hd, where the
matmul parameters are the active ones minus norm scales, biases, hyper-connection
biases/scales and the table rows (gathers), and the second term is QK^T plus AV over a
context of T tokens (full T x T, i.e. not halved for causality, as in Kaplan et al.).
"""

from __future__ import annotations

import dataclasses

from engram_jax.hashing import layer_table_sizes
from engram_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Analytic parameter counts of a `ModelConfig` (see the module docstring)."""

  total: int
  active: int
  embedding: int
  head: int
  routed_total: int
  routed_active: int
  engram_table_total: int
  engram_table_active: int
  matmul_active: int
  breakdown: dict[str, int]

  @property
  def sparse(self) -> int:
    """Inactive parameters: routed experts not chosen + Engram rows not looked up."""
    return (self.routed_total - self.routed_active) + (self.engram_table_total - self.engram_table_active)

  @property
  def rho(self) -> float:
    """Routed-expert share of the sparse parameters (1.0 when nothing is sparse)."""
    sparse = self.sparse
    return 1.0 if sparse == 0 else (self.routed_total - self.routed_active) / sparse


def _hc_params(d: int, g: int) -> int:
  if g == 1:
    return 0
  m = 2 * g + g * g
  return g * d * m + m + 3


def count_params(config: ModelConfig) -> ParamCounts:
  """Analytic parameter counts; nothing is materialised (Engram table sizes come from the
  hashing constants, i.e. the same primes the model allocates)."""
  c = config
  d, v, g = c.hidden_size, c.vocab_size, c.hc_mult
  attn = 2 * d * c.num_heads * c.head_dim + 2 * d * c.num_kv_heads * c.head_dim
  hc = 2 * _hc_params(d, g)
  hc_matmul = 2 * (g * d * (2 * g + g * g)) if g > 1 else 0
  n_moe = len(c.moe_layer_ids)
  n_dense = c.num_layers - n_moe

  b: dict[str, int] = {
    "embedding": v * d,
    "head": 0 if c.tie_embeddings else d * v,
    "norms": d + 2 * d * c.num_layers,
    "attention": attn * c.num_layers,
    "hyper_connections": hc * c.num_layers,
    "dense_ffn": 3 * d * c.ffn_hidden * n_dense,
  }
  routed_total = routed_active = 0
  moe_active = 0
  if c.moe is not None and n_moe:
    m = c.moe
    router = d * m.num_experts
    shared = 3 * d * m.num_shared_experts * m.expert_hidden
    per_expert = 3 * d * m.expert_hidden
    b["router"] = router * n_moe
    b["shared_experts"] = shared * n_moe
    routed_total = per_expert * m.num_experts * n_moe
    routed_active = per_expert * m.top_k * n_moe
    b["routed_experts"] = routed_total
    moe_active = (router + shared) * n_moe
  table_total = table_active = 0
  engram_fixed = engram_matmul = 0
  if c.engram is not None:
    e = c.engram
    sizes = layer_table_sizes(e)
    # ablation / baseline options: single-branch (G = 1 inside Engram), no gate (no
    # key projections or gate norms), no short conv, folded tables, input averaging.
    ge = g if c.engram_multi_branch else 1
    keys = 0 if c.engram_gate == "none" else ge
    conv = e.kernel_size * ge * d if c.engram_short_conv else 0
    for lid in c.engram_layer_ids:
      rows = (
        e.num_heads * c.engram_fold_rows if c.engram_fold_rows is not None else int(sum(int(s) for s in sizes[lid]))
      )
      if c.engram_mode == "engram":
        rows = -(-rows // c.engram_row_multiple) * c.engram_row_multiple  # padding rows
      table_total += rows * e.head_dim
      table_active += e.memory_dim
      if c.engram_mode == "input_average":
        engram_matmul += e.head_dim * d
        engram_fixed += e.head_dim * d + d
        continue
      engram_matmul += (1 + keys) * e.memory_dim * d + conv
      engram_fixed += (1 + keys) * (e.memory_dim * d + d) + 2 * keys * d + (ge * d + conv if c.engram_short_conv else 0)
    b["engram_table"] = table_total
    b["engram_other"] = engram_fixed

  total = sum(b.values())
  dense_active = b["norms"] + b["attention"] + b["hyper_connections"] + b["dense_ffn"] + moe_active + engram_fixed
  active = d * v + dense_active + routed_active + table_active
  matmul_active = (
    d * v + b["attention"] + hc_matmul * c.num_layers + b["dense_ffn"] + moe_active + routed_active + engram_matmul
  )
  return ParamCounts(
    total=total,
    active=active,
    embedding=b["embedding"],
    head=b["head"],
    routed_total=routed_total,
    routed_active=routed_active,
    engram_table_total=table_total,
    engram_table_active=table_active,
    matmul_active=matmul_active,
    breakdown=b,
  )


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
  """Forward FLOPs per token: 2 * active matmul params + 4 * L * seq_len * H * hd."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  counts = count_params(config)
  attention = 4 * config.num_layers * seq_len * config.num_heads * config.head_dim
  return 2 * counts.matmul_active + attention


# --------------------------------------------------------------------------- allocation
@dataclasses.dataclass(frozen=True)
class Allocation:
  """Result of `allocate`: the config and what it achieves against the targets."""

  config: ModelConfig
  num_experts: int
  slots_per_head: int  # nominal Engram rows per head (0 when rho == 1)
  counts: ParamCounts
  target_total: int
  target_active: int
  target_rho: float

  def summary(self) -> str:
    """One line: expert count, slots per head, total and active parameters against their targets, and rho."""
    c = self.counts
    return (
      f"E={self.num_experts} slots/head={self.slots_per_head} total={c.total} "
      f"(target {self.target_total}) active={c.active} (target {self.target_active}) "
      f"rho={c.rho:.4f} (target {self.target_rho})"
    )


def _with(base: ModelConfig, num_experts: int, slots: int | None) -> ModelConfig:
  moe = dataclasses.replace(base.moe, num_experts=num_experts)
  if slots is None:
    return base.replace(moe=moe, engram=None)
  engram = base.engram.replace(vocab_sizes=(slots,) * base.engram.num_orders)
  return base.replace(moe=moe, engram=engram)


def allocate(
  base_config: ModelConfig,
  total_params: int,
  active_params: int,
  rho: float,
  *,
  active_rtol: float = 0.02,
) -> Allocation:
  """Split the sparse budget between routed experts (rho) and Engram slots (1 - rho).

  The backbone, top_k, expert width and the Engram layout (layers, orders, heads, row
  width) come from `base_config`; the solver picks the number of routed experts E (an
  integer, rounded to nearest) and the nominal slots per Engram head (rounded) so that
  the total is `total_params` and routed-inactive / sparse is `rho`. With rho = 1 the
  model has no Engram. The active count is fixed by the backbone (up to the router's
  D per expert), so `active_params` is checked, not solved for: a relative mismatch
  above `active_rtol` raises. Real table sizes are primes just above the nominal slots,
  so achieved figures differ slightly; they are in the returned `Allocation`.

  Derivation: with E0 = top_k, P0 = total params at E = E0 without Engram, Pe = Engram
  params other than tables, w = 3*D*Fe*L_moe, r = D*L_moe (router), a = d_mem * (Engram
  layers) and budget B = total - P0 - Pe: tables get B - (E - E0)(w + r) params, the
  sparse total is B - a - (E - E0) r, and rho * sparse = (E - E0) w gives
      E = E0 + rho (B - a) / (w + rho r).
  """
  if base_config.moe is None:
    raise ValueError("allocate needs a base_config with an MoE (routed experts to size)")
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho}")
  if rho < 1.0 and base_config.engram is None:
    raise ValueError(f"rho={rho} < 1 puts parameters in Engram, but base_config.engram is None")
  k = base_config.moe.top_k
  n_moe = len(base_config.moe_layer_ids)
  if n_moe == 0:
    raise ValueError("base_config has no MoE blocks (num_dense_layers == num_layers)")
  d, fe = base_config.hidden_size, base_config.moe.expert_hidden
  w, r = 3 * d * fe * n_moe, d * n_moe

  p0 = count_params(_with(base_config, k, None)).total
  use_engram = rho < 1.0
  if use_engram:
    e = base_config.engram
    probe = count_params(_with(base_config, k, 2))
    p_engram = probe.breakdown["engram_other"]
    n_layers = len(base_config.engram_layer_ids)
    a = e.memory_dim * n_layers
  else:
    p_engram = a = 0
  budget = total_params - p0 - p_engram
  if budget < 0:
    raise ValueError(
      f"total_params={total_params} is below the smallest model of this shape "
      f"({p0 + p_engram} with E=top_k={k} experts and no Engram table)"
    )
  num_experts = k + round(rho * (budget - a) / (w + rho * r))
  table_params = budget - (num_experts - k) * (w + r)
  slots = None
  if use_engram:
    slots = round(table_params / (e.head_dim * e.num_heads * n_layers))
    if slots < 2:
      raise ValueError(
        f"infeasible: rho={rho} with total_params={total_params} leaves {table_params} "
        f"table parameters, i.e. {slots} slots per Engram head (need >= 2)"
      )
  if num_experts < max(k, 1):
    raise ValueError(f"infeasible: {num_experts} routed experts < top_k={k}")
  config = _with(base_config, num_experts, slots)
  counts = count_params(config)
  if abs(counts.active - active_params) > active_rtol * active_params:
    raise ValueError(
      f"active budget not met: the base backbone gives {counts.active} active params per "
      f"token, requested {active_params} (rtol {active_rtol}); change the backbone, top_k "
      "or expert width"
    )
  return Allocation(
    config=config,
    num_experts=num_experts,
    slots_per_head=slots or 0,
    counts=counts,
    target_total=int(total_params),
    target_active=int(active_params),
    target_rho=float(rho),
  )


__all__ = ["Allocation", "ParamCounts", "allocate", "count_params", "flops_per_token"]
