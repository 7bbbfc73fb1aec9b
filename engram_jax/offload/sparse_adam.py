"""Row-sparse Adam for Engram tables: the host tables' per-row Adam and the device tables'
catch-up Adam (dense Adam's result at the cost of the rows a batch touches).

Training with a host table: the step's loss gradient w.r.t. the gathered rows
[..., H, d] is reduced on the device by `sparse_grad` to (unique rows, summed gradient),
copied to the host, and `SparseRowAdam.apply` updates only those rows of the table and
of its state (m, v [R, d] and a step count per row, all beside the table in host memory).

`SparseRowAdam`: bias correction is PER ROW: each row runs Adam over the steps in which it
was touched, with t = that row's own count. Consequences, precisely:
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

Catch-up Adam (`catchup_init`, `catchup_rows`, `apply_row_adam`, `catchup_flush`;
`CatchupRowAdam` on NumPy): dense `optax.adam` (global step t, global bias correction, a
zero gradient for every row a step does not touch), evaluated lazily. Each row stores the
global step s of its last update (`last`); the steps s+1 .. t-1 it sat out are applied when
it is next touched (`catchup_rows`, BEFORE the step gathers it, so the forward pass sees
dense Adam's row) or by `catchup_flush` (every row: for evaluation and export, O(table)):
  - m <- b1^n m, v <- b2^n v over the n = t-1-s skipped steps: exact.
  - the drift, sum over skipped steps i of lr_i m_hat_i / (sqrt(v_hat_i) + eps), in closed
    form: move = m_s C1^2 / (sqrt(v_s) C1 + eps C2), with per-row scalars
      C1 = sum_i lr_i sqrt(k2_i) / k1_i r1^(i-s),  C2 = sum_i lr_i k2_i / k1_i r2^(i-s),
    k_i = 1 - b^(i+1), r1 = b1 / sqrt(b2), r2 = b1 / b2 (< 1 required). It is the exact
    move when eps = 0 or when a single step was skipped; otherwise it replaces the mean of
    1 / (1 + z_i), z_i = eps / sqrt(v_hat_i), by 1 / (1 + mean z) (weights C1's terms):
    first-order exact in z, never larger than dense Adam's move (Jensen). Measured
    (tests): within 1e-5 relative of dense Adam with |g| >> eps, within 5% with |g| ~ eps.
  - only the first W = `catchup_window(b1, b2)` skipped steps after s count: the rest
    weigh < 1e-7 (r2^W) of the series.
  The lrs of the last W steps live in a ring (`lrs`); the coefficients of a row whose W
  steps have left it are recorded per step in a second ring (`done`, C = 2^18 steps, 2 MiB
  per table). A row that sat out more than C steps reads the record of a step C, 2C, ...
  later than its own (the same series under that step's lrs: exact for a constant lr once
  the bias corrections are ~1; use a larger C for runs whose rows sit out longer). Cost
  per step: O(U d + W), U rows touched. A row touched at every step follows `optax.adam`
  exactly (no skipped steps; tested). No weight decay.
"""

from __future__ import annotations

import functools
import math
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


@functools.partial(jax.jit, static_argnames=("b1", "b2", "eps", "wd", "on_host"), donate_argnums=(0, 1, 2, 3))
def _apply_jax(p, m, v, c, rows, g, n_valid, lr, *, b1, b2, eps, wd, on_host):
  body = functools.partial(_apply_jax_body, b1=b1, b2=b2, eps=eps, wd=wd)
  rows, g = _repeat_last_valid(rows, g, n_valid)
  if not on_host:
    return body(p, m, v, c, rows, g, lr)
  host = jax.memory.Space.Host
  rows, g, lr = (jax.device_put(x, host) for x in (rows, g, lr))
  return compute_on(body, compute_type="device_host", out_memory_spaces=host)(p, m, v, c, rows, g, lr)


def _numpy_rows(table, unique_rows, summed_grads, count) -> tuple[np.ndarray, np.ndarray]:
  """The real rows (int64 [n]) and their summed grads [n, d] of a NumPy update: the first
  `count` entries (all when None) without `sparse_grad`'s padding (ids >= R); ValueError for
  a bad shape, a count past the rows given, negative or repeated ids."""
  rows = np.asarray(unique_rows).reshape(-1).astype(np.int64)
  grads = np.asarray(summed_grads)
  if grads.shape != (rows.shape[0], table.shape[1]):
    raise ValueError(f"summed_grads {grads.shape} must be [{rows.shape[0]}, {table.shape[1]}]")
  n = rows.shape[0] if count is None else int(count)
  if n > rows.shape[0]:
    raise ValueError(f"count={n} exceeds the {rows.shape[0]} rows given")
  keep = rows[:n] < table.shape[0]  # drop sparse_grad padding
  rows, grads = rows[:n][keep], grads[:n][keep]
  if (rows < 0).any():
    raise ValueError(f"negative row id {int(rows[rows < 0][0])} in unique_rows")
  if np.unique(rows).size != rows.size:
    raise ValueError("unique_rows has duplicates: sum their gradients first (sparse_grad)")
  return rows, grads


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
    rows, grads = _numpy_rows(table, unique_rows, summed_grads, count)
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


CATCHUP_RECORD_STEPS = 1 << 18  # C: 2 float32 per step, 2 MiB per table


class CatchupState(NamedTuple):
  """State of catch-up Adam for one table [R, d].

  m, v: [R, d] float32, as of each row's `last` step; last: int32 [R], the global step index
  of each row's last update (-1: never); step: int32 [], steps applied so far (the next
  step's index t); lrs: float32 [W], the lr of step i at lrs[i % W] (the last W steps);
  done: float32 [C, 2], the whole drift coefficients (C1, C2) of a row last updated at
  step s at done[s % C], once s + W < t (C = CATCHUP_RECORD_STEPS by default).
  """

  m: np.ndarray | jax.Array
  v: np.ndarray | jax.Array
  last: np.ndarray | jax.Array
  step: np.ndarray | jax.Array
  lrs: np.ndarray | jax.Array
  done: np.ndarray | jax.Array


def catchup_window(b1: float, b2: float, tol: float = 1e-7) -> int:
  """W, the skipped steps after a row's last update that its drift sums over: the later
  ones' terms (ratios r1 = b1 / sqrt(b2) and r2 = b1 / b2 <= ... per step) sum to < tol of
  the whole series' bound."""
  if not 0 <= b1 < b2 < 1:
    raise ValueError(f"catch-up Adam needs 0 <= b1 < b2 < 1 (a decaying drift), got b1={b1} b2={b2}")
  if b1 == 0:
    return 1
  window = math.ceil(math.log(tol) / math.log(b1 / b2))  # b1 / b2 >= b1 / sqrt(b2)
  if window > 100_000:
    raise ValueError(f"catch-up Adam: b1={b1}, b2={b2} give a drift window of {window} steps (> 100,000)")
  return window


def catchup_init(table: np.ndarray | jax.Array, window: int, capacity: int = CATCHUP_RECORD_STEPS) -> CatchupState:
  """Zero state beside `table` [R, d]: NumPy for a NumPy table, else jax arrays (the
  per-row ones with the table's sharding). `window` from `catchup_window`; `capacity`: C,
  the steps a row may sit out (past W) and still get its own drift (module docstring)."""
  if capacity <= window:
    raise ValueError(f"catch-up Adam capacity must exceed the window {window} steps, got {capacity}")
  if isinstance(table, np.ndarray):
    dt = np.float32 if table.dtype.itemsize < 4 else table.dtype
    z = lambda: np.zeros(table.shape, dt)  # noqa: E731
    last = np.full(table.shape[0], -1, np.int32)
    return CatchupState(z(), z(), last, np.zeros((), np.int32), np.zeros(window), np.zeros((capacity, 2)))
  check_int32_rows(table.shape[0], "catch-up Adam table")
  dt = jnp.promote_types(table.dtype, jnp.float32)
  put = lambda x: jax.device_put(x, table.sharding)  # noqa: E731
  return CatchupState(
    put(jnp.zeros(table.shape, dt)),
    put(jnp.zeros(table.shape, dt)),
    put(jnp.full(table.shape[0], -1, jnp.int32)),
    jnp.zeros((), jnp.int32),
    jnp.zeros(window, jnp.float32),
    jnp.zeros((capacity, 2), jnp.float32),
  )


def _ratios(b1, b2):
  return b1 / math.sqrt(b2), b1 / b2


def _drift_series(xp, lrs, t, b1, b2):
  """(S1, S2) [W] over the ring's steps i = t - W + q: S[q] = sum_{q' >= q} w(i') r^(q' - q + 1)
  with w1 = lr_i sqrt(k2_i) / k1_i and w2 = lr_i k2_i / k1_i (k_i = 1 - b^(i+1); w = 0
  before step 0): the coefficients of a row last updated at step i - 1. O(W) scalars."""
  window = lrs.shape[0]
  q = xp.arange(window)
  i = (t - window + q).astype(lrs.dtype)
  lr = xp.where(i >= 0, lrs[(t + q) % window], 0)  # lrs[i % W]
  c = xp.maximum(i, 0) + 1
  k1, k2 = 1 - b1**c, 1 - b2**c
  out = []
  for w, r in zip((lr * xp.sqrt(k2) / k1, lr * k2 / k1), _ratios(b1, b2)):
    rq = r ** (q + 1).astype(lrs.dtype)  # >= r^(W+1) ~ tol: no underflow
    out.append(xp.cumsum((w * rq)[::-1])[::-1] / rq * r)
  return out


def _catch_up(xp, p, m, v, last, series, done, t, b1, b2, eps):
  """Rows p, m, v [U, d], last [U] brought from their `last` step to step t - 1 (the steps
  between had gradient 0). Returns (p, m, v) in m's dtype; their new `last` is t - 1."""
  window, capacity = series[0].shape[0], done.shape[0]
  in_ring = last + 1 >= t - window  # every skipped step's lr is in the ring
  q0 = xp.clip(last + 1 - (t - window), 0, window - 1)
  old = done[xp.maximum(last, 0) % capacity]
  c1, c2 = (
    xp.where(last < t - 1, xp.where(in_ring, s[q0], old[:, k]), 0).astype(m.dtype)[:, None]
    for k, s in enumerate(series)
  )
  # sum_j c1_j m / (sqrt(v) + eps / b_j) ~ m c1^2 / (sqrt(v) c1 + eps c2): module docstring
  den = xp.sqrt(v) * c1 + eps * c2
  move = xp.where(den > 0, m * c1 * c1 / xp.where(den > 0, den, 1), 0)
  n = (t - 1 - last).astype(m.dtype)[:, None]
  return p.astype(m.dtype) - move, m * b1**n, v * b2**n


def _adam_global(xp, p, m, v, g, t, lr, b1, b2, eps):
  """One optax.adam step at global step index t (bias correction t + 1) on rows [U, d]."""
  m = (1 - b1) * g + b1 * m
  v = (1 - b2) * (g * g) + b2 * v
  c = xp.asarray(t + 1).astype(m.dtype)
  update = (m / (1 - b1**c)) / (xp.sqrt(v / (1 - b2**c)) + eps)
  return p - lr * update, m, v


def _rows_caught_up(state, table, rows, b1, b2, eps):
  take = lambda a: a.at[rows].get(mode="promise_in_bounds")  # noqa: E731
  series = _drift_series(jnp, state.lrs, state.step, b1, b2)
  last = take(state.last)
  p, m, v = _catch_up(jnp, take(table), take(state.m), take(state.v), last, series, state.done, state.step, b1, b2, eps)
  return series, p, m, v, last


def _put(a, rows, x):
  return a.at[rows].set(jnp.broadcast_to(x, rows.shape + a.shape[1:]).astype(a.dtype), mode="promise_in_bounds")


def catchup_rows(
  table: jax.Array, state: CatchupState, rows: jax.Array, *, b1: float, b2: float, eps: float
) -> tuple[jax.Array, CatchupState]:
  """Brings `rows` (flat ids [...], in range, repeats allowed) up to the current step:
  their skipped steps' decay and drift applied (module docstring), `last` = step - 1.
  Jit-able; O(rows * d). Call it before the step gathers those rows."""
  rows = rows.reshape(-1).astype(jnp.int32)
  _, p, m, v, last = _rows_caught_up(state, table, rows, b1, b2, eps)
  # max(last, t - 1) = t - 1; read from the gathered ids, so that the scatter waits for the
  # gather (else XLA copies `last`, O(R), to keep the old values readable)
  last = _put(state.last, rows, jnp.maximum(last, state.step - 1))
  return _put(table, rows, p), state._replace(m=_put(state.m, rows, m), v=_put(state.v, rows, v), last=last)


def catchup_flush(
  table: jax.Array, state: CatchupState, *, b1: float, b2: float, eps: float
) -> tuple[jax.Array, CatchupState]:
  """Every row brought up to the current step: the table dense Adam would hold after
  `state.step` steps (module docstring). O(R * d); for evaluation, export, checkpoints."""
  t = state.step
  series = _drift_series(jnp, state.lrs, t, b1, b2)
  p, m, v = _catch_up(jnp, table, state.m, state.v, state.last, series, state.done, t, b1, b2, eps)
  return p.astype(table.dtype), state._replace(m=m, v=v, last=jnp.full_like(state.last, t - 1))


def apply_row_adam(
  table: jax.Array,
  state: SparseRowState | CatchupState,
  sparse: tuple[jax.Array, jax.Array, jax.Array],
  lr: jax.Array,
  *,
  b1: float,
  b2: float,
  eps: float,
  weight_decay: float = 0.0,
) -> tuple[jax.Array, SparseRowState | CatchupState]:
  """One row-sparse Adam step on a device table inside a jitted step, on the rows a batch
  touched. Jit-able; O(U * d) work (+ W for catch-up) when the caller donates table and
  state (the scatters are then in place), whatever R is.

  Args:
    table: [R, d]; state: a `SparseRowState` (m, v [R, d], count int32 [R]: per-row Adam,
      `SparseRowAdam.apply` traceable) or a `CatchupState` (dense Adam evaluated lazily: the
      rows' skipped steps caught up first, a no-op after `catchup_rows`; it records lr and
      the drift coefficients that leave the ring; no weight decay).
    sparse: `sparse_grad`'s (unique_rows [U], summed_grads [U, d], count int32 [] >= 1: a
      batch always touches a row); entries past `count` are ignored.
    lr: this step's learning rate (scalar, traced).
  Returns:
    (table, state) with the `count` rows updated.
  """
  unique_rows, summed_grads, count = sparse
  rows, g = _repeat_last_valid(unique_rows.astype(jnp.int32), summed_grads, count)
  if isinstance(state, SparseRowState):
    out = _apply_jax_body(table, *state, rows, g, lr, b1=b1, b2=b2, eps=eps, wd=weight_decay)
    return out[0], SparseRowState(*out[1:])
  if weight_decay:
    raise ValueError(f"catch-up Adam has no weight decay, got weight_decay={weight_decay}")
  t, lr = state.step, jnp.asarray(lr)
  series, p, m, v, last = _rows_caught_up(state, table, rows, b1, b2, eps)
  p, m, v = _adam_global(jnp, p, m, v, g.astype(m.dtype), t, lr.astype(m.dtype), b1, b2, eps)
  window, capacity = state.lrs.shape[0], state.done.shape[0]
  # the row last updated at step t - 1 - W has all its W skipped steps' lrs in the ring now
  s = t - 1 - window
  done = state.done.at[jnp.where(s >= 0, s % capacity, capacity)].set(jnp.stack([x[0] for x in series]), mode="drop")
  return _put(table, rows, p), CatchupState(
    _put(state.m, rows, m),
    _put(state.v, rows, v),
    _put(state.last, rows, jnp.maximum(last, t)),  # = t, after the gather (as in catchup_rows)
    t + 1,
    state.lrs.at[t % window].set(lr.astype(state.lrs.dtype)),
    done,
  )


class CatchupRowAdam:
  """Catch-up Adam on a NumPy table, in place (the math of `apply_row_adam`'s catch-up; module
  docstring). State from `init`; `catch_up` the rows a step will gather, `apply` their
  summed gradients, `flush` before reading the whole table."""

  def __init__(
    self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, capacity: int = CATCHUP_RECORD_STEPS
  ):
    if lr <= 0:
      raise ValueError(f"CatchupRowAdam lr must be > 0, got {lr}")
    self.lr, self.b1, self.b2, self.eps, self.capacity = lr, b1, b2, eps, capacity
    self.window = catchup_window(b1, b2)

  def init(self, table: np.ndarray) -> CatchupState:
    return catchup_init(np.asarray(table), self.window, self.capacity)

  def _caught_up(self, table, state, rows):
    t = int(state.step)
    series = _drift_series(np, state.lrs, t, self.b1, self.b2)
    rs = (table[rows], state.m[rows], state.v[rows], state.last[rows])
    return t, series, *_catch_up(np, *rs, series, state.done, t, self.b1, self.b2, self.eps)

  def catch_up(self, table: np.ndarray, state: CatchupState, rows) -> None:
    """Brings `rows` (ids in [0, R), repeats allowed) up to the current step, in place."""
    rows = np.unique(np.asarray(rows).reshape(-1))
    if rows.size and (rows[0] < 0 or rows[-1] >= table.shape[0]):
      raise ValueError(f"row ids must be in [0, {table.shape[0]}), got {rows[0]}..{rows[-1]}")
    t, _, p, m, v = self._caught_up(table, state, rows)
    table[rows], state.m[rows], state.v[rows], state.last[rows] = p, m, v, t - 1

  def apply(self, table: np.ndarray, state: CatchupState, unique_rows, summed_grads, count=None, *, lr=None) -> None:
    """One step on the given rows (as `SparseRowAdam.apply`: padding >= R and entries past
    `count` ignored, no duplicates), in place; `lr` overrides the learning rate."""
    rows, grads = _numpy_rows(table, unique_rows, summed_grads, count)
    lr = self.lr if lr is None else float(lr)
    t, series, p, m, v = self._caught_up(table, state, rows)
    p, m, v = _adam_global(np, p, m, v, grads.astype(m.dtype), t, lr, self.b1, self.b2, self.eps)
    table[rows], state.m[rows], state.v[rows], state.last[rows] = p, m, v, t
    if t - 1 - self.window >= 0:
      state.done[(t - 1 - self.window) % self.capacity] = [x[0] for x in series]
    state.lrs[t % self.window] = lr
    state.step[...] = t + 1

  def flush(self, table: np.ndarray, state: CatchupState) -> None:
    """Every row brought up to the current step, in place (O(R * d))."""
    self.catch_up(table, state, np.arange(table.shape[0]))
