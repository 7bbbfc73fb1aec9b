"""Row-index arithmetic for Engram tables with more than 2^31 rows.

A layer's flat table stacks its heads: head h's rows start at `offsets[h]` (int64, the
sum of the earlier heads' primes). With JAX's default 32-bit mode a device cannot hold
`offsets[h] + row` once it passes 2^31 - 1. Two exact ways around it, neither of which
needs 64-bit integers on the device:

- Host: `flat_rows_np` adds the int64 offsets in NumPy (int64 end to end); a host table
  (`HostTable`, NumPy method) gathers with those ids directly.
- Device, sharded by rows: the table is split into shards of `rows_per_shard` (< 2^31)
  consecutive flat rows. `RowSharding.locate_np` (host, int64) and `RowSharding.locate`
  (device, uint32) turn per-head rows into (shard, local_row) int32 pairs. The device
  form splits each offset on the host as `offset = q_h * S + m_h` and computes
  `t = m_h + row` in uint32 (m_h < S <= 2^31 - 1 and row <= 2^31 - 1, so t < 2^32), then
  shard = q_h + t // S, local = t % S.

Shapes: per-head rows [..., H] (the last axis is the head), offsets [H].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = int(np.iinfo(np.int32).max)


def check_int32_rows(num_rows: int, what: str = "table") -> None:
  """Raises ValueError if row ids of a `num_rows`-row table do not fit int32."""
  if num_rows - 1 > INT32_MAX:
    raise ValueError(
      f"{what} has {num_rows} rows: flat row ids up to {num_rows - 1} do not fit int32 "
      f"(max {INT32_MAX}); use a NumPy host table (int64 ids) or RowSharding local ids"
    )


def head_offsets(head_sizes: Sequence[int]) -> np.ndarray:
  """First flat row of every head: np.int64 [H] (exclusive cumulative sum)."""
  sizes = np.asarray([int(s) for s in head_sizes], dtype=np.int64)
  if sizes.ndim != 1 or sizes.size == 0 or (sizes <= 0).any():
    raise ValueError(f"head sizes must be a non-empty list of positive ints, got {list(head_sizes)}")
  return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def flat_rows_np(head_rows, offsets) -> np.ndarray:
  """Per-head rows [..., H] + int64 offsets [H] -> flat rows np.int64 [..., H] (exact)."""
  rows = np.asarray(head_rows)
  offsets = np.asarray(offsets, dtype=np.int64)
  if rows.ndim < 1 or rows.shape[-1] != offsets.shape[0]:
    raise ValueError(f"head_rows of shape {rows.shape} must end in H={offsets.shape[0]} heads")
  if not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(f"head_rows must be integers, got dtype {rows.dtype}")
  return rows.astype(np.int64) + offsets


@dataclasses.dataclass(frozen=True)
class RowIndex:
  """How one Engram layer's hashed per-head ids map to rows of its flat table: the one
  place that computes flat row ids (per-head bounds, fold, head offsets, padding), on the
  host (`flat_np`, int64, exact) and on the device (`flat_jnp`, int32, traceable).

  Attributes:
    table_sizes: the hashed range of every head's ids, [H] (the input contract).
    fold_rows: None, or the rows every head's table holds (ids are reduced mod it).
    row_multiple: the table's row count is rounded up to a multiple of this (padding rows,
      never addressed).
  """

  table_sizes: tuple[int, ...]
  fold_rows: int | None = None
  row_multiple: int = 1

  def __post_init__(self):
    sizes = tuple(int(s) for s in self.table_sizes)
    if not sizes or min(sizes) < 1:
      raise ValueError(f"table_sizes must be a non-empty list of positive ints, got {list(self.table_sizes)}")
    object.__setattr__(self, "table_sizes", sizes)
    for name, value in (("fold_rows", self.fold_rows), ("row_multiple", self.row_multiple)):
      if (value is not None or name == "row_multiple") and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
      ):
        raise ValueError(f"{name} must be {'None or ' if name == 'fold_rows' else ''}a positive int, got {value!r}")

  @property
  def num_heads(self) -> int:
    """Number of heads H (one hashed table per n-gram order and head)."""
    return len(self.table_sizes)

  @property
  def stored_sizes(self) -> tuple[int, ...]:
    """Rows each head really holds (`table_sizes`, or `fold_rows` each)."""
    return self.table_sizes if self.fold_rows is None else (int(self.fold_rows),) * self.num_heads

  @property
  def offsets(self) -> np.ndarray:
    """First flat row of every head: np.int64 [H]."""
    return head_offsets(self.stored_sizes)

  @property
  def num_rows(self) -> int:
    """Rows of the flat table, padding included."""
    m = self.row_multiple
    return -(-sum(self.stored_sizes) // m) * m

  def flat_np(self, engram_ids, where: str = "the Engram table") -> np.ndarray:
    """Host: hashed per-head ids [..., H] -> flat rows np.int64 [..., H]; an id outside its
    head's [0, table_sizes[h]) raises ValueError with its value and position (checked
    BEFORE the offset is added, so it can never read a neighbouring head's row)."""
    ids = np.asarray(engram_ids)
    if ids.ndim < 1 or ids.shape[-1] != self.num_heads:
      raise ValueError(f"engram_ids of shape {ids.shape} must end in the {self.num_heads} heads of {where}")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"engram_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    sizes = np.asarray(self.table_sizes, np.int64)
    bad = (ids < 0) | (ids >= sizes)
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
        f"row id {int(ids[pos])} at position {pos} is outside head {pos[-1]}'s table [0, {int(sizes[pos[-1]])}) "
        f"of {where}"
      )
    if self.fold_rows is not None:
      ids = ids % int(self.fold_rows)
    return ids + self.offsets

  def flat_jnp(self, engram_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Device (traceable): hashed per-head ids [..., H] -> (flat rows int32 [..., H], valid
    bool [..., H]). An invalid id (outside its head's range) maps to its head's row 0 (always
    in range, so no kernel reads out of bounds); the caller turns its row into NaN. The
    table's row ids must fit int32 (`check_int32_rows`)."""
    ids = jnp.asarray(engram_ids).astype(jnp.int32)
    valid = (ids >= 0) & (ids < jnp.asarray(self.table_sizes, jnp.int32))
    ids = jnp.where(valid, ids, 0)
    if self.fold_rows is not None:
      ids = ids % int(self.fold_rows)
    return ids + jnp.asarray(self.offsets, jnp.int32), valid


def split_hi_lo(flat_rows) -> tuple[np.ndarray, np.ndarray]:
  """int64 ids (>= 0, < 2^62) -> (hi, lo) int32 with id = hi * 2^31 + lo, lo in [0, 2^31)."""
  flat = np.asarray(flat_rows, dtype=np.int64)
  if (flat < 0).any() or (flat >= (1 << 62)).any():
    raise ValueError(f"row ids must lie in [0, 2^62), got min {flat.min()} max {flat.max()}")
  return (flat >> 31).astype(np.int32), (flat & INT32_MAX).astype(np.int32)


def join_hi_lo(hi, lo) -> np.ndarray:
  """Inverse of `split_hi_lo`: np.int64."""
  return (np.asarray(hi, np.int64) << 31) | np.asarray(lo, np.int64)


@dataclasses.dataclass(frozen=True)
class RowSharding:
  """A flat table of `num_rows` rows cut into shards of `rows_per_shard` consecutive rows.

  Attributes:
    offsets: np.int64 [H], first flat row of every head (may exceed int32).
    head_sizes: np.int64 [H], rows of every head.
    rows_per_shard: S, rows of every shard but the last; 1 <= S <= 2^31 - 1.
  """

  offsets: np.ndarray
  head_sizes: np.ndarray
  rows_per_shard: int

  @classmethod
  def from_head_sizes(cls, head_sizes: Sequence[int], rows_per_shard: int) -> RowSharding:
    """Shards of `rows_per_shard` rows over heads of the given sizes laid end to end."""
    sizes = np.asarray([int(s) for s in head_sizes], dtype=np.int64)
    return cls(head_offsets(sizes), sizes, int(rows_per_shard))

  @classmethod
  def even(cls, head_sizes: Sequence[int], num_shards: int) -> RowSharding:
    """Shards of ceil(num_rows / num_shards) rows (the last one may be shorter)."""
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    total = int(np.sum(np.asarray(head_sizes, dtype=np.int64)))
    return cls.from_head_sizes(head_sizes, -(-total // num_shards))

  def __post_init__(self):
    if not 1 <= self.rows_per_shard <= INT32_MAX:
      raise ValueError(f"rows_per_shard must be in [1, 2^31 - 1], got {self.rows_per_shard}")
    if self.offsets.shape != self.head_sizes.shape:
      raise ValueError(f"offsets {self.offsets.shape} and head_sizes {self.head_sizes.shape} differ")
    if (self.head_sizes - 1 > INT32_MAX).any():
      raise ValueError(f"a head of {int(self.head_sizes.max())} rows: per-head rows must fit int32")
    if self.num_shards - 1 > INT32_MAX:
      raise ValueError(f"{self.num_shards} shards: shard ids must fit int32")

  @property
  def num_rows(self) -> int:
    """Rows of the flat table (all heads)."""
    return int(self.offsets[-1] + self.head_sizes[-1])

  @property
  def num_shards(self) -> int:
    """Number of shards (the last one may be short)."""
    return -(-self.num_rows // self.rows_per_shard)

  def shard_rows(self, shard: int) -> int:
    """Rows held by `shard` (the last shard may be short)."""
    return min(self.rows_per_shard, self.num_rows - shard * self.rows_per_shard)

  def _check_rows(self, rows: np.ndarray) -> None:
    if rows.ndim < 1 or rows.shape[-1] != self.offsets.shape[0]:
      raise ValueError(f"per-head rows of shape {rows.shape} must end in H={self.offsets.shape[0]}")
    bad = (rows < 0) | (rows >= self.head_sizes)
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
        f"row {int(rows[pos])} at {pos} is outside head {pos[-1]}'s [0, {int(self.head_sizes[pos[-1]])})"
      )

  def locate_np(self, head_rows) -> tuple[np.ndarray, np.ndarray]:
    """Host reference (int64 arithmetic): per-head rows [..., H] -> (shard, local) int32."""
    rows = np.asarray(head_rows)
    self._check_rows(rows)
    flat = flat_rows_np(rows, self.offsets)
    return (flat // self.rows_per_shard).astype(np.int32), (flat % self.rows_per_shard).astype(np.int32)

  def offset_parts(self) -> tuple[np.ndarray, np.ndarray]:
    """(q, m) with offsets = q * S + m: np.int32 [H] each, computed on the host in int64."""
    s = self.rows_per_shard
    return (self.offsets // s).astype(np.int32), (self.offsets % s).astype(np.int32)

  def locate(self, head_rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Device form (traceable, no int64): per-head rows int32 [..., H] -> (shard, local) int32.

    Rows must be valid (0 <= row < head size); under jit that cannot be checked here.
    """
    q, m = self.offset_parts()
    s = np.uint32(self.rows_per_shard)
    t = head_rows.astype(jnp.uint32) + jnp.asarray(m, jnp.uint32)  # < 2^32: no wrap
    shard = jnp.asarray(q, jnp.int32) + (t // s).astype(jnp.int32)
    return shard, (t % s).astype(jnp.int32)
