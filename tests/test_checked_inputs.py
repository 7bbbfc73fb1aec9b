"""Checked inputs (issue 14): out-of-range row ids and out-of-vocabulary ids under jit,
undecodable and binary data files, config fields from the command line, tokenizer files,
config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from engram_jax import Engram, EngramConfig, NgramHasher
from engram_jax.layers.engram import NgramInputAverage

CFG = EngramConfig(vocab_sizes=(37, 41), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                   layer_ids=(1,), pad_id=0)
HASHER = NgramHasher(CFG, 50)
SIZES = HASHER.table_sizes[1]          # [37, 41, 43, 47]
D_H = CFG.head_dim


def _engram(impl="xla", hc=1):
  return Engram(CFG, 1, 8, hc, table_sizes=SIZES, impl=impl, rngs=nnx.Rngs(0))


def _boundary_ids():
  """[1, 3, H] valid ids, with head 0 of token 1 at its own size (the first row of head 1
  in the flat table) and head 2 of token 2 at -1 (the last row of head 1)."""
  ids = np.array([[[1, 2, 3, 4], [SIZES[0], 5, 6, 7], [8, 9, -1, 10]]], np.int32)
  return ids, [(0, 1, 0), (0, 2, 2)]


def _nan_heads(rows):
  return np.isnan(np.asarray(rows)).reshape(rows.shape[:-1] + (-1, D_H)).all(-1)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_out_of_range_id_under_jit_reads_nan_for_its_head_only(impl):
  """Defect 4: the per-head offset was added before the bounds handling, so head 0's id
  37 of 37 read head 1's row 0 (and -1 the previous head's last row)."""
  module = _engram(impl)
  ids, bad = _boundary_ids()
  rows = jax.jit(module.lookup)(ids)
  want = np.zeros((1, 3, 4), bool)
  for p in bad:
    want[p] = True
  np.testing.assert_array_equal(_nan_heads(rows), want)
  # every valid head still reads its own row
  table = np.asarray(module.table[...])
  offsets = np.asarray(module.offsets)
  expect = table[np.clip(ids, 0, None) + offsets].reshape(rows.shape)
  ok = ~np.repeat(want, D_H, axis=-1)
  np.testing.assert_array_equal(np.asarray(rows)[ok], expect[ok])


def test_pallas_fused_gather_gate_marks_bad_tokens_nan():
  """impl="pallas" with a gate runs the fused kernel (rows never materialize): a token with an
  invalid id gets a NaN output and gates, the others equal the xla path."""
  module = _engram("pallas")
  ids, _ = _boundary_ids()
  hidden = jax.random.normal(jax.random.key(0), (1, 3, 8))
  y, gates = jax.jit(lambda h, r: module(h, r, return_gates=True))(hidden, ids)
  bad_token = np.array([False, True, True])
  assert np.isnan(np.asarray(y))[0, bad_token].all() and np.isnan(np.asarray(gates))[0, bad_token].all()
  module.impl = "xla"
  y_ref = module(hidden, np.where(ids < 0, 0, ids) % SIZES)     # any valid ids for token 0's reference
  np.testing.assert_allclose(np.asarray(y)[0, 0], np.asarray(y_ref)[0, 0], atol=2e-5, rtol=2e-5)
  assert np.isfinite(np.asarray(y_ref)).all()


def test_checkify_raises_with_the_position_of_a_bad_row_id():
  module = _engram()
  graphdef, state = nnx.split(module)
  ids, _ = _boundary_ids()
  checked = jax.jit(checkify.checkify(lambda s, r: nnx.merge(graphdef, s).lookup(r),
                                      errors=checkify.user_checks))
  err, _ = checked(state, ids)
  with pytest.raises(checkify.JaxRuntimeError,
                     match=r"row id 37 at position \(0, 1, 0\) is outside head 0's table \[0, 37\) "
                           r"of Engram layer 1"):
    err.throw()
  err, rows = checked(state, np.where(ids < 0, 0, ids) % SIZES)
  assert err.get() is None and np.isfinite(np.asarray(rows)).all()
  # eager (concrete) ids were and stay a ValueError
  with pytest.raises(ValueError, match="outside head 0's table"):
    module.lookup(ids)


def test_gradient_of_a_bad_id_does_not_reach_a_neighbours_row():
  module = _engram()
  graphdef, params = nnx.split(module, nnx.Param)
  ids, _ = _boundary_ids()

  def loss(p):
    rows = nnx.merge(graphdef, p).lookup(ids)
    return jnp.sum(jnp.where(jnp.isnan(rows), 0.0, rows))

  grad = np.asarray(jax.jit(jax.grad(loss))(params)["table"][...])
  # head 1's row 0 (flat SIZES[0]) and head 1's last row (flat SIZES[0]+SIZES[1]-1) were the
  # neighbours the bad ids used to read: only the valid id 5 of head 1 (flat SIZES[0]+5) gets gradient.
  assert not grad[SIZES[0]].any() and not grad[SIZES[0] + SIZES[1] - 1].any()
  assert grad[SIZES[0] + 5].all()


def test_ngram_input_average_bounds_checked_per_head():
  avg = NgramInputAverage(CFG, 1, 8, table_sizes=SIZES, rngs=nnx.Rngs(0))
  ids, _ = _boundary_ids()
  out = np.asarray(jax.jit(avg)(ids))
  np.testing.assert_array_equal(np.isnan(out).all(-1), [[False, True, True]])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("method", ["all_to_all", "xla"])
def test_sharded_lookup_bounds_checked_per_head(method):
  from engram_jax import sharding as S
  from engram_jax.models import ModelConfig, Transformer

  config = ModelConfig.tiny("engram_moe", engram=CFG, engram_row_multiple=8, engram_sharded_lookup=method)
  mesh = S.make_mesh(data=2, tensor=4)
  model = S.create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(0)), mesh)
  engram = model.blocks[1].engram
  assert S.num_shards(engram.table.get_value()) == 4
  ids, bad = _boundary_ids()
  ids = np.concatenate([ids, ids[:, ::-1]], 0)                       # batch 2: one per data shard
  graphdef, state = nnx.split(engram)
  with jax.set_mesh(mesh):
    rows = jax.jit(lambda s, r: nnx.merge(graphdef, s).lookup(r))(state, ids)
  want = np.zeros((2, 3, 4), bool)
  for _, t, h in bad:
    want[0, t, h] = want[1, 2 - t, h] = True
  np.testing.assert_array_equal(_nan_heads(rows), want)


def test_hash_jax_out_of_vocabulary_ids_are_not_ordinary_rows():
  """Defect 4: under jit hash_jax hashed an id >= V' (or < 0) into an ordinary row."""
  x = np.array([[1, 2, 60, 3, 4, 5], [1, 2, 3, -3, 4, 5]], np.int32)
  rows = np.asarray(jax.jit(HASHER.hash_jax)(x)[1])
  # the n-grams that read the bad id (orders 2 and 3: heads 0-1, 2-3) get -1, the rest are exact
  bad = np.zeros(rows.shape, bool)
  for b, t in ((0, 2), (1, 3)):
    bad[b, t, :] = True
    bad[b, t + 1, :] = True        # order 2 and 3 windows of the next token
    bad[b, t + 2, 2:] = True       # order 3 window of the token after
  np.testing.assert_array_equal(rows == -1, bad)
  clean = HASHER.hash(np.where((x < 0) | (x >= 50), 0, x))[1]
  np.testing.assert_array_equal(rows[~bad], clean[~bad])
  # and Engram reads NaN for them
  assert _nan_heads(jax.jit(_engram().lookup)(rows))[bad].all()
  # with documents: a bad id in one document does not spoil the next one
  seg = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
  rows = np.asarray(jax.jit(HASHER.hash_jax)(x, seg)[1])
  assert (rows[0, 3:] >= 0).all() and (rows[0, 2] == -1).all()


def test_hash_jax_checkify_raises_with_position():
  x = np.array([[1, 2, 3], [4, 50, 6]], np.int32)
  err, _ = jax.jit(checkify.checkify(HASHER.hash_jax, errors=checkify.user_checks))(x)
  with pytest.raises(checkify.JaxRuntimeError,
                     match=r"compressed id 50 at position \(1, 1\) is outside the compressed vocabulary \[0, 50\)"):
    err.throw()
  with pytest.raises(ValueError, match="compressed id 50 at position"):
    HASHER.hash_jax(x)


def test_host_table_checks_row_ids_per_head():
  from engram_jax.offload import HostTable

  flat_sizes = int(SIZES.sum())
  table = HostTable(np.arange(flat_sizes * 2, dtype=np.float32).reshape(flat_sizes, 2))
  offsets = HASHER.offsets[1]
  ids, _ = _boundary_ids()
  with pytest.raises(ValueError, match=r"row id 37 at position \(0, 1, 0\) is outside head 0's table \[0, 37\)"):
    table.gather_heads(ids, offsets, SIZES)
  good = np.where(ids < 0, 0, ids) % SIZES
  np.testing.assert_array_equal(np.asarray(table.gather_heads(good, offsets, SIZES)),
                                table.numpy()[good + offsets])
