"""Distributed Engram memory: the row-sharded table lookup and its capacity arithmetic."""

from engram_jax.distributed.capacity import (
  PAPER_TABLES,
  TableConfig,
  capacity_rows,
  capacity_table_markdown,
  per_device_bytes,
)
from engram_jax.distributed.routing import Buckets, bucket_by_owner
from engram_jax.distributed.sharded_lookup import (
  DEFAULT_CAPACITY_FACTOR,
  DEFAULT_METHOD,
  METHODS,
  engram_sharded_lookup,
  pad_table_rows,
  padded_num_rows,
  pallas_local_gather,
  sharded_gather,
  take_local_gather,
)

__all__ = [
  "DEFAULT_CAPACITY_FACTOR",
  "DEFAULT_METHOD",
  "METHODS",
  "PAPER_TABLES",
  "Buckets",
  "TableConfig",
  "bucket_by_owner",
  "capacity_rows",
  "capacity_table_markdown",
  "engram_sharded_lookup",
  "pad_table_rows",
  "padded_num_rows",
  "pallas_local_gather",
  "per_device_bytes",
  "sharded_gather",
  "take_local_gather",
]
