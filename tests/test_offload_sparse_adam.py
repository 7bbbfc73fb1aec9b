"""Row-sparse Adam: equals optax.adam when every row is touched; untouched rows stay put."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax.offload import placement
from engram_jax.offload.sparse_adam import SparseRowAdam, sparse_grad

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
