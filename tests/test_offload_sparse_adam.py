"""Row-sparse Adam: equals optax.adam when every row is touched; untouched rows stay put."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax.offload import placement
from engram_jax.offload.sparse_adam import (
  CATCHUP_RECORD_STEPS,
  CatchupRowAdam,
  SparseRowAdam,
  apply_row_adam,
  catchup_flush,
  catchup_init,
  catchup_rows,
  catchup_window,
  sparse_grad,
)

R, D, N, H = 24, 8, 40, 3
HP = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}
LR = 5 * 4e-4  # Engram tables: 5x the backbone lr, no weight decay


def _steps(seed=0, steps=4, touch_all=True):
  """Per step: (row_ids [N, H], row_grads [N, H, D]); every row appears when touch_all."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    ids = rng.integers(0, R if touch_all else R // 2, size=(N, H))
    if touch_all:
      ids.reshape(-1)[:R] = rng.permutation(R)
    out.append((ids.astype(np.int32), rng.normal(size=(N, H, D)).astype(np.float32)))
  return out


def _scatter(ids, grads):
  out = np.zeros((R, D), np.float64)
  np.add.at(out, ids.reshape(-1), grads.reshape(-1, D))
  return out.astype(np.float32)


def test_sparse_grad_sums_duplicates_and_pads():
  ids = jnp.array([[5, 2], [5, 7], [2, 5]], jnp.int32)
  grads = jnp.arange(6 * 2, dtype=jnp.float32).reshape(3, 2, 2)
  rows, summed, count = jax.jit(sparse_grad, static_argnames=("num_rows", "size"))(ids, grads, num_rows=10, size=5)
  assert int(count) == 3
  np.testing.assert_array_equal(np.asarray(rows), [2, 5, 7, 10, 10])
  g = np.asarray(grads).reshape(6, 2)
  np.testing.assert_allclose(np.asarray(summed), [g[1] + g[4], g[0] + g[2] + g[5], g[3], [0, 0], [0, 0]])
  with pytest.raises(ValueError, match="do not fit size=2"):
    sparse_grad(ids, grads, num_rows=10, size=2)
  with pytest.raises(ValueError, match="row_grads"):
    sparse_grad(ids, grads[:, :1], num_rows=10)


@pytest.mark.parametrize("backend", ["numpy", "host", "device"])
def test_every_row_touched_equals_optax_adam(backend):
  table0 = np.random.default_rng(1).normal(size=(R, D)).astype(np.float32)
  opt = optax.adam(LR, **HP)
  dense, dstate = jnp.asarray(table0), opt.init(jnp.asarray(table0))
  sparse = SparseRowAdam(LR, **HP)
  if backend == "numpy":
    table = table0.copy()
  elif backend == "host":
    table = placement.to_host(table0)
  else:
    table = jnp.asarray(table0)
  state = sparse.init(table)
  grad_fn = jax.jit(sparse_grad, static_argnames=("num_rows", "size"))
  for ids, grads in _steps():
    updates, dstate = opt.update(jnp.asarray(_scatter(ids, grads)), dstate)
    dense = optax.apply_updates(dense, updates)
    rows, summed, count = grad_fn(jnp.asarray(ids), jnp.asarray(grads), num_rows=R, size=N * H)
    table, state = sparse.apply(table, state, rows, summed, count)
  if backend == "host":
    assert table.sharding.memory_kind == placement.host_memory_kind()
    assert state.m.sharding.memory_kind == placement.host_memory_kind()
  np.testing.assert_allclose(np.asarray(table), np.asarray(dense), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.m), np.asarray(dstate[0].mu), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state.v), np.asarray(dstate[0].nu), rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(np.asarray(state.count), np.full(R, 4))
  assert np.abs(np.asarray(table) - table0).min() > 0  # every row moved


@pytest.mark.parametrize("backend", ["numpy", "host"])
def test_untouched_rows_and_state_unchanged(backend):
  table0 = np.random.default_rng(2).normal(size=(R, D)).astype(np.float32)
  sparse = SparseRowAdam(LR, **HP)
  table = table0.copy() if backend == "numpy" else placement.to_host(table0)
  state = sparse.init(table)
  steps = _steps(seed=3, steps=3, touch_all=False)  # only rows < R // 2 are touched
  # Seed the untouched rows' state as if they had been trained before.
  m0 = np.random.default_rng(4).normal(size=(R, D)).astype(np.float32)
  v0 = np.abs(m0) + 0.5
  c0 = np.full(R, 7, np.int32)
  if backend == "numpy":
    state.m[:], state.v[:], state.count[:] = m0, v0, c0
  else:
    state = type(state)(*(placement.to_host(x) for x in (m0, v0, c0)))
  touched = np.zeros(R, bool)
  for ids, grads in steps:
    rows, summed, count = sparse_grad(jnp.asarray(ids), jnp.asarray(grads), R)
    table, state = sparse.apply(table, state, rows, summed, count)
    touched[ids.reshape(-1)] = True
  assert touched.sum() < R
  un = ~touched
  np.testing.assert_array_equal(np.asarray(table)[un], table0[un])
  np.testing.assert_array_equal(np.asarray(state.m)[un], m0[un])
  np.testing.assert_array_equal(np.asarray(state.v)[un], v0[un])
  np.testing.assert_array_equal(np.asarray(state.count)[un], c0[un])
  assert (np.asarray(state.count)[touched] > 7).all()
  assert (np.asarray(table)[touched] != table0[touched]).all()


def test_per_row_bias_correction_first_step_is_lr_sized():
  # A row first touched late still takes a fresh-Adam first step of size ~lr per element.
  sparse = SparseRowAdam(0.1, **HP)
  table = np.zeros((4, 2), np.float32)
  state = sparse.init(table)
  for _ in range(5):
    table, state = sparse.apply(table, state, np.array([0]), np.ones((1, 2), np.float32))
  table, state = sparse.apply(table, state, np.array([3]), np.full((1, 2), 2.0, np.float32))
  np.testing.assert_allclose(table[3], [-0.1, -0.1], rtol=1e-5)
  assert state.count.tolist() == [5, 0, 0, 1]


def test_apply_rejects_bad_rows():
  sparse = SparseRowAdam(0.1)
  table = np.zeros((4, 2), np.float32)
  state = sparse.init(table)
  with pytest.raises(ValueError, match="duplicates"):
    sparse.apply(table, state, np.array([1, 1]), np.ones((2, 2), np.float32))
  with pytest.raises(ValueError, match="summed_grads"):
    sparse.apply(table, state, np.array([1]), np.ones((1, 3), np.float32))
  with pytest.raises(ValueError, match="lr must be > 0"):
    SparseRowAdam(0.0)


# Catch-up Adam: dense optax.adam (global step, zero gradient for the rows a step skips),
# evaluated lazily. `_dense_vs_catchup` runs both on the same touch pattern.
B1, B2, EPS = 0.9, 0.95, 1e-8  # TrainConfig's b1, b2, eps


def _schedule(i):
  return 0.01 * (1 + 0.5 * np.cos(i / 7))  # a varying lr: the catch-up must use each step's


def _dense_vs_catchup(touch, scale=1.0, backend="numpy", eps=EPS, flush=True, capacity=CATCHUP_RECORD_STEPS):
  """touch: per step the touched rows. Returns ((dense table, mu, nu), (catch-up table, m, v))
  after the steps, every catch-up row flushed (flush) or as left by its last touch."""
  rng = np.random.default_rng(7)
  table0 = rng.normal(size=(R, D)).astype(np.float32)
  opt = optax.adam(lambda c: jnp.asarray(_schedule(c)), B1, B2, eps)
  dense = jnp.asarray(table0)
  dstate = opt.init(dense)
  ca = CatchupRowAdam(0.01, B1, B2, eps, capacity=capacity)
  if backend == "numpy":
    table, state = table0.copy(), ca.init(table0.copy())
  else:
    table = jnp.asarray(table0)
    state = catchup_init(table, ca.window, ca.capacity)
    hp = {"b1": B1, "b2": B2, "eps": eps}

    @jax.jit
    def step(table, state, rows, grads, lr):
      table, state = catchup_rows(table, state, rows, **hp)
      return apply_row_adam(table, state, (rows, grads, jnp.int32(rows.shape[0])), lr, **hp)

  for i, rows in enumerate(touch):
    rows = np.asarray(rows)
    grads = (scale * rng.normal(size=(rows.size, D))).astype(np.float32)
    full = np.zeros((R, D), np.float32)
    full[rows] = grads
    updates, dstate = opt.update(jnp.asarray(full), dstate)
    dense = optax.apply_updates(dense, updates)
    if backend == "numpy":
      ca.catch_up(table, state, rows)
      ca.apply(table, state, rows, grads, lr=_schedule(i))
    else:
      table, state = step(table, state, jnp.asarray(rows, jnp.int32), jnp.asarray(grads), jnp.float32(_schedule(i)))
  if flush:
    if backend == "numpy":
      ca.flush(table, state)
    else:
      table, state = jax.jit(functools.partial(catchup_flush, b1=B1, b2=B2, eps=eps))(table, state)
  dense_out = tuple(np.asarray(x) for x in (dense, dstate[0].mu, dstate[0].nu))
  return dense_out, tuple(np.asarray(x) for x in (table, state.m, state.v)), table0


@pytest.mark.parametrize("backend", ["numpy", "device"])
def test_catchup_every_row_touched_equals_optax_adam(backend):
  (dense, mu, nu), (table, m, v), table0 = _dense_vs_catchup([np.arange(R)] * 6, backend=backend, flush=False)
  np.testing.assert_allclose(table, dense, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m, mu, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(v, nu, rtol=1e-6, atol=1e-8)
  assert np.abs(table - table0).min() > 0


@pytest.mark.parametrize("backend", ["numpy", "device"])
def test_catchup_row_touched_at_steps_1_and_10_equals_optax_adam_with_zero_grads(backend):
  # row 0: every step; row 1: steps 1 and 10; row 2: step 3; the rest never. |g| ~ 1 >> eps.
  touch = [[0, 1] if i in (0, 9) else [0, 2] if i == 2 else [0] for i in range(10)]
  (dense, _, _), (lazy, _, _), table0 = _dense_vs_catchup(touch, backend=backend, flush=False)
  np.testing.assert_allclose(lazy[:2], dense[:2], rtol=1e-5, atol=1e-6)  # both touched at step 10
  assert np.abs(lazy[2] - dense[2]).min() > 1e-4  # row 2's drift since step 3 is still pending
  np.testing.assert_array_equal(lazy[3:], table0[3:])
  (dense, mu, nu), (table, m, v), _ = _dense_vs_catchup(touch, backend=backend)
  np.testing.assert_allclose(table, dense, rtol=1e-5, atol=1e-6)  # flushed: every row
  np.testing.assert_allclose(m, mu, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(v, nu, rtol=1e-5, atol=1e-9)


def test_catchup_with_eps_dominated_gradients_moves_a_little_less_than_dense_adam():
  # |g| ~ eps: the skipped steps' drift m c1^2 / (sqrt(v) c1 + eps c2) is below dense Adam's
  # (Jensen) and, measured here, within 5% of it; with eps = 0 it is exact.
  touch = [[0, 1] if i in (0, 9) else [0] for i in range(10)] + [[0]] * 5
  (dense, _, _), (table, _, _), table0 = _dense_vs_catchup(touch, scale=1e-8)
  moved, dense_moved = np.abs(table - table0)[1], np.abs(dense - table0)[1]
  assert np.all(moved <= dense_moved * (1 + 1e-5)) and np.all(moved >= 0.95 * dense_moved)
  (dense, _, _), (table, _, _), _ = _dense_vs_catchup(touch, scale=1e-8, eps=0.0)
  np.testing.assert_allclose(table[:2], dense[:2], rtol=1e-5, atol=1e-7)  # (dense: 0 / 0 on the rest)


def test_catchup_window_drops_only_negligible_steps():
  window = CatchupRowAdam(0.01, B1, B2).window
  assert window == catchup_window(B1, B2) and (B1 / B2) ** window < 1e-7
  # row 1 skips window + 20 steps: its drift sums over the first `window` of them; row 2
  # skips window - 1 (all in the lr ring), row 3 window + 1 (just out of it)
  touch = [[0, 1, 2, 3]] + [[0]] * 20 + [[0, 2]] + [[0]] * (window - 2) + [[0, 1, 2, 3]]
  (dense, _, _), (table, _, _), table0 = _dense_vs_catchup(touch)
  np.testing.assert_allclose(table[:4], dense[:4], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="b1 < b2"):
    catchup_window(0.95, 0.9)


def test_catchup_apply_rejects_bad_rows():
  ca = CatchupRowAdam(0.1)
  table = np.zeros((4, 2), np.float32)
  state = ca.init(table)
  with pytest.raises(ValueError, match="duplicates"):
    ca.apply(table, state, np.array([1, 1]), np.ones((2, 2), np.float32))
  with pytest.raises(ValueError, match=r"in \[0, 4\)"):
    ca.catch_up(table, state, np.array([1, 4]))
