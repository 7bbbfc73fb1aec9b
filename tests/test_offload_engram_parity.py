"""The Engram layer fed by host-placed tables equals the device-table layer (forward and
a few Adam steps on the table)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax import EngramConfig, NgramHasher
from engram_jax.layers.engram import Engram
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.hot_cache import HotRowCache, count_row_frequencies
from engram_jax.offload.indexing import flat_rows_np
from engram_jax.offload.prefetch import RowPrefetcher, patch_updated_rows
from engram_jax.offload.sparse_adam import SparseRowAdam, sparse_grad

CONFIG = EngramConfig(
  vocab_sizes=(11, 13), max_ngram_size=3, n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=(1,), pad_id=0
)
B, T, D = 2, 24, 16
HASHER = NgramHasher(CONFIG, compressed_vocab_size=40)
SIZES = HASHER.table_sizes[1]
OFFSETS = HASHER.offsets[1]


def _module():
  return Engram(CONFIG, 1, D, table_sizes=SIZES, rngs=nnx.Rngs(0))


def _batches(n, seed=0, cover=False):
  rng = np.random.default_rng(seed)
  for i in range(n):
    rows = np.stack([rng.integers(0, s, size=(B, T)) for s in SIZES], -1)
    if cover:  # every row of every head appears
      for h, s in enumerate(SIZES):
        rows[..., h].reshape(-1)[:s] = rng.permutation(s)
    yield {"step": i, "engram_ids": {1: rows.astype(np.int32)}, "hidden": rng.normal(size=(B, T, D)).astype(np.float32)}


@pytest.mark.parametrize("placement", ["host_numpy", "host_compute_on", "cached"])
def test_forward_with_prefetched_rows_equals_device_table(placement):
  module = _module()
  table = np.asarray(module.table[...])
  if placement == "cached":
    host = HostTable(table)
    counts = count_row_frequencies(
      (flat_rows_np(b["engram_ids"][1], OFFSETS) for b in _batches(3, seed=5)), host.num_rows
    )
    source = HotRowCache.from_frequencies(host, counts, fraction=0.3)
  else:
    source = HostTable(table, method=placement.removeprefix("host_"))
  with RowPrefetcher(_batches(3), {1: source}, offsets={1: OFFSETS}) as batches:
    for batch, rows in batches:
      want = forward(module, jnp.asarray(batch["hidden"]), jnp.asarray(batch["engram_ids"][1]))
      got = forward(module, jnp.asarray(batch["hidden"]), engram_rows=rows[1])
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@nnx.jit
def forward(module, hidden, engram_ids=None, engram_rows=None):
  return module(hidden, engram_ids, engram_rows=engram_rows)


def _loss(y):
  return jnp.mean(jnp.sin(y) * y)


def test_training_host_table_with_sparse_adam_equals_dense_adam():
  lr = 5 * 1e-3
  module = _module()
  graphdef, params = nnx.split(module, nnx.Param)
  is_table = nnx.PathContains("table")
  table_graph, _, others = nnx.split(module, is_table, ...)
  table0 = np.asarray(module.table[...])
  num_rows, d_h = table0.shape

  # Device placement: dense Adam on the table (other params frozen).
  @jax.jit
  def dense_grad(table, hidden, ids):
    def loss(t):
      return _loss(nnx.merge(table_graph, nnx.State({"table": nnx.Param(t)}), others)(hidden, ids))

    return jax.grad(loss)(table)

  # Host placement: the model sees gathered rows; their gradient goes back as sparse rows.
  @jax.jit
  def rows_grad(rows, hidden, flat):
    g = jax.grad(lambda r: _loss(nnx.merge(graphdef, params)(hidden, engram_rows=r)))(rows)
    g = g.reshape(flat.shape + (d_h,))
    return sparse_grad(flat, g, num_rows, size=flat.size)

  opt = optax.adam(lr)
  dense, dstate = jnp.asarray(table0), opt.init(jnp.asarray(table0))
  host = HostTable(table0)
  sparse = SparseRowAdam(lr)
  state = sparse.init(host.array)
  for batch in _batches(3, seed=1, cover=True):
    hidden, ids = jnp.asarray(batch["hidden"]), batch["engram_ids"][1]
    updates, dstate = opt.update(dense_grad(dense, hidden, jnp.asarray(ids)), dstate)
    dense = optax.apply_updates(dense, updates)
    flat = flat_rows_np(ids, OFFSETS)
    rows = host.gather(flat).reshape(B, T, -1)  # gathered after the previous update
    unique, summed, count = rows_grad(rows, hidden, jnp.asarray(flat, jnp.int32))
    assert int(count) == num_rows  # every row touched
    sparse.apply(host.array, state, unique, summed, count)
  np.testing.assert_allclose(host.array, np.asarray(dense), rtol=1e-5, atol=1e-6)
  assert np.abs(host.array - table0).max() > 1e-3


def test_training_through_the_prefetcher_with_patched_rows_equals_sequential_training():
  """The realistic loop: rows of step t+1 are gathered while step t runs; after step t's
  sparse update the stale ones are patched. Not every row is touched every step here."""
  lr = 5 * 1e-3
  module = _module()
  graphdef, params = nnx.split(module, nnx.Param)
  table0 = np.asarray(module.table[...])
  num_rows, d_h = table0.shape
  host = HostTable(table0)
  sparse = SparseRowAdam(lr)
  state = sparse.init(host.array)

  @jax.jit
  def rows_grad(rows, hidden, flat):
    g = jax.grad(lambda r: _loss(nnx.merge(graphdef, params)(hidden, engram_rows=r)))(rows)
    return sparse_grad(flat, g.reshape(flat.shape + (d_h,)), num_rows, size=flat.size)

  # Reference: gather after every update, no prefetching.
  ref = HostTable(table0)
  ref_state = sparse.init(ref.array)
  for batch in _batches(4, seed=2):
    flat = flat_rows_np(batch["engram_ids"][1], OFFSETS)
    rows = ref.gather(flat).reshape(B, T, -1)
    ref_state = ref.apply_update(sparse, ref_state, *rows_grad(rows, jnp.asarray(batch["hidden"]), jnp.asarray(flat)))

  updated = None
  with RowPrefetcher(_batches(4, seed=2), {1: host}, offsets={1: OFFSETS}) as batches:
    for batch, rows in batches:
      flat = flat_rows_np(batch["engram_ids"][1], OFFSETS)
      if updated is not None:
        rows[1] = patch_updated_rows(rows[1], flat, updated, host)
      unique, summed, count = rows_grad(rows[1], jnp.asarray(batch["hidden"]), jnp.asarray(flat))
      state = host.apply_update(sparse, state, unique, summed, count)
      updated = np.asarray(unique)
  assert int(count) < num_rows  # some rows untouched in the last step
  np.testing.assert_array_equal(host.array, ref.array)
  np.testing.assert_array_equal(state.m, ref_state.m)


def test_patch_updated_rows_rereads_only_updated_rows():
  table = HostTable(np.arange(40, dtype=np.float32).reshape(10, 4))
  flat = np.array([[1, 2], [3, 1]])
  rows = table.gather(flat).reshape(2, 8)
  table.array[1] += 100
  table.array[3] += 100  # not reported as updated: must stay as gathered
  got = patch_updated_rows(rows, flat, np.array([1, 7, 10]), table)  # 10: padding id
  want = np.asarray(rows).reshape(2, 2, 4).copy()
  want[0, 0] += 100
  want[1, 1] += 100
  np.testing.assert_array_equal(np.asarray(got), want.reshape(2, 8))
