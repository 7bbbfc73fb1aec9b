"""Disk tier (placements "disk", "cached@f+disk"): `DiskTable` gathers and updates bit for bit
like a NumPy `HostTable` through a bounded DRAM cache with exact hit / miss counts; a
disk-placed table larger than its cache trains like the host-placed run and decodes like the
device table; SIGKILL + resume continues exactly; bad files and sizes are refused clearly."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.data import DataConfig
from engram_jax.offload import HostTable, HotRowCache, SparseRowAdam, parse_placements
from engram_jax.offload.disk_table import DiskTable, WarmRowCache, disk_bytes
from engram_jax.train import TrainConfig
from engram_jax.train.restore import load_run
from engram_jax.train.trainer import Trainer
from tests.test_run_safety import _steps
from tests.test_train import VOCAB, tiny_model

LAYER = 1
RUN = TrainConfig(
  total_steps=3,
  warmup_steps=1,
  eval_every=0,
  checkpoint_every=0,
  log_every=1,
  progress_bar=False,
  table_placement="host",
)


def _adam_steps(table, rng, steps=4, rows=300):
  """Gathers and sparse Adam steps on `table`; returns every gather's rows."""
  adam = SparseRowAdam(lr=0.05, b1=0.9, b2=0.95)
  state = table.init_state(adam)
  out = []
  for _ in range(steps):
    ids = rng.integers(0, rows, (4, 5, 2))
    out.append(np.asarray(table.host_rows(ids)))
    out.append(np.asarray(table.gather(ids)))
    unique = np.unique(ids)
    grads = rng.normal(size=(unique.size, table.dim)).astype(np.float32)
    padded = np.concatenate([unique, [rows, rows]])  # sparse_grad pads with R
    grads = np.concatenate([grads, np.zeros((2, table.dim), np.float32)])
    state = table.apply_update(adam, state, padded, grads, unique.size, lr=0.05)
    if isinstance(table, DiskTable):
      assert table.cache.resident_rows <= table.cache.capacity
  return out, state


def test_disk_table_gathers_and_updates_like_host_table_bit_for_bit(tmp_path):
  values = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
  host = HostTable(values)
  disk = DiskTable.create(tmp_path / "t", values, cache_rows=20)
  assert disk.shape == host.shape and disk.dtype == host.dtype and disk.method == "numpy"
  want, want_state = _adam_steps(host, np.random.default_rng(1))
  got, got_state = _adam_steps(disk, np.random.default_rng(1))
  for w, g in zip(want, got, strict=True):
    np.testing.assert_array_equal(g, w)
  np.testing.assert_array_equal(disk.numpy(), host.numpy())
  for w, g in zip(want_state, got_state, strict=True):
    assert isinstance(g, np.memmap)  # the optimizer state lives in files beside the table
    np.testing.assert_array_equal(g, w)
  assert disk.cache.hits > 0 and disk.cache.misses > 0  # both tiers served rows
  # the files on disk are the table and its state (a fresh mapping reads the same values)
  disk.flush()
  np.testing.assert_array_equal(DiskTable.open(tmp_path / "t", cache_rows=1).numpy(), host.numpy())
  np.testing.assert_array_equal(np.load(tmp_path / "t" / "v.npy"), want_state.v)
  assert disk_bytes(300, 8, np.float32) == {"table": 9600, "state": 20400, "total": 30000}


def test_warm_cache_is_bounded_least_recently_used_with_exact_counts():
  cache = WarmRowCache(3, 2, np.float32)
  reads = []

  def read(rows):
    reads.append(rows.tolist())
    return np.repeat(rows[:, None], 2, 1).astype(np.float32)

  for rows, hits, misses in [([1, 2], 0, 2), ([2, 5], 1, 1), ([7], 0, 1), ([1], 0, 1), ([1, 5, 7], 3, 0)]:
    h0, m0 = cache.hits, cache.misses
    out = cache.lookup(np.asarray(rows, np.int64), read)
    np.testing.assert_array_equal(out[:, 0], rows)
    assert (cache.hits - h0, cache.misses - m0) == (hits, misses), rows
    assert cache.resident_rows <= 3
  # [7] evicted row 1 (least recently used), [1] then evicted row 2
  assert reads == [[1, 2], [5], [7], [1]]
  assert sorted(cache.slot_row.tolist()) == [1, 5, 7]
  assert cache.rows.nbytes == 3 * 2 * 4  # the buffer never grows
  cache.write_through(np.asarray([5, 9]), np.full((2, 2), -1, np.float32))  # 9 is not cached
  assert (cache.lookup(np.asarray([5]), read) == -1).all() and reads[-1] == [1]
  # random lookups: values right, the sorted index consistent with the slots, bounded
  rng, cache, first, looked_up = np.random.default_rng(0), WarmRowCache(50, 2, np.float32), len(reads), 0
  for _ in range(200):
    rows = np.unique(rng.integers(0, 200, rng.integers(1, 80)))
    np.testing.assert_array_equal(cache.lookup(rows, read)[:, 0], rows)
    resident = np.sort(cache.slot_row[cache.slot_row >= 0])
    assert resident.size == cache.resident_rows <= 50
    hit, slot = cache.find(resident)
    assert hit.all() and (cache.rows[slot, 0] == resident).all()
    looked_up += rows.size
  assert cache.misses == sum(len(r) for r in reads[first:]) and cache.hits == looked_up - cache.misses > 0


def test_bad_files_and_cache_sizes_are_refused(tmp_path):
  values = np.zeros((50, 4), np.float32)
  DiskTable.create(tmp_path / "ok", values, cache_rows=5)
  with pytest.raises(FileNotFoundError, match=r"missing.*table.npy does not exist"):
    DiskTable.open(tmp_path / "missing", cache_rows=5)
  with pytest.raises(ValueError, match=r"table.npy has shape \(50, 4\), expected \(60, 4\)"):
    DiskTable.open(tmp_path / "ok", cache_rows=5, shape=(60, 4))
  with pytest.raises(ValueError, match="table.npy has dtype float32, expected float16"):
    DiskTable.open(tmp_path / "ok", cache_rows=5, dtype=np.float16)
  for bad in (0, 51, -1, 2.5, True):
    with pytest.raises(ValueError, match=rf"cache_rows .* in \[1, 50\].*got {bad!r}"):
      DiskTable.open(tmp_path / "ok", cache_rows=bad)
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"cache_fraction must lie in \(0, 1\]"):
      DiskTable.open(tmp_path / "ok", cache_fraction=bad)
  short = tmp_path / "short"
  DiskTable.create(short, values, cache_rows=5)
  path = short / "table.npy"
  path.write_bytes(path.read_bytes()[:-16])
  with pytest.raises(ValueError, match=r"short/table.npy is short: .* needs"):
    DiskTable.open(short, cache_rows=5)
  path.write_bytes(b"not an npy file at all")
  with pytest.raises(ValueError, match="is not a readable .npy file"):
    DiskTable.open(short, cache_rows=5)
  table = DiskTable.create(tmp_path / "s", values, cache_rows=5)
  table.init_state(SparseRowAdam(lr=1e-3))
  with pytest.raises(ValueError, match=r"saved m is \(50, 8\) float32, the run's is \(50, 4\)"):
    table.load_state(
      {"table": values, "m": np.zeros((50, 8), np.float32), "v": values, "count": np.zeros(50, np.int32)}
    )
  with pytest.raises(TypeError, match="load_state"):
    table.array = values
  with pytest.raises(ValueError, match=r"row id 50 outside"):
    table.host_rows(np.asarray([3, 50]))
  # bfloat16 (.npy keeps it as raw bytes, '<V2'): opened as bfloat16, m and v in float32
  half = values.astype(jnp.bfloat16) + 1
  DiskTable.create(tmp_path / "bf16", half, cache_rows=5).init_state(SparseRowAdam(lr=1e-3))
  opened = DiskTable.open(tmp_path / "bf16", cache_rows=5, dtype=jnp.bfloat16)
  assert opened.dtype == jnp.bfloat16 and np.load(tmp_path / "bf16" / "m.npy").dtype == np.float32
  np.testing.assert_array_equal(opened.host_rows(np.arange(50)), half)
  for spec, text in [
    ("disk@dram=0", r"dram=\) must be a fraction of its rows in \(0, 1\], got 0.0"),
    ("disk@dram=2", r"in \(0, 1\], got 2.0"),
    ("disk@ram=0.1", "disk options are 'dram=F'"),
    ("host+disk", "'\\+disk' follows 'cached@F' only"),
  ]:
    with pytest.raises(ValueError, match=rf"bad table placement '{re.escape(spec)}'.*{text}"):
      parse_placements(spec, (1,))
  with pytest.raises(ValueError, match=r"TrainConfig.table_placement.*disk@dram=0"):
    RUN.replace(table_placement="disk@dram=0")


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  return DataConfig(
    seq_len=32,
    batch_size=4,
    bpe_vocab_size=VOCAB,
    max_bytes=400_000,
    tokenizer_train_bytes=200_000,
    num_eval_batches=1,
    tokenizer_dir=str(tmp_path_factory.mktemp("tok")),
  )


@pytest.fixture(scope="module")
def host_run(data_config, tmp_path_factory):
  trainer = Trainer(tiny_model(), RUN, data_config, tmp_path_factory.mktemp("runs") / "host")
  return trainer, trainer.run()


@pytest.mark.parametrize("placement", ["disk@dram=0.05", "cached@0.02+disk@dram=0.05"])
def test_disk_placed_table_larger_than_its_cache_trains_like_host(host_run, data_config, tmp_path, placement):
  host_trainer, host = host_run
  config = RUN.replace(table_placement=placement, checkpoint_every=3)
  trainer = Trainer(tiny_model(), config, data_config, tmp_path / "run")
  result = trainer.run()
  assert result.losses == host.losses  # to the last bit, every step
  table = trainer.host_trainer.offloaded.tables[LAYER]
  assert isinstance(table, DiskTable) and table.directory == tmp_path / "run" / "disk_tables" / f"layer_{LAYER}"
  assert table.cache.capacity == round(0.05 * table.num_rows) < table.num_rows / 10
  assert table.cache.resident_rows <= table.cache.capacity and table.cache.misses > 0
  want = host_trainer.host_trainer.host_state()[LAYER]
  for key, got in trainer.host_trainer.host_state()[LAYER].items():
    assert isinstance(got, np.memmap), key
    np.testing.assert_array_equal(got, want[key], err_msg=key)
  store = trainer.host_trainer.offloaded.stores[LAYER]
  if placement.startswith("cached"):
    source = store.cache
    assert isinstance(source, HotRowCache) and source.hits > 0 and table.bypassed > 0
    hot = set(source.hot_rows.tolist())
    assert not hot & set(table.cache.slot_row.tolist())  # device-hot rows stay out of DRAM
    return
  # the checkpoint's files: load_run maps them read-only (tables="host") or loads them
  run = load_run(tmp_path / "run", tables="host")
  loaded = run.host_tables[LAYER]
  assert isinstance(loaded, DiskTable) and loaded.cache.capacity == table.cache.capacity
  assert loaded.directory == tmp_path / "run" / "checkpoints" / "3" / "disk_tables" / str(LAYER)
  np.testing.assert_array_equal(loaded.numpy(), want["table"])
  device_run = load_run(tmp_path / "run", tables="device")
  np.testing.assert_array_equal(np.asarray(device_run.model.blocks[LAYER].engram.table[...]), want["table"])


def test_disk_table_decodes_like_the_device_table(tmp_path):
  from engram_jax.inference import Decoder
  from engram_jax.models.offloaded import model_stores
  from tests.test_generation import setup, teacher_forced_logits

  s = setup(1)
  table = np.asarray(s.model.blocks[1].engram.table[...])
  disk = DiskTable.create(tmp_path / "d", table, cache_fraction=0.05)
  decoder = Decoder(s.model, s.hasher, s.compressor, stores=model_stores(s.model, {1: disk}))
  assert decoder.decode_path == "host_python_loop"
  got = teacher_forced_logits(decoder, s.tokens)
  python = Decoder(
    s.model, s.hasher, s.compressor, host_decode="python", stores=model_stores(s.model, {1: HostTable(table)})
  )
  np.testing.assert_array_equal(got, teacher_forced_logits(python, s.tokens))  # the same rows, bit for bit
  # the device-table model's full forward (the device decoder equals it too: test_generation)
  np.testing.assert_allclose(got, s.full, atol=1e-4, rtol=1e-4)
  assert disk.cache.capacity < table.shape[0] and disk.cache.hits > 0 and disk.cache.misses > 0
  assert disk.cache.resident_rows <= disk.cache.capacity
  with pytest.raises(ValueError, match=r"host_decode='in_loop' is not possible.*DiskTables"):
    Decoder(s.model, s.hasher, s.compressor, stores=model_stores(s.model, {1: disk}), host_decode="in_loop")

  # cached@f+disk: hot rows from the device cache, only the misses read from the file
  disk.cache.clear()
  hot = HotRowCache(disk, np.arange(0, table.shape[0], 7))
  cached = Decoder(s.model, s.hasher, s.compressor, stores=model_stores(s.model, {1: hot}))
  assert cached.decode_path == "host_python_loop" and cached.table_placement == "cached"
  np.testing.assert_array_equal(teacher_forced_logits(cached, s.tokens), got)
  assert hot.hits > 0 and hot.lookups > hot.hits


def test_sigkill_then_resume_continues_a_disk_run_exactly(tmp_path):
  """`experiments.train` with a disk-placed table SIGKILLed after step 4, then rerun from its
  step-2 checkpoint: the working files are rebuilt from the checkpoint's copy (the killed
  run's are never read) and every step the killed run logged gets the same loss again."""
  from tests.conftest import xla_flags
  from tests.test_train_cli import MICRO, REPO

  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  workdir, tokdir = tmp_path / "run", tmp_path / "tok"
  cmd = lambda steps: [  # noqa: E731
    sys.executable,
    "-m",
    "experiments.train",
    "--config=experiments/configs/tiny.py:engram",
    f"--workdir={workdir}",
    f"--config.data.tokenizer_dir={tokdir}",
    f"--config.train.total_steps={steps}",
    *MICRO,
    "--config.train.checkpoint_every=2",
    "--config.train.keep_checkpoints=1000",
    "--config.train.table_placement=disk@dram=0.01",
  ]
  log_file = open(tmp_path / "first.log", "w")  # noqa: SIM115  a pipe could fill and block the child
  total = 16  # both runs: the lr schedule depends on total_steps
  proc = subprocess.Popen(cmd(total), cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while len(_steps(workdir)) < 4:
      assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
      assert time.time() < deadline, "training did not reach step 4 in time"
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log_file.close()
  before = {r["step"]: r["loss"] for r in _read(workdir)}
  assert (workdir / "disk_tables" / "layer_1" / "table.npy").exists()
  # resume from step 2, so that every step after it that the killed run logged is replayed
  for ckpt in (workdir / "checkpoints").iterdir():
    if ckpt.name != "2":
      shutil.rmtree(ckpt)
  assert max(before) < total
  rerun = subprocess.run(cmd(total), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "past step 2 (replayed now)" in rerun.stderr  # resumed from step 2
  assert json.loads(rerun.stdout.strip().splitlines()[-1])["status"] == "completed"
  after = {r["step"]: r["loss"] for r in _read(workdir)}
  assert sorted(after) == list(range(1, total + 1)) and all(math.isfinite(v) for v in after.values())
  assert {s: after[s] for s in before} == before  # steps 3.. replayed bit for bit
  saved = workdir / "checkpoints" / "2" / "disk_tables" / "1"
  assert sorted(p.name for p in saved.iterdir()) == ["count.npy", "m.npy", "table.npy", "v.npy"]


def _read(workdir):
  from engram_jax.train.metrics import read_metrics

  return read_metrics(workdir, "train")
