"""Index arithmetic for tables past 2^31 rows, checked at the boundary without big arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.offload.indexing import (
  INT32_MAX,
  RowSharding,
  check_int32_rows,
  flat_rows_np,
  head_offsets,
  join_hi_lo,
  split_hi_lo,
)

# Heads sized so that head 1 starts 3 rows before 2^31 and straddles it, and the last heads
# push the layer past 2^32 rows (every head is < 2^31 rows, as per-head ids are int32).
SIZES = [INT32_MAX - 2, 1_000_003, INT32_MAX, INT32_MAX - 7, 12_345]


def _boundary_rows(sizes):
  """Per-head rows [N, H] hitting each head's first/last rows and the 2^31/2^32 crossings."""
  offsets = head_offsets(sizes)
  cols = []
  for off, size in zip(offsets, sizes):
    cand = [0, 1, 2, 3, size - 1, size - 2, size // 2]
    for boundary in (1 << 31, 1 << 32):  # flat ids 2^31-1 .. 2^31+1 etc. when inside the head
      for delta in (-1, 0, 1):
        r = boundary + delta - int(off)
        if 0 <= r < size:
          cand.append(r)
    cols.append(cand)
  n = max(len(c) for c in cols)
  return np.stack([np.resize(np.asarray(c, np.int64), n) for c in cols], axis=-1)


def test_flat_rows_exact_in_int64_across_2_31():
  offsets = head_offsets(SIZES)
  assert offsets[1] == INT32_MAX - 2 and offsets[2] == INT32_MAX - 2 + 1_000_003
  rows = np.array([[0, 0, 0, 0, 0], [SIZES[0] - 1, 2, 5, 1, 12_344]], np.int32)
  flat = flat_rows_np(rows, offsets)
  assert flat.dtype == np.int64
  assert flat[1, 0] == INT32_MAX - 3
  assert flat[1, 1] == INT32_MAX  # 2^31 - 1: the last int32 id
  assert flat[0, 2] == INT32_MAX - 2 + 1_000_003  # past 2^31: would wrap in int32
  assert flat[1, 4] == sum(SIZES) - 1 and flat[1, 4] > 1 << 32
  with pytest.raises(ValueError, match="end in H=5"):
    flat_rows_np(rows[:, :3], offsets)


def test_hi_lo_roundtrip_at_boundaries():
  ids = np.array(
    [0, 1, INT32_MAX - 1, INT32_MAX, 1 << 31, (1 << 31) + 1, (1 << 32) - 1, 1 << 32, (1 << 40) + 12345], np.int64
  )
  hi, lo = split_hi_lo(ids)
  assert hi.dtype == lo.dtype == np.int32
  assert (lo >= 0).all()
  np.testing.assert_array_equal(join_hi_lo(hi, lo), ids)
  np.testing.assert_array_equal(hi[:5], [0, 0, 0, 0, 1])
  with pytest.raises(ValueError, match=r"\[0, 2\^62\)"):
    split_hi_lo(np.array([-1]))


@pytest.mark.parametrize("rows_per_shard", [INT32_MAX, 1 << 30, 999_999_937, 7])
def test_device_locate_equals_int64_reference(rows_per_shard):
  sharding = RowSharding.from_head_sizes(SIZES, rows_per_shard)
  rows = _boundary_rows(SIZES)
  want_shard, want_local = sharding.locate_np(rows)
  flat = flat_rows_np(rows, sharding.offsets)
  np.testing.assert_array_equal(want_shard.astype(np.int64) * rows_per_shard + want_local, flat)
  shard, local = jax.jit(sharding.locate)(jnp.asarray(rows, jnp.int32))
  assert shard.dtype == local.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(shard), want_shard)
  np.testing.assert_array_equal(np.asarray(local), want_local)
  assert (np.asarray(local) < rows_per_shard).all() and (np.asarray(local) >= 0).all()


def test_row_sharding_shapes_and_errors():
  s = RowSharding.even(SIZES, 4)
  assert s.num_rows == sum(SIZES) and s.num_shards == 4
  assert sum(s.shard_rows(i) for i in range(s.num_shards)) == s.num_rows
  with pytest.raises(ValueError, match="rows_per_shard"):
    RowSharding.from_head_sizes(SIZES, 1 << 31)
  with pytest.raises(ValueError, match="outside head 1"):
    s.locate_np(np.array([[0, SIZES[1], 0, 0, 0]]))
  with pytest.raises(ValueError, match="per-head rows must fit int32"):
    RowSharding.from_head_sizes([1 << 32], INT32_MAX)


def test_check_int32_rows():
  check_int32_rows(1 << 31)  # ids 0 .. 2^31 - 1
  with pytest.raises(ValueError, match="do not fit int32"):
    check_int32_rows((1 << 31) + 1)


def test_device_locate_worst_case_uint32_sum():
  # Head 1 starts at S - 1 with S = 2^31 - 1: m = 2^31 - 2, and its last row is 2^31 - 2,
  # so m + row = 2^32 - 4: wraps in int32, exact in uint32.
  sharding = RowSharding.from_head_sizes([INT32_MAX - 1, INT32_MAX], INT32_MAX)
  _, m = sharding.offset_parts()
  assert m[1] == INT32_MAX - 1
  rows = np.array([[0, INT32_MAX - 1], [INT32_MAX - 2, 0], [1, 1]], np.int32)
  shard, local = sharding.locate(jnp.asarray(rows))
  want_shard, want_local = sharding.locate_np(rows)
  np.testing.assert_array_equal(np.asarray(shard), want_shard)
  np.testing.assert_array_equal(np.asarray(local), want_local)
  # flat = (S - 1) + (S - 1) = 2S - 2: shard 1, local S - 2.
  assert want_shard[0, 1] == 1 and want_local[0, 1] == INT32_MAX - 2
