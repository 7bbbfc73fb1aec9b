"""A Transformer whose Engram tables live on the host (host / cached placement) gives the
same logits as the device-table model: direct gather, through the RowPrefetcher, and when
decoding with a cache. `build_offloaded` creates host tables without the device holding them."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from engram_jax import EngramConfig
from engram_jax.models import host_init
from engram_jax.models.config import ModelConfig
from engram_jax.models.offloaded import forward_with_host_tables, split_tables
from engram_jax.offload import TablePlacement, count_row_frequencies
from engram_jax.offload.row_store import CachedRowStore
from engram_jax.train.state import build_model

_BASE = ModelConfig.tiny("engram_moe")
CONFIG = _BASE.replace(engram=dataclasses.replace(_BASE.engram, layer_ids=(1, 2)))
B, T = 2, 12


@functools.cache
def _built():
  return build_model(CONFIG, 0)


def fresh_model():
  """A new model object with the seed-0 parameters (building is slow on CPU: compiles)."""
  return nnx.clone(_built())


def _sizes(model, layer):
  return model.blocks[layer].engram.table_sizes


def _batches(model, n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = {
      l: np.stack([rng.integers(0, s, (B, T)) for s in _sizes(model, l)], -1).astype(np.int32)
      for l in CONFIG.engram_layer_ids
    }
    out.append({"tokens": rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32), "engram_ids": ids})
  return out


@nnx.jit
def _device_forward(model, tokens, ids):
  return model(tokens, ids)[0]


def _frequencies(model, batches, layers):
  out = {}
  for l in layers:
    offsets = np.asarray(model.blocks[l].engram.offsets)
    out[l] = count_row_frequencies((b["engram_ids"][l] + offsets for b in batches), model.blocks[l].engram.num_rows)
  return out


PLACEMENTS = {
  "host_all": "host",
  "cached_one_device_other": "1:cached@0.25",
  "compute_on_and_cached": {
    1: TablePlacement("host", host_gather="compute_on"),
    2: TablePlacement("cached", cache_fraction=0.1),
  },
}


@pytest.fixture(scope="module")
def reference():
  model = fresh_model()
  batches = _batches(model, 3)
  logits = [np.asarray(_device_forward(model, b["tokens"], b["engram_ids"])) for b in batches]
  return batches, logits


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_host_placed_logits_equal_device_table_model(name, reference):
  batches, want = reference
  model = fresh_model()
  tables = {l: np.asarray(model.blocks[l].engram.table[...]) for l in CONFIG.engram_layer_ids}
  freqs = _frequencies(model, _batches(model, 2, seed=7), CONFIG.engram_layer_ids)
  model, off = split_tables(model, PLACEMENTS[name], frequencies=freqs)

  for l in CONFIG.engram_layer_ids:
    on_host = l in off.host_layers
    shape = model.blocks[l].engram.table.shape
    assert shape == ((0, tables[l].shape[1]) if on_host else tables[l].shape)
    if on_host:  # the master copy is the original table
      np.testing.assert_array_equal(off.tables[l].numpy(), tables[l])
  assert any(isinstance(s, CachedRowStore) for s in off.stores.values()) == ("cached" in name)

  got = np.asarray(forward_with_host_tables(model, batches[0], off)[0])
  np.testing.assert_array_equal(got, want[0])
  with off.prefetcher(iter(batches)) as it:
    seen = 0
    for i, (batch, rows) in enumerate(it):
      assert sorted(rows) == list(off.host_layers)
      got = np.asarray(forward_with_host_tables(model, batch, off, rows)[0])
      np.testing.assert_array_equal(got, want[i])
      seen += 1
  assert seen == len(batches)
  for s in off.stores.values():
    if isinstance(s, CachedRowStore):
      assert 0 < s.cache.hits < s.cache.lookups  # both paths of the cache were exercised


def test_decode_with_host_tables_equals_device_decode():
  model = fresh_model()
  host_model, off = split_tables(fresh_model(), "host")
  batch = _batches(model, 1, seed=3)[0]

  @nnx.jit
  def device_step(model, tokens, ids, cache):
    logits, aux = model(tokens, ids, cache=cache)
    return logits, aux["cache"]

  cache_dev, cache_host = model.init_cache(B, 4), host_model.init_cache(B, 4)
  for t in range(3):  # one token per sequence per step
    step_batch = {
      "tokens": batch["tokens"][:, t : t + 1],
      "engram_ids": {l: v[:, t : t + 1] for l, v in batch["engram_ids"].items()},
    }
    want, cache_dev = device_step(model, step_batch["tokens"], step_batch["engram_ids"], cache_dev)
    got, aux = forward_with_host_tables(host_model, step_batch, off, cache=cache_host)
    cache_host = aux["cache"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_restore_into_puts_the_host_tables_back():
  model, off = split_tables(fresh_model(), "2:host")
  off.tables[2].array[3] += 1.0  # as an optimizer step would
  off.restore_into(model)
  np.testing.assert_array_equal(np.asarray(model.blocks[2].engram.table[...]), off.tables[2].numpy())


def test_bad_placements_are_rejected():
  with pytest.raises(ValueError, match="no row frequencies"):
    split_tables(fresh_model(), "cached@0.5")
  with pytest.raises(ValueError, match="not Engram layers"):
    split_tables(fresh_model(), {0: TablePlacement("host")})
  model, off = split_tables(fresh_model(), "host")
  with pytest.raises(ValueError, match="already split off"):
    split_tables(model, "host")
  batch = _batches(model, 1)[0]
  with pytest.raises(ValueError, match=r"missing"):
    forward_with_host_tables(model, {"tokens": batch["tokens"], "engram_ids": {1: batch["engram_ids"][1]}}, off)


def _live_bytes(device) -> tuple[int, int]:
  """(total bytes, largest array's bytes) of the live arrays on `device`."""
  sizes = [x.nbytes for x in jax.live_arrays() if device in x.devices()] or [0]
  return sum(sizes), max(sizes)


def test_build_offloaded_never_puts_the_table_on_the_device(monkeypatch):
  """A 64 MiB host table beside a ~0.1 MiB model. On CPU "host" and "device" are the same
  RAM, so the host initialisers run on a second CPU device standing in for the CPU backend
  of an accelerator machine; the device holds no table-sized array at any point."""
  if jax.device_count() < 2:
    pytest.skip("needs a second device to stand in for host memory")
  device, host = jax.devices()[:2]
  engram = EngramConfig(
    vocab_sizes=(262_144, 262_144), n_embed_per_ngram=32, n_head_per_ngram=1, layer_ids=(1,), pad_id=0
  )
  config = ModelConfig.tiny("engram_dense", num_layers=2, engram=engram)
  build = lambda: build_model(config, 0)  # noqa: E731
  rows = nnx.eval_shape(build).blocks[1].engram.num_rows
  table_bytes = rows * 32 * 4
  assert table_bytes >= 64 * 2**20

  # the moment the table exists (computed on `host`, not yet freed): what is on the device?
  at_peak, device_programs = [], []
  real_host_table, real_compile = host_init.HostTable, host_init.compile_device_init

  def host_table_spy(array, **kwargs):
    at_peak.append(_live_bytes(device))
    return real_host_table(array, **kwargs)

  def compile_spy(*args):
    device_programs.append(real_compile(*args))
    return device_programs[-1]

  monkeypatch.setattr(host_init, "HostTable", host_table_spy)
  monkeypatch.setattr(host_init, "compile_device_init", compile_spy)
  before, _ = _live_bytes(device)
  model, off = host_init.build_offloaded(build, "host", device=device, host_device=host)
  after, largest = _live_bytes(device)

  assert len(at_peak) == 1 and at_peak[0][0] - before < table_bytes / 64
  assert after - before < table_bytes / 64 and largest < table_bytes / 64
  # the device program never allocated it either: XLA dropped the table initialiser
  memory = device_programs[0].memory_analysis()
  assert memory.output_size_in_bytes + memory.temp_size_in_bytes < table_bytes / 64
  # what the device holds: the model with a size-0 placeholder; the table is NumPy
  assert model.blocks[1].engram.table.get_value().shape == (0, 32)
  table = off.tables[1].numpy()
  assert isinstance(table, np.ndarray) and table.shape == (rows, 32) and table.flags.writeable
  assert abs(float(table.std()) - 1.0) < 0.01 and abs(float(table.mean())) < 0.01  # N(0, 1)
  assert not any(x.shape == table.shape for x in jax.live_arrays())  # the host copy is gone too
