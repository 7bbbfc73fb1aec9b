"""The decoder model: configuration, Transformer, and parameter / FLOP accounting."""

from engram_jax.models.accounting import (
  Allocation,
  ParamCounts,
  allocate,
  count_params,
  flops_per_token,
)
from engram_jax.models.config import ModelConfig
from engram_jax.models.tables import (
  engram_table,
  engram_table_filter,
  engram_table_layer,
  engram_table_path,
  engram_table_value,
)
from engram_jax.models.transformer import (
  Block,
  DecodeCache,
  Transformer,
  update_moe_biases,
  updated_router_biases,
)

__all__ = [
  "Allocation",
  "Block",
  "DecodeCache",
  "ModelConfig",
  "ParamCounts",
  "Transformer",
  "allocate",
  "count_params",
  "engram_table",
  "engram_table_filter",
  "engram_table_layer",
  "engram_table_path",
  "engram_table_value",
  "flops_per_token",
  "update_moe_biases",
  "updated_router_biases",
]
