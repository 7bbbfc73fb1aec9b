"""Row-sparse Adam for Engram tables that live in host memory.

Training with a host table: the step's loss gradient w.r.t. the gathered rows
[..., H, d] is reduced on the device by `sparse_grad` to (unique rows, summed gradient),
copied to the host, and `SparseRowAdam.apply` updates only those rows of the table and
of its state (m, v [R, d] and a step count per row, all beside the table in host memory).

Bias correction is PER ROW: each row runs Adam over the steps in which it was touched,
with t = that row's own count. Consequences, precisely:
  - a row touched at every step follows dense Adam (`optax.adam`, same lr, b1, b2, eps)
    exactly (tested);
  - an untouched row keeps its parameters, m, v and count unchanged. Dense Adam instead
    treats it as gradient 0: it decays m <- b1 m, v <- b2 v, advances the global t, and
    keeps MOVING the row by lr * m_hat / (sqrt(v_hat) + eps) while m != 0 (a row seen
    once drifts for ~1/(1-b1) more steps). Sparse Adam applies no such drift and does no
    decay; when the row returns, its m, v resume from where they were.
  - with a global count instead (TF LazyAdam), a row first touched at step 1000 would get
    bias correction ~1 and a first step of ~lr * (1-b1)/sqrt(1-b2) = 3.16 lr; the per-row
    count gives every row's first step size ~lr, as for a fresh Adam. Rare (Zipf tail)
    rows are exactly the ones this matters for.
Weight decay (decoupled, AdamW style) applies to touched rows only; Engram tables use 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

from engram_jax.offload.indexing import check_int32_rows


class SparseRowState(NamedTuple):
  """m, v: [R, d] (table dtype, float32 recommended); count: int32 [R] steps per row."""

  m: np.ndarray | jax.Array
  v: np.ndarray | jax.Array
  count: np.ndarray | jax.Array


def sparse_grad(
  row_ids: jax.Array, row_grads: jax.Array, num_rows: int, size: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sums the gradients of repeated rows; jit-compatible (static `size`).

  Args:
    row_ids: flat row ids [...] (offsets added), int, all in [0, num_rows).
    row_grads: [..., d] gradient of every looked-up row.
    num_rows: R, rows of the table (must fit int32). Padding uses R as the row id.
    size: static number of output slots; default row_ids.size (always enough). It must be
      >= the number of distinct ids or rows are lost; compare the returned count.
  Returns:
    unique_rows int32 [size] (ascending, padded with R), summed_grads [size, d] (zero on
    padding), count int32 [] = number of distinct ids (> size means overflow).
  """
  check_int32_rows(num_rows + 1, "sparse_grad table (+1 padding id)")
  if row_grads.shape[:-1] != row_ids.shape:
    raise ValueError(f"row_grads {row_grads.shape} must be row_ids {row_ids.shape} + [d]")
  ids = row_ids.reshape(-1).astype(jnp.int32)
  grads = row_grads.reshape(ids.shape[0], row_grads.shape[-1])
  size = ids.shape[0] if size is None else int(size)
  if size < 1:
    raise ValueError(f"sparse_grad size must be >= 1, got {size}")
  unique, inverse = jnp.unique(ids, size=size, fill_value=num_rows, return_inverse=True)
  inverse = inverse.reshape(-1)
  summed = jnp.zeros((size, grads.shape[-1]), grads.dtype).at[inverse].add(grads, mode="drop")
  ordered = jnp.sort(ids)
  count = (1 + jnp.sum(ordered[1:] != ordered[:-1])).astype(jnp.int32) if ids.size else jnp.int32(0)
  if not isinstance(count, jax.core.Tracer) and int(count) > size:
    raise ValueError(f"sparse_grad: {int(count)} distinct rows do not fit size={size}")
  return unique, summed, count


def _adam_rows(xp, p, m, v, c, g, lr, b1, b2, eps, wd):
  """Adam on gathered rows: p, m, v, g [U, d], c int32 [U] (counts BEFORE this step)."""
  c = c + 1
  t = c.astype(g.dtype)[:, None]
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  m_hat = m / (1 - xp.asarray(b1, g.dtype) ** t)
  v_hat = v / (1 - xp.asarray(b2, g.dtype) ** t)
  update = m_hat / (xp.sqrt(v_hat) + eps)
  if wd:
    update = update + wd * p
  return (p - lr * update).astype(p.dtype), m, v, c


def _apply_jax_body(p, m, v, c, rows, g, lr, *, b1, b2, eps, wd):
  # In-bounds rows only: out-of-bounds handling ('fill' / 'drop') creates constants that
  # compute_on('device_host') rejects (device-memory operands). Padding entries repeat the
  # last real row with its gradient, so duplicate writes carry identical values.
  take = lambda a: a.at[rows].get(mode="promise_in_bounds")
  new = _adam_rows(jnp, take(p), take(m), take(v), take(c), g.astype(m.dtype), lr, b1, b2, eps, wd)
  put = lambda a, x: a.at[rows].set(x, mode="promise_in_bounds")
  return tuple(put(a, x) for a, x in zip((p, m, v, c), new))


def _repeat_last_valid(rows, g, n_valid):
  # rows: [U] with the n_valid (>= 1) real rows first; the rest become copies of the last.
  keep = jnp.arange(rows.shape[0]) < n_valid
  return jnp.where(keep, rows, rows[n_valid - 1]), jnp.where(keep[:, None], g, g[n_valid - 1])


def apply_sparse_adam(
  table: jax.Array,
  state: SparseRowState,
  unique_rows: jax.Array,
  summed_grads: jax.Array,
  count: jax.Array,
  lr: jax.Array,
  *,
  b1: float,
  b2: float,
  eps: float,
  weight_decay: float = 0.0,
) -> tuple[jax.Array, SparseRowState]:
  """`SparseRowAdam.apply` as a traceable function, for a device table inside a jitted step.

  Args:
    table: [R, d]; state: its m, v [R, d] and count int32 [R].
    unique_rows, summed_grads, count: `sparse_grad`'s outputs ([U], [U, d], int32 [] >= 1:
      a batch always touches a row). Entries past `count` are ignored.
    lr: this step's learning rate (scalar, traced).
  Returns:
    (table, state) with the `count` rows updated; O(U * d) work when the caller donates
    them (the scatter is then in place), whatever R is.
  """
  rows, g = _repeat_last_valid(unique_rows.astype(jnp.int32), summed_grads, count)
  out = _apply_jax_body(table, *state, rows, g, lr, b1=b1, b2=b2, eps=eps, wd=weight_decay)
  return out[0], SparseRowState(*out[1:])


@functools.partial(jax.jit, static_argnames=("b1", "b2", "eps", "wd", "on_host"), donate_argnums=(0, 1, 2, 3))
def _apply_jax(p, m, v, c, rows, g, n_valid, lr, *, b1, b2, eps, wd, on_host):
  body = functools.partial(_apply_jax_body, b1=b1, b2=b2, eps=eps, wd=wd)
  rows, g = _repeat_last_valid(rows, g, n_valid)
  if not on_host:
    return body(p, m, v, c, rows, g, lr)
  host = jax.memory.Space.Host
  rows, g, lr = (jax.device_put(x, host) for x in (rows, g, lr))
  return compute_on(body, compute_type="device_host", out_memory_spaces=host)(p, m, v, c, rows, g, lr)


class SparseRowAdam:
  """Adam that touches only the rows it is given (see the module docstring).

  Works on a NumPy table (in place) or a jax.Array table in device or host memory
  (functional, buffers donated; host tables are updated under compute_on('device_host')).
  """

  def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
    if lr <= 0:
      raise ValueError(f"SparseRowAdam lr must be > 0, got {lr}")
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
      raise ValueError(f"SparseRowAdam needs 0 <= b1, b2 < 1, got b1={b1} b2={b2}")
    if weight_decay < 0:
      raise ValueError(f"SparseRowAdam weight_decay must be >= 0, got {weight_decay}")
    self.lr, self.b1, self.b2, self.eps, self.weight_decay = lr, b1, b2, eps, weight_decay

  def init(self, table) -> SparseRowState:
    """Zero state beside `table`: NumPy for a NumPy table, else the same memory kind."""
    if isinstance(table, np.ndarray):
      dt = np.float32 if table.dtype.itemsize < 4 else table.dtype
      return SparseRowState(np.zeros(table.shape, dt), np.zeros(table.shape, dt), np.zeros(table.shape[0], np.int32))
    check_int32_rows(table.shape[0], "SparseRowAdam jax table")
    dt = jnp.promote_types(table.dtype, jnp.float32)
    put = lambda x: jax.device_put(x, table.sharding)
    return SparseRowState(
      put(jnp.zeros(table.shape, dt)), put(jnp.zeros(table.shape, dt)), put(jnp.zeros(table.shape[0], jnp.int32))
    )

  def apply(self, table, state: SparseRowState, unique_rows, summed_grads, count=None, *, lr: float | None = None):
    """One step on the given rows.

    Args:
      table: [R, d] NumPy (updated in place) or jax.Array (donated: do not reuse it).
      state: from `init`, same kind as `table`.
      unique_rows: [U] distinct row ids, the real ones first (as `sparse_grad` returns
        them); entries >= R (its padding) or at positions >= count are ignored. The ids
        are not checked on the jax path (out-of-range rows are undefined behaviour there).
      summed_grads: [U, d] the summed gradient of every row.
      count: number of valid leading entries (None: all).
      lr: overrides the learning rate for this step (schedules).
    Returns:
      (table, state) after the step.
    """
    lr = self.lr if lr is None else lr
    num_rows = table.shape[0]
    if isinstance(table, np.ndarray):
      return self._apply_numpy(table, state, unique_rows, summed_grads, count, lr)
    rows = jnp.asarray(unique_rows, jnp.int32).reshape(-1)
    grads = jnp.asarray(summed_grads)
    if grads.shape != (rows.shape[0], table.shape[1]):
      raise ValueError(f"summed_grads {grads.shape} must be [{rows.shape[0]}, {table.shape[1]}]")
    # Real rows lead, padding (>= R, as sparse_grad pads) trails. One small host sync.
    n_valid = int(jnp.sum(rows < num_rows)) if count is None else int(count)
    if n_valid == 0:
      return table, state
    if n_valid > rows.shape[0]:
      raise ValueError(f"count={n_valid} exceeds the {rows.shape[0]} rows given")
    on_host = table.sharding.memory_kind not in (None, "device")
    out = _apply_jax(
      table,
      *state,
      rows,
      grads,
      jnp.int32(n_valid),
      jnp.float32(lr),
      b1=self.b1,
      b2=self.b2,
      eps=self.eps,
      wd=self.weight_decay,
      on_host=on_host,
    )
    return out[0], SparseRowState(*out[1:])

  def _apply_numpy(self, table, state, unique_rows, summed_grads, count, lr):
    rows = np.asarray(unique_rows).reshape(-1).astype(np.int64)
    grads = np.asarray(summed_grads)
    if grads.shape != (rows.shape[0], table.shape[1]):
      raise ValueError(f"summed_grads {grads.shape} must be [{rows.shape[0]}, {table.shape[1]}]")
    n = rows.shape[0] if count is None else int(count)
    if n > rows.shape[0]:
      raise ValueError(f"count={n} exceeds the {rows.shape[0]} rows given")
    rows, grads = rows[:n], grads[:n]
    keep = rows < table.shape[0]  # drop sparse_grad padding
    rows, grads = rows[keep], grads[keep]
    if (rows < 0).any():
      raise ValueError(f"negative row id {int(rows[rows < 0][0])} in unique_rows")
    if np.unique(rows).size != rows.size:
      raise ValueError("unique_rows has duplicates: sum their gradients first (sparse_grad)")
    m, v, c = state
    p_new, m_new, v_new, c_new = _adam_rows(
      np,
      table[rows],
      m[rows],
      v[rows],
      c[rows],
      grads.astype(m.dtype),
      float(lr),
      self.b1,
      self.b2,
      self.eps,
      self.weight_decay,
    )  # Python floats: weak, like optax's constants
    table[rows], m[rows], v[rows], c[rows] = p_new, m_new, v_new, c_new
    return table, state
