"""The row-sharded lookup equals the single-device lookup (forward and table gradient) on
8 virtual CPU devices, for both methods and several mesh shapes; routing, capacity, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax.distributed import capacity, routing
from engram_jax.distributed import sharded_lookup as sl
from engram_jax.sharding import make_mesh

ROWS, DIM = 37, 4  # 37 rows: not divisible by 2, 4 or 8 shards


def _ids(shape, rows=ROWS, seed=0):
  """Random ids [B, T, H] with boundaries and duplicates (across tokens and within one)."""
  ids = np.random.default_rng(seed).integers(0, rows, shape, dtype=np.int32)
  ids[0, 0, :2] = [0, rows - 1]
  ids[0, 1] = ids[0, 0]
  ids[1, 0, :] = 5
  return ids


def _inputs(shape=(8, 5, 3), rows=ROWS, seed=0):
  rng = np.random.default_rng(seed + 1)
  table = rng.standard_normal((rows, DIM), dtype=np.float32)
  weight = rng.standard_normal(shape + (DIM,), dtype=np.float32)
  return table, _ids(shape, rows, seed), weight


def _reference(table, ids, weight):
  """Single-device rows and gradient of sum(rows * weight) w.r.t. the table (NumPy)."""
  grad = np.zeros_like(table)
  np.add.at(grad, ids.reshape(-1), weight.reshape(-1, table.shape[1]))
  return table[ids], grad


def _value_and_grad(mesh, **kwargs):
  """jit'd (rows, d table) of sum(sharded_gather(table, ids) * weight)."""

  def loss(table, ids, weight):
    rows = sl.sharded_gather(table, ids, mesh=mesh, **kwargs)
    return jnp.sum(rows * weight), rows

  grad = jax.grad(loss, has_aux=True)
  return jax.jit(lambda t, i, w: grad(t, i, w)[::-1])


@pytest.mark.parametrize("data,tensor", [(1, 8), (2, 4), (4, 2)])
def test_both_methods_match_single_device(data, tensor):
  mesh = make_mesh(data=data, tensor=tensor)
  table, ids, weight = _inputs()
  want_rows, want_grad = _reference(table, ids, weight)

  variants = {
    "default": {},
    "xla": {"method": "xla"},
    "all_to_all exact": {"method": "all_to_all", "capacity_factor": None},
  }

  @jax.jit
  def all_variants(t, i, w):
    return {k: _value_and_grad(mesh, **v)(t, i, w) for k, v in variants.items()}

  for variant, (rows, grad) in all_variants(table, ids, weight).items():
    np.testing.assert_array_equal(np.asarray(rows), want_rows, err_msg=variant)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-6, err_msg=variant)
    assert grad.shape == table.shape


def test_all_to_all_output_is_sharded_like_the_ids_and_grad_like_the_table():
  mesh = make_mesh(data=2, tensor=4)
  table, ids, weight = _inputs(rows=40)
  rows, grad = _value_and_grad(mesh, method="all_to_all")(
    jax.device_put(table, NamedSharding(mesh, P("tensor", None))), ids, weight
  )
  assert rows.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), rows.ndim)
  assert grad.sharding.is_equivalent_to(NamedSharding(mesh, P("tensor", None)), grad.ndim)
  np.testing.assert_array_equal(np.asarray(rows), table[ids])


def test_capacity_factor_is_exact_with_and_without_overflow():
  mesh = make_mesh(data=2, tensor=4)
  fn = _value_and_grad(mesh, method="all_to_all", capacity_factor=1.0)
  shape = (8, 4, 2)  # 32 ids per data shard: 8 per device, 2 per bucket at f = 1
  table, _, weight = _inputs(shape, rows=40)
  # Balanced: each device's 8 consecutive ids hit every shard (10 rows each) exactly twice.
  balanced = np.arange(np.prod(shape)) % 4 * 10 + np.arange(np.prod(shape)) // 4 % 10
  balanced = balanced.reshape(shape).astype(np.int32)
  skewed = np.full(shape, 39, np.int32)  # every id on the last shard: overflow
  skewed[0, 0, 0] = 0
  # The paper's layout (routed backward): 8 shards of 5 rows, 8 ids per device.
  paper = _value_and_grad(
    mesh, method="all_to_all", capacity_factor=1.0, axis=("data", "tensor"), batch_axes=("data", "tensor")
  )
  k = np.arange(np.prod(shape))
  balanced_paper = (k % 8 * 5 + k // 8 % 5).reshape(shape).astype(np.int32)
  for f, ids in ((fn, balanced), (fn, skewed), (paper, balanced_paper), (paper, skewed)):
    rows, grad = f(table, ids, weight)
    want_rows, want_grad = _reference(table, ids, weight)
    np.testing.assert_array_equal(np.asarray(rows), want_rows)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-5)


def test_bucket_by_owner_packs_in_token_order_and_flags_overflow():
  ids = jnp.array([7, 0, 5, 3, 6, 1, 99], jnp.int32)  # 4 shards of 2 rows; 99 invalid
  valid = ids < 8
  b = routing.bucket_by_owner(ids, valid, rows_per_shard=2, num_shards=4, capacity=2)
  # owners 3, 0, 2, 1, 3, 0 -> ranks 0, 0, 0, 0, 1, 1
  np.testing.assert_array_equal(b.slot, [6, 0, 4, 2, 7, 1, 8])
  np.testing.assert_array_equal(b.send_ids, [0, 1, 1, -1, 1, -1, 1, 0])
  np.testing.assert_array_equal(b.counts, [2, 1, 1, 2])
  assert not b.overflow(2)
  small = routing.bucket_by_owner(ids, valid, rows_per_shard=2, num_shards=4, capacity=1)
  assert small.overflow(1)
  np.testing.assert_array_equal(small.slot, [3, 0, 2, 1, 4, 4, 4])  # late ids: no slot
  np.testing.assert_array_equal(small.send_ids, [0, 1, 1, 1])


# (table axes, batch axes) on a data=2, fsdp=2, tensor=2 mesh.
LAYOUTS = (
  ("tensor", ("data", "fsdp")),  # ids over two batch axes
  ("tensor", None),  # ids replicated everywhere
  (("data", "tensor"), ("data",)),  # the paper: table over all devices...
  (("data", "fsdp", "tensor"), ("data", "fsdp", "tensor")),  # ...each with its own ids
)


def test_other_layouts_match_single_device():
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  table, ids, weight = _inputs()
  want_rows, want_grad = _reference(table, ids, weight)

  cases = [(a, b, m, None) for a, b in LAYOUTS for m in sl.METHODS]
  cases.append(LAYOUTS[2] + ("all_to_all", 1.0))  # capped buckets (these ids overflow them)

  @jax.jit
  def all_layouts(t, i, w):
    return [_value_and_grad(mesh, method=m, axis=a, batch_axes=b, capacity_factor=f)(t, i, w) for a, b, m, f in cases]

  for case, (rows, grad) in zip(cases, all_layouts(table, ids, weight)):
    np.testing.assert_array_equal(np.asarray(rows), want_rows, err_msg=str(case))
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-6, err_msg=str(case))


def test_out_of_range_ids_under_jit_read_nan_and_get_no_gradient():
  mesh = make_mesh(data=2, tensor=4)
  table, ids, weight = _inputs()
  ids = ids.copy()
  ids[0, 0, 0], ids[1, 1, 1] = ROWS, -1  # ROWS: a padding row (R_pad = 40)
  bad = (ids < 0) | (ids >= ROWS)
  weight = np.where(bad[..., None], 0.0, weight).astype(np.float32)  # keep the loss finite
  want_rows, want_grad = _reference(table, np.clip(ids, 0, ROWS - 1), weight)

  @jax.jit
  def both(t, i, w):
    return {m: _value_and_grad(mesh, method=m)(t, i, w) for m in sl.METHODS}

  for method, (rows, grad) in both(table, ids, weight).items():
    rows = np.asarray(rows)
    assert np.isnan(rows[bad]).all(), method
    np.testing.assert_array_equal(rows[~bad], want_rows[~bad], err_msg=method)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-6)


def test_engram_lookup_and_pallas_hook_match_concatenated_heads():
  mesh = make_mesh(data=2, tensor=4)
  sizes = np.array([11, 13, 7])
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  rng = np.random.default_rng(3)
  table = rng.standard_normal((int(sizes.sum()), DIM), dtype=np.float32)
  row_ids = (rng.integers(0, 1 << 20, (4, 6, 3)) % sizes).astype(np.int32)
  row_ids[0, 0] = row_ids[0, 1]  # duplicates accumulate
  weight = rng.standard_normal((4, 6, 3 * DIM), dtype=np.float32)
  want, want_grad = _reference(table, row_ids + offsets, weight.reshape(4, 6, 3, DIM))
  variants = (
    ("all_to_all", None),
    ("all_to_all", sl.pallas_local_gather(impl="xla")),
    # the Pallas gather kernel on every shard (TPU kernel, interpret mode on CPU)
    ("all_to_all", sl.pallas_local_gather(impl="pallas")),
    ("xla", None),
  )

  @jax.jit
  def lookups(t, r, w):
    def one(method, gather):
      def loss(t):
        rows = sl.engram_sharded_lookup(t, r, offsets, mesh=mesh, method=method, local_gather=gather)
        return jnp.sum(rows * w), rows

      return jax.grad(loss, has_aux=True)(t)

    return [one(m, g) for m, g in variants]

  for (grad, rows), (method, gather) in zip(lookups(table, row_ids, weight), variants):
    np.testing.assert_array_equal(np.asarray(rows), want.reshape(4, 6, 3 * DIM), err_msg=f"{method} {gather}")
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_named():
  mesh = make_mesh(data=2, tensor=4)
  table, ids, _ = _inputs()
  call = functools.partial(sl.sharded_gather, table, mesh=mesh)
  with pytest.raises(ValueError, match="row id 37 at position"):
    call(np.where(ids == 5, ROWS, ids))
  with pytest.raises(ValueError, match="method must be one of"):
    call(ids, method="gather")
  with pytest.raises(ValueError, match="not divisible by the 2 shards"):
    call(ids[:3])
  with pytest.raises(ValueError, match="table axis 'model' is not a mesh axis"):
    call(ids, axis="model")
  with pytest.raises(ValueError, match="batch axis 'model' is not a mesh axis"):
    call(ids, batch_axes=("model",))
  with pytest.raises(ValueError, match="name a mesh axis twice"):
    call(ids, axis=("tensor", "tensor"))
  with pytest.raises(ValueError, match="capacity_factor must be positive"):
    call(ids, capacity_factor=0.0)
  with pytest.raises(ValueError, match="integer array"):
    call(ids.astype(np.float32))
  with pytest.raises(ValueError, match="offsets must hold one entry per head"):
    sl.engram_sharded_lookup(table, ids, [0, 1], mesh=mesh)


def test_padding_rows():
  assert sl.padded_num_rows(37, 8) == 40
  assert sl.padded_num_rows(40, 8) == 40
  assert sl.pad_table_rows(jnp.ones((37, 2)), 4).shape == (40, 2)
  with pytest.raises(ValueError, match="positive"):
    sl.padded_num_rows(0, 8)


def test_per_device_table_memory_falls_linearly():
  devices = (1, 2, 4, 8, 16, 64)
  records = capacity.capacity_rows(devices=devices)
  records += capacity.capacity_rows(devices=devices, adam=True)
  for rec in records:
    one = rec["bytes"][1]
    itemsize = (2 if rec["dtype"] == "bfloat16" else 4) + (8 if rec["adam"] else 0)
    assert one == rec["params"] * itemsize
    for n in devices:
      # Exactly 1/n up to the padding of each layer's rows to a multiple of n.
      assert one / n <= rec["bytes"][n] < one / n + 2 * n * 80 * itemsize
  table = capacity.capacity_table_markdown()
  assert "| Engram-27B | 5.79B | bfloat16 | 10.79 | 5.39 |" in table
  assert "| Engram-27B | 5.79B | bfloat16 + Adam m, v (f32) | 53.94 |" in table
  assert table.count("\n|") == 9


def test_capacity_arithmetic_matches_placed_shards():
  small = capacity.TableConfig("tiny", layers=1, heads=3, rows_per_head=13, head_dim=DIM)
  for tensor in (2, 4, 8):
    mesh = make_mesh(tensor=tensor)
    table = sl.pad_table_rows(jnp.zeros((small.rows_per_layer, DIM), jnp.bfloat16), tensor)
    placed = jax.device_put(table, NamedSharding(mesh, P("tensor", None)))
    shard_bytes = {s.data.nbytes for s in placed.addressable_shards}
    assert shard_bytes == {capacity.per_device_bytes(small, tensor, jnp.bfloat16)}
