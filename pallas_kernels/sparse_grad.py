"""Table gradient in sparse form, for optimizers that keep the table on host.

The dense table gradient of a gather is a scatter-add of row gradients into a
[R, d] array that is almost all zeros. Here the same gradient is returned as
(unique row ids, summed row gradients, count), padded to a fixed size so that it
works under jit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SparseRowGrad(NamedTuple):
  """Sparse table gradient.

  row_ids: [M] int32, unique ids ascending in slots [0, count); padding slots
    hold `num_rows` (one past the last row, so a scatter with mode="drop" skips
    them).
  grads: [M, d] float32, summed gradient of each unique row; zero in padding.
  count: [] int32, number of valid slots.
  """

  row_ids: jax.Array
  grads: jax.Array
  count: jax.Array

  def to_dense(self, num_rows: int, dtype=jnp.float32) -> jax.Array:
    """-> [num_rows, d] dense gradient (for tests and small tables)."""
    out = jnp.zeros((num_rows, self.grads.shape[1]), jnp.float32)
    return out.at[self.row_ids].add(self.grads, mode="drop").astype(dtype)


def gather_rows_sparse_grad(
  row_ids: jax.Array, d_rows: jax.Array, num_rows: int, *, max_unique: int | None = None
) -> SparseRowGrad:
  """The table gradient of gather_rows in sparse form: row_ids [N, H], d_rows [N, H*d] -> SparseRowGrad.

  max_unique: the padded size M (default N*H, which can never overflow). With a
  smaller M, ids beyond the M smallest unique ids are dropped; `count` reports
  the true number of unique ids so callers can detect it (count > M).
  """
  n, h = row_ids.shape
  d = d_rows.shape[1] // h
  if d_rows.shape != (n, h * d):
    raise ValueError(f"d_rows shape {d_rows.shape} does not match row_ids {row_ids.shape}")
  size = n * h if max_unique is None else int(max_unique)
  if size <= 0:
    raise ValueError(f"max_unique must be positive, got {max_unique}")
  flat = row_ids.reshape(-1).astype(jnp.int32)
  uniq = jnp.unique(flat, size=size, fill_value=num_rows)
  sorted_ids = jnp.sort(flat)
  count = 1 + jnp.sum(sorted_ids[1:] != sorted_ids[:-1]).astype(jnp.int32)
  # Slot of each id; ids whose slot was cut off by max_unique go to segment
  # `size`, which segment_sum drops.
  slot = jnp.clip(jnp.searchsorted(uniq, flat), 0, size - 1)
  slot = jnp.where(uniq[slot] == flat, slot, size)
  grads = jax.ops.segment_sum(d_rows.reshape(n * h, d).astype(jnp.float32), slot, num_segments=size)
  valid = jnp.arange(size) < count
  grads = jnp.where(valid[:, None], grads, 0.0)
  uniq = jnp.where(valid, uniq, num_rows).astype(jnp.int32)
  return SparseRowGrad(uniq, grads, count)
