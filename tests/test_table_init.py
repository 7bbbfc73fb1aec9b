"""Blocks of an Engram table's init equal the whole table's rows bit for bit, and
`build_offloaded` fills host and disk tables block by block, never drawing the whole table."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import random as jex_random

from engram_jax.layers import table_init
from engram_jax.layers.table_init import LazyTableRows, TableInit, table_rows
from engram_jax.models import engram_table, host_init
from engram_jax.models.config import ModelConfig
from engram_jax.train.state import build_model


def _bits(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x).view(np.uint8)


@pytest.mark.parametrize("dtype, std", [(jnp.float32, 1.0), (jnp.float32, 0.1), (jnp.bfloat16, 0.3)])
def test_blocks_equal_the_whole_tables_rows(dtype, std):
  key = jax.random.key(7)
  R, d = 513, 24
  whole = np.asarray(jax.jit(lambda: std * jax.random.normal(key, (R, d), dtype))())
  init = TableInit(jax.random.key_data(key), (R, d), std, jnp.dtype(dtype))
  for start, stop in [(0, R), (5, 6), (17, 333), (R - 1, R)]:
    got = table_rows(init, start, stop - start)
    assert got.dtype == whole.dtype and got.shape == (stop - start, d)
    np.testing.assert_array_equal(_bits(got), _bits(whole[start:stop]))
  lazy = LazyTableRows(init, block_rows=64)  # blocks that do not divide R
  np.testing.assert_array_equal(_bits(np.asarray(lazy)), _bits(whole))
  np.testing.assert_array_equal(_bits(lazy[100:250]), _bits(whole[100:250]))
  assert lazy[7:7].shape == (0, d)


def test_counter_offsets_carry_into_the_high_word():
  """Rows past 2**32 values use the 64-bit counter hi:lo = r * d + c, as `iota_2x32_shape`."""
  key = jax.random.key_data(jax.random.key(1)).astype(jnp.uint32)
  base = 2**32 - 5  # the low word wraps inside the block
  offset = np.array([base >> 32, base & 0xFFFFFFFF], np.uint32)
  got = table_init._offset_bits(jnp.concatenate([key, jnp.asarray(offset)]), 32, (2, 5))
  counters = np.arange(base, base + 10, dtype=np.uint64).reshape(2, 5)
  hi, lo = (counters >> np.uint64(32)).astype(np.uint32), (counters & np.uint64(0xFFFFFFFF)).astype(np.uint32)
  b1, b2 = jex_random.threefry2x32_p.bind(key[0], key[1], jnp.asarray(hi), jnp.asarray(lo))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(b1 ^ b2))


def test_bad_blocks_are_refused():
  init = TableInit(jax.random.key_data(jax.random.key(0)), (10, 4), 1.0, jnp.dtype(jnp.float32))
  with pytest.raises(ValueError, match=r"rows \[8, 12\) outside the table's \[0, 10\)"):
    table_rows(init, 8, 4)
  with pytest.raises(ValueError, match="block_rows must be >= 1"):
    LazyTableRows(init, 0)
  with pytest.raises(TypeError, match="row slices"):
    LazyTableRows(init, 4)[3]


@pytest.mark.parametrize("placement", ["host", "disk@dram=0.05"])
def test_build_offloaded_draws_tables_block_by_block(monkeypatch, placement):
  """Blocks of 37 rows (the copy chunk shrunk): every drawn block is that size, the table is
  never drawn whole, and the tables equal `build()`'s bit for bit."""
  base = ModelConfig.tiny("engram_moe")
  config = base.replace(vocab_size=512, engram=dataclasses.replace(base.engram, layer_ids=(1,)))
  build = lambda: build_model(config, 0)  # noqa: E731
  drawn = []
  real_rows = table_init.table_rows

  def spy(init, start, count, device=None):
    drawn.append(count)
    return real_rows(init, start, count, device)

  monkeypatch.setattr(table_init, "table_rows", spy)
  monkeypatch.setattr(host_init, "block_rows", lambda init: 37)
  _, off = host_init.build_offloaded(build, placement)
  reference = np.asarray(engram_table(build(), 1).get_value())
  store = off.stores[1]
  np.testing.assert_array_equal(_bits(np.asarray(store.table.numpy())), _bits(reference))
  assert drawn and set(drawn) == {37} and reference.shape[0] > 37
