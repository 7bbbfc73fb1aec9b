"""Shared config skeleton and the ConfigDict -> library dataclass conversion.

A run config (ml_collections.ConfigDict) has these blocks, each overridable from the
command line as ``--config.<block>.<field>=<value>``:
  variant     "dense" | "moe" | "engram"
  model       backbone fields of `ModelConfig`
  moe         `MoEConfig` fields (MoE and Engram variants)
  engram      `EngramConfig` fields (vocab_sizes are set by the allocation)
  allocation  rho: the routed-expert share of the sparse budget of the Engram variant;
              active_rtol: tolerated active-parameter mismatch with the MoE twin
  data        `DataConfig` fields;   train  `TrainConfig` fields
  mesh        data / fsdp / tensor / expert axis sizes (-1 on data = all devices left)
  seed
"""

from __future__ import annotations

import dataclasses

import ml_collections

from engram_jax import EngramConfig
from engram_jax.data import DataConfig
from engram_jax.layers.moe import MoEConfig
from engram_jax.models.accounting import allocate, count_params
from engram_jax.models.config import ModelConfig
from engram_jax.train import TrainConfig

VARIANTS = ("dense", "moe", "engram")


def _defaults(cls, **overrides) -> dict:
  fields = {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}
  fields.update(overrides)
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}


def base_config(variant: str) -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.model = dict(vocab_size=2048, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=16, ffn_hidden=256, num_dense_layers=1, hc_mult=1, sinkhorn_iters=20,
                 rope_theta=10000.0, tie_embeddings=False, norm_eps=1e-6, dtype="float32",
                 param_dtype="float32", engram_gate="reference", engram_impl="xla",
                 engram_row_multiple=1, engram_sharded_lookup="all_to_all",
                 engram_table_sharding="tensor")
  c.moe = _defaults(MoEConfig, num_experts=16, num_shared_experts=1, top_k=2, expert_hidden=64)
  c.engram = _defaults(EngramConfig, vocab_sizes=[1000, 1000], layer_ids=[1], pad_id=0,
                       n_embed_per_ngram=32, n_head_per_ngram=2)
  c.engram.compress_tokens = True
  c.allocation = dict(rho=0.8, active_rtol=0.05)
  c.data = _defaults(DataConfig)
  c.train = _defaults(TrainConfig)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  return c


def _plain(d) -> dict:
  d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def moe_config(c) -> MoEConfig:
  return MoEConfig(**_plain(c.moe))


def engram_config(c) -> EngramConfig:
  d = _plain(c.engram)
  d.pop("compress_tokens", None)
  return EngramConfig(**d)


def model_config(c) -> ModelConfig:
  """The `ModelConfig` of a run config; the Engram variant is allocated against its MoE twin."""
  backbone = _plain(c.model)
  moe_twin = ModelConfig.moe_model(moe_config(c), **backbone)
  if c.variant == "moe":
    return moe_twin
  if c.variant == "dense":
    # iso-active: every block dense, FFN as wide as the MoE's active experts
    m = c.moe
    width = (m.top_k + m.num_shared_experts) * m.expert_hidden
    return ModelConfig.dense(**{**backbone, "ffn_hidden": width, "num_dense_layers": backbone["num_layers"]})
  counts = count_params(moe_twin)
  base = ModelConfig.engram_moe(moe_config(c), engram_config(c), **backbone)
  return allocate(base, counts.total, counts.active, float(c.allocation.rho),
                  active_rtol=float(c.allocation.active_rtol)).config


def data_config(c) -> DataConfig:
  return DataConfig(**_plain(c.data))


def train_config(c) -> TrainConfig:
  return TrainConfig(**_plain(c.train))


def compress_tokens(c) -> bool:
  return bool(c.engram.get("compress_tokens", True))


def mesh_axes(c, device_count: int) -> dict[str, int]:
  axes = dict(c.mesh)
  fixed = axes["fsdp"] * axes["tensor"] * axes["expert"]
  if axes["data"] == -1:
    if device_count % fixed:
      raise ValueError(f"mesh fsdp*tensor*expert={fixed} does not divide {device_count} devices")
    axes["data"] = device_count // fixed
  if axes["data"] * fixed != device_count:
    raise ValueError(f"mesh {axes} needs {axes['data'] * fixed} devices, have {device_count}")
  return axes
