"""Decoder-only Transformer: GQA attention, dense / MoE FFN, mHC streams, Engram layers.

Shapes (B batch, T tokens, G = hc_mult streams, D hidden, V vocab, H Engram heads):
  tokens       [B, T] int32
  streams x    [B, T, G, D]   embedding copied to G streams, mean-collapsed at the end
  logits       [B, T, V] float32

With engram_mode="input_average" (the OverEncoding-style baseline) no block holds an
Engram layer; x_0 += NgramInputAverage_l(engram_ids_l) for every l in engram.layer_ids instead.

Block l (pre-norm):
  x <- x + Engram_l(x, engram_rows_l)            (only at engram.layer_ids; branch g -> stream g)
  x <- HC_attn(x, h -> Attention(RMSNorm(h)))
  x <- HC_ffn(x,  h -> FFN_l(RMSNorm(h)))        FFN_l = SwiGLU (dense blocks) or MoE
With G = 1 the hyper-connections are plain residual additions.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.hashing import layer_table_sizes
from engram_jax.layers.attention import Attention, KVCache
from engram_jax.layers.engram import Engram, NgramInputAverage
from engram_jax.layers.ffn import SwiGLU
from engram_jax.layers.hyper_connections import (
  HyperConnection,
  collapse_streams,
  expand_streams,
)
from engram_jax.layers.moe import (
  MoE,
  RouterBias,
  router_bias_update,
  update_router_bias,
)
from engram_jax.layers.norms import RMSNorm
from engram_jax.layers.params import annotated
from engram_jax.models.config import ModelConfig
from engram_jax.sharding import constrain


@flax.struct.dataclass
class DecodeCache:
  """Generation state of a whole model.

  kv: one KVCache per block (KVCache.lengths [B] = tokens seen so far).
  engram: Engram short-conv state per Engram layer id, [B, (kernel-1)*N, G, D]
    (the last conv inputs; zeros at a sequence start). Hashing the n-grams that span
    the prompt / generated boundary is the caller's job (row ids come from outside).
  """

  kv: tuple[KVCache, ...]
  engram: dict[int, jax.Array]

  @property
  def lengths(self) -> jax.Array:
    """Tokens already in the cache, per sequence: int32 [B]."""
    return self.kv[0].lengths


class Block(nnx.Module):
  """One decoder block (see the module docstring)."""

  def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    cfg = config
    d, g = cfg.hidden_size, cfg.hc_mult
    dtype, pdtype = cfg.jnp_dtype, cfg.jnp_param_dtype
    kw = {"dtype": dtype, "param_dtype": pdtype}
    self.layer = layer
    self.is_moe = cfg.is_moe_layer(layer)
    if layer in cfg.engram_layer_ids and cfg.engram_mode == "engram":
      self.engram = nnx.data(
        Engram(
          cfg.engram,
          layer,
          d,
          g,
          table_sizes=layer_table_sizes(cfg.engram)[layer],
          gate=cfg.engram_gate,
          impl=cfg.engram_impl,
          short_conv=cfg.engram_short_conv,
          multi_branch=cfg.engram_multi_branch,
          fold_rows=cfg.engram_fold_rows,
          row_multiple=cfg.engram_row_multiple,
          sharded_lookup=cfg.engram_sharded_lookup,
          table_sharding=cfg.engram_table_sharding,
          table_init_std=cfg.engram_table_init_std,
          rngs=rngs,
          **kw,
        )
      )
    else:
      self.engram = nnx.data(None)
    hc_kw = dict(sinkhorn_iters=cfg.sinkhorn_iters, rngs=rngs, **kw)
    self.attn_hc = HyperConnection(d, g, **hc_kw)
    self.attn_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs, **kw)
    self.attn = Attention(d, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rope_theta=cfg.rope_theta, rngs=rngs, **kw)
    self.ffn_hc = HyperConnection(d, g, **hc_kw)
    self.ffn_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs, **kw)
    if self.is_moe:
      self.ffn = MoE(cfg.moe, d, rngs=rngs, **kw)
    else:
      self.ffn = SwiGLU(d, cfg.ffn_hidden, rngs=rngs, **kw)

  def __call__(self, x, positions, segment_ids, engram_rows, kv_cache, conv_state):
    """x [B,T,G,D], engram_rows: this block's gathered rows [B,T,d_mem] (None without an
    Engram layer) -> (x, kv_cache, conv_state, router stats | None, gates | None)."""
    gates = None
    if self.engram is not None:
      if kv_cache is None:
        y, gates, _ = self.engram.fuse(x, engram_rows, segment_ids=segment_ids)
      else:  # segment_ids mark right padding here: keep the state after the valid ones
        lengths = None if segment_ids is None else jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
        y, gates, conv_state = self.engram.fuse(x, engram_rows, conv_state=conv_state, lengths=lengths)
      x = x + y.astype(x.dtype)

    h, mix = self.attn_hc.pre(x)
    a, kv_cache = self.attn(self.attn_norm(h), positions, segment_ids, cache=kv_cache)
    x = self.attn_hc.post(x, a, mix)

    h, mix = self.ffn_hc.pre(x)
    stats = None
    if self.is_moe:
      f, stats = self.ffn(self.ffn_norm(h))
    else:
      f = self.ffn(self.ffn_norm(h))
    x = self.ffn_hc.post(x, f, mix)
    x = constrain(x, ("batch", "sequence", "hc", "activation_embed"))
    return x, kv_cache, conv_state, stats, gates


class Transformer(nnx.Module):
  """The decoder. Parameters carry logical axis names; the module is always built
  unsharded (or traced by `engram_jax.sharding.create_sharded`), never eagerly sharded.

  Embedding: normal(std 1). Head: untied [D, V] LeCun normal; tied: E^T / sqrt(D) (so
  initial logits have unit scale either way).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, ModelConfig):
      raise TypeError(f"Transformer expects a ModelConfig, got {type(config).__name__}")
    self.config = config
    cfg = config
    v, d = cfg.vocab_size, cfg.hidden_size
    pdtype = cfg.jnp_param_dtype
    with nnx.use_eager_sharding(False):
      self.embed = annotated(jax.random.normal(rngs.params(), (v, d), pdtype), ("vocab", "embed"))
      self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
      self.input_ngrams = nnx.data(None)
      if cfg.engram is not None and cfg.engram_mode == "input_average":
        sizes = layer_table_sizes(cfg.engram)
        self.input_ngrams = nnx.List(
          [
            NgramInputAverage(
              cfg.engram,
              lid,
              d,
              table_sizes=sizes[lid],
              dtype=cfg.jnp_dtype,
              param_dtype=pdtype,
              table_init_std=cfg.engram_table_init_std,
              rngs=rngs,
            )
            for lid in cfg.engram.layer_ids
          ]
        )
      self.final_norm = RMSNorm(d, eps=cfg.norm_eps, dtype=cfg.jnp_dtype, param_dtype=pdtype, rngs=rngs)
      self.head = nnx.data(
        None
        if cfg.tie_embeddings
        else annotated(nnx.initializers.lecun_normal()(rngs.params(), (d, v), pdtype), ("embed", "vocab"))
      )

  # ------------------------------------------------------------------------------ decoding
  def init_cache(self, batch: int, max_len: int, dtype=None) -> DecodeCache:
    """Empty generation state for `batch` sequences of up to `max_len` tokens."""
    dtype = self.config.jnp_dtype if dtype is None else dtype
    kv = tuple(b.attn.init_cache(batch, max_len, dtype) for b in self.blocks)
    engram = {b.layer: b.engram.init_conv_state(batch, dtype) for b in self.blocks if b.engram is not None}
    return DecodeCache(kv=kv, engram=engram)

  # ------------------------------------------------------------------------------- forward
  def _gathered_rows(self, engram_ids, engram_rows) -> dict[int, jax.Array]:
    """Gathered rows [B,T,d_mem] per Engram layer: `engram_rows[l]` as given, else the
    layer's lookup of `engram_ids[l]`."""
    rows = {}
    for block in self.blocks:
      if block.engram is None:
        continue
      lid = block.layer
      if engram_rows is not None and lid in engram_rows:
        rows[lid] = jnp.asarray(engram_rows[lid])
      elif engram_ids is not None and lid in engram_ids:
        rows[lid] = block.engram.lookup(engram_ids[lid])
      else:
        raise ValueError(
          f"Engram layer {lid} needs engram_ids[{lid}] (row ids [B, T, "
          f"{self.config.engram.num_heads}]) or engram_rows[{lid}] (rows [B, T, "
          f"{self.config.engram.memory_dim}]); got engram_ids keys "
          f"{None if engram_ids is None else sorted(engram_ids)}, engram_rows keys "
          f"{None if engram_rows is None else sorted(engram_rows)}"
        )
    for name, given in (("engram_ids", engram_ids), ("engram_rows", engram_rows)):
      extra = sorted(set(given or {}) - set(self.config.engram_layer_ids))
      if extra:
        raise ValueError(f"{name} has keys {extra} that are not Engram layers {self.config.engram_layer_ids}")
    return rows

  def __call__(
    self,
    tokens: jax.Array,
    engram_ids: dict[int, jax.Array] | None = None,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    engram_rows: dict[int, jax.Array] | None = None,
    cache: DecodeCache | None = None,
  ) -> tuple[jax.Array, dict[str, Any]]:
    """tokens [B, T] -> (logits [B, T, V] float32, aux).

    Args:
      engram_ids: {layer_id: hashed per-head row ids [B, T, H]} for every Engram layer.
      positions: [B, T] RoPE positions (default: arange(T), or after the cache's
        lengths when decoding).
      segment_ids: [B, T] packed-document ids (no cache), or padding marks (0 = pad,
        right-padded) with a cache; see `Attention.__call__`.
      engram_rows: {layer_id: rows [B, T, d_mem]} gathered elsewhere (host
        offload); takes precedence over engram_ids for that layer.
      cache: a `DecodeCache` from `init_cache` (generation), or None.
    Returns:
      logits, aux = {"router": {block: MoE stats}, "engram_gates": {layer_id:
      [B, T, G]}, "balance_loss": float32 scalar (sum over MoE blocks), "cache":
      updated DecodeCache or None}.
    """
    cfg = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} {tokens.shape}")
    b, t = tokens.shape
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
      if arr is not None and arr.shape != (b, t):
        raise ValueError(f"{name} shape {arr.shape} must be [B, T] = {(b, t)}")
    if cache is not None and len(cache.kv) != cfg.num_layers:
      raise ValueError(f"cache has {len(cache.kv)} layers, model has {cfg.num_layers}")
    if self.input_ngrams is not None:
      missing = [m.layer_id for m in self.input_ngrams if engram_ids is None or m.layer_id not in engram_ids]
      if missing:
        raise ValueError(f"engram_mode='input_average' needs engram_ids for layers {missing}")
      input_ids = {m.layer_id: engram_ids[m.layer_id] for m in self.input_ngrams}
      engram_ids = None
    rows = self._gathered_rows(engram_ids, engram_rows)
    for lid, r in rows.items():
      if r.shape != (b, t, cfg.engram.memory_dim):
        raise ValueError(f"Engram layer {lid} rows shape {r.shape} must be {(b, t, cfg.engram.memory_dim)}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      if cache is not None:
        positions = positions + cache.lengths[:, None].astype(jnp.int32)

    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.jnp_dtype)
    if self.input_ngrams is not None:
      for module in self.input_ngrams:
        x = x + module(input_ids[module.layer_id]).astype(x.dtype)
    x = constrain(x, ("batch", "sequence", "activation_embed"))
    x = expand_streams(x, cfg.hc_mult)

    router, gates = {}, {}
    new_kv, new_conv = [], {}
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else cache.kv[i]
      conv = None if cache is None or block.engram is None else cache.engram[i]
      x, kv, conv, stats, g = block(x, positions, segment_ids, rows.get(i), kv, conv)
      new_kv.append(kv)
      if block.engram is not None:
        gates[i] = g
        new_conv[i] = conv
      if stats is not None:
        router[i] = stats

    h = self.final_norm(collapse_streams(x))
    if self.head is None:
      w = self.embed[...].astype(cfg.jnp_dtype).T / math.sqrt(cfg.hidden_size)
    else:
      w = self.head[...].astype(cfg.jnp_dtype)
    logits = jnp.einsum("btd,dv->btv", h.astype(cfg.jnp_dtype), w, preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "sequence", "vocab"))
    balance = sum((s["balance_loss"] for s in router.values()), jnp.zeros((), jnp.float32))
    aux = {
      "router": router,
      "engram_gates": gates,
      "balance_loss": balance,
      "cache": None if cache is None else DecodeCache(kv=tuple(new_kv), engram=new_conv),
    }
    return logits, aux

  def moe_layers(self) -> dict[int, MoE]:
    """{layer: MoE} of the model's MoE blocks (for router-bias updates and load metrics)."""
    return {b.layer: b.ffn for b in self.blocks if b.is_moe}


# ---------------------------------------------------------------------- MoE bias balancing
def update_moe_biases(
  model: Transformer, router_stats: dict[int, dict[str, jax.Array]], rate: float | None = None
) -> None:
  """In place: the auxiliary-loss-free bias update of every MoE block from its stats
  (`aux["router"]`); rate defaults to the MoEConfig's bias_update_rate."""
  moes = model.moe_layers()
  missing = sorted(set(moes) - set(router_stats))
  if missing:
    raise ValueError(f"router_stats lacks MoE blocks {missing}")
  for layer, moe in moes.items():
    update_router_bias(moe, router_stats[layer]["load"], rate)


def updated_router_biases(state: nnx.State, router_stats: dict[int, dict[str, jax.Array]], rate: float) -> nnx.State:
  """Pure version for jitted train steps: `state` is `nnx.state(model, RouterBias)`;
  returns it with blocks[i].ffn.router_bias updated from router_stats[i]["load"]."""

  def update(path, variable):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if len(keys) >= 4 and keys[0] == "blocks" and keys[-1] == "router_bias":
      layer = int(keys[1])
      if layer not in router_stats:
        raise ValueError(f"router_stats lacks MoE block {layer}")
      return variable.replace(router_bias_update(variable.get_value(), router_stats[layer]["load"], rate))
    return variable

  return jax.tree_util.tree_map_with_path(update, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


__all__ = [
  "Block",
  "DecodeCache",
  "RouterBias",
  "Transformer",
  "update_moe_biases",
  "updated_router_biases",
]
