"""Host tables split by rows over processes (engram_jax/distributed/host_shards.py).

In-process (one process, 4 CPU devices, each device owning a quarter of the rows): the
routed gather equals `HostTable.gather`, the returned row gradients equal `sparse_grad`,
the host update equals `SparseRowAdam` on the whole table, checkpoints round-trip and
reshard. Two processes (tests/host_shards_worker.py, jax.distributed over localhost): the
tiny Engram model trains with each process holding half of every table, to the losses of
the one-process `HostTableTrainer` on the same global batches.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

from engram_jax import sharding as sharding_lib
from engram_jax.distributed import host_shards
from engram_jax.distributed.host_shards import HostShardPlan, ShardedHostTable
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.sparse_adam import SparseRowAdam, sparse_grad
from tests.conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]
R, D_ROW, H = 37, 3, 2  # 37 rows over 4 devices: 10, 10, 10, 7


def _mesh(n=4):
  return sharding_lib.make_mesh(data=n)


def _ids(rng, b=4, t=5):
  ids = rng.integers(0, R, (b, t, H))
  ids[0, 0] = [0, R - 1]  # both ends of the table
  ids[1, :2] = 7  # repeated rows (summed on the owner)
  return ids


@pytest.mark.parametrize("capacity_factor", [None, 1.25, 0.3])
def test_routed_gather_and_gradient_return_equal_the_whole_table_path(capacity_factor):
  rng = np.random.default_rng(0)
  full = rng.normal(size=(R, D_ROW)).astype(np.float32)
  plan = HostShardPlan(_mesh(), ("data",), R, capacity_factor)
  table = ShardedHostTable.from_full(plan, full)
  assert (table.lo, table.hi) == (0, R) and plan.rows_per_device == 10
  ids = _ids(rng)
  req = host_shards.route_requests(plan, ids)
  if capacity_factor == 0.3:  # 10 ids per device, C = 1: overflows, routed again exactly
    assert req.capacity == 10
  answers = table.serve(req)
  rows = jax.jit(lambda a, r: host_shards.receive_rows(plan, a, r), static_argnums=())(answers, req)
  want = HostTable(full).gather(ids)  # [B, T, H, d]
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(want).reshape(4, 5, H * D_ROW))

  g = rng.normal(size=(4, 5, H * D_ROW)).astype(np.float32)
  unique, summed, count = jax.jit(lambda g, r: host_shards.return_grads(plan, g, r))(g, req)
  ref_rows, ref_summed, ref_count = sparse_grad(jnp.asarray(ids), jnp.asarray(g.reshape(4, 5, H, D_ROW)), R)
  assert int(jnp.sum(count)) == int(ref_count)
  n = int(ref_count)
  # global norm of the sparse grads: the same as sparse_grad's
  np.testing.assert_allclose(float(jnp.sum(summed**2)), float(jnp.sum(ref_summed**2)), rtol=1e-6)

  adam = SparseRowAdam(lr=0.1)
  ref_table, ref_state = full.copy(), adam.init(full)
  adam.apply(ref_table, ref_state, np.asarray(ref_rows), np.asarray(ref_summed), n, lr=0.05)
  updated = table.apply_update(adam, unique, summed, count, 0.05)
  assert sorted(updated.tolist()) == np.asarray(ref_rows[:n]).tolist()
  np.testing.assert_allclose(table.table, ref_table, rtol=1e-6, atol=1e-7)
  for got, ref in zip(table.state, ref_state):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_plan_refuses_bad_input():
  mesh = _mesh()
  plan = HostShardPlan(mesh, ("data",), R)
  with pytest.raises(ValueError, match=r"row id 37 at position \(0, 1, 0\) is outside the host table \[0, 37\)"):
    host_shards.route_requests(plan, np.array([[[0, 1], [37, 2]]] * 4))
  with pytest.raises(NotImplementedError, match="also splits"):
    HostShardPlan(sharding_lib.make_mesh(data=2, tensor=2), ("data",), R)
  with pytest.raises(ValueError, match="its shard must be"):
    ShardedHostTable(plan, np.zeros((R - 1, D_ROW), np.float32))


def test_checkpoint_round_trips_and_reshards(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  full = rng.normal(size=(R, D_ROW)).astype(np.float32)
  plan = HostShardPlan(_mesh(), ("data",), R)
  table = ShardedHostTable.from_full(plan, full)
  table.state.m[:] = rng.normal(size=table.state.m.shape)
  table.state.count[:] = np.arange(R)
  host_shards.save_shards(tmp_path / "one", {3: table}, step=5)
  assert host_shards.read_manifest(tmp_path / "one") == {
    "step": 5,
    "process_count": 1,
    "layers": [3],
    "num_rows": {"3": R},
  }
  [(layer, back)] = host_shards.load_shards(tmp_path / "one", {3: plan}).items()
  assert layer == 3
  for a, b in zip((back.table, *back.state), (table.table, *table.state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileExistsError, match="already holds"):
    host_shards.save_shards(tmp_path / "one", {3: table}, step=5)
  with pytest.raises(ValueError, match="manifest.json is missing"):
    host_shards.load_shards(tmp_path / "nothing", {3: plan})
  with pytest.raises(ValueError, match="has 37 rows, the model 38"):
    host_shards.load_shards(tmp_path / "one", {3: HostShardPlan(plan.mesh, ("data",), R + 1)})

  # A checkpoint written by 2 processes (rows [0, 20) and [20, 37)), read by this one.
  two = tmp_path / "two" / "layer_3"
  two.mkdir(parents=True)
  arrays = (table.table, *table.state)
  for p, (lo, hi) in enumerate([(0, 20), (20, R)]):
    for what, a in zip(host_shards.ARRAYS, arrays):
      np.save(two / f"{what}.p{p}-of-2.npy", a[lo:hi])
    (two / f"rows.p{p}-of-2.json").write_text(json.dumps({"lo": lo, "hi": hi, "num_rows": R, "dim": D_ROW}))
  manifest = {"step": 5, "process_count": 2, "layers": [3], "num_rows": {"3": R}}
  (tmp_path / "two" / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="saved by 2 processes; this run has 1"):
    host_shards.load_shards(tmp_path / "two", {3: plan}, reshard=False)
  back = host_shards.load_shards(tmp_path / "two", {3: plan})[3]
  for a, b in zip((back.table, *back.state), arrays):
    np.testing.assert_array_equal(a, b)


# -- two processes ------------------------------------------------------------------------------
TIMEOUT_S = 400


def test_two_processes_train_to_the_one_process_host_losses(tmp_path):
  from tests import host_shards_worker as worker

  port = portpicker.pick_unused_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  procs, logs = [], [tmp_path / f"p{i}.log" for i in range(2)]
  try:
    for i in range(2):
      with open(logs[i], "w") as out:
        cmd = [sys.executable, "-m", "tests.host_shards_worker", str(port), str(i), str(tmp_path)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    ref = worker.reference_run()  # meanwhile, here: the one-process host run, same global batches
    deadline = time.monotonic() + TIMEOUT_S
    for proc, log in zip(procs, logs):
      try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"worker did not finish in {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
      if proc.returncode != 0:
        pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  out = [json.loads((tmp_path / f"result.{i}.json").read_text()) for i in range(2)]
  for i, o in enumerate(out):
    for layer, (lo, hi, rows, num_rows) in o["shards"].items():
      # each process holds only its half of every table (and of its Adam state)
      assert rows == hi - lo and num_rows == ref["num_rows"][layer]
      assert (lo, hi) == ((0, -(-num_rows // 2)) if i == 0 else (-(-num_rows // 2), num_rows))
  for key in ("loss", "grad_norm"):
    got = [h[key] for h in out[0]["history"]]
    np.testing.assert_allclose(got, [h[key] for h in ref["history"]], rtol=2e-5, err_msg=key)
    assert got == [h[key] for h in out[1]["history"]]  # both processes see the same metrics
  for l in ref["num_rows"]:
    assert [h[f"engram_rows_touched_{l}"] for h in out[0]["history"]] == [
      h[f"engram_rows_touched_{l}"] for h in ref["history"]
    ]
  assert ref["history"][-1]["loss"] < ref["history"][0]["loss"]  # it trained
  for o in out:  # evaluation (no update) of the trained model: global sums on every process
    assert o["eval"]["val_tokens"] == ref["eval"]["val_tokens"] == 2 * worker.B * worker.T
    np.testing.assert_allclose(o["eval"]["val_loss"], ref["eval"]["val_loss"], rtol=2e-5)
  # The tables after training: the two halves are the one-process table. Adam divides by
  # sqrt(v): for a row whose gradient is ~0 the summation-order rounding of g changes its
  # step by up to ~1e-5 (lr 1e-2; measured 1.1e-5 on 3 of 1920 entries); atol 5e-5 = 0.5% of
  # one step, rtol 2e-5 for all other entries.
  for layer, want in ref["tables"].items():
    got = np.concatenate([np.load(tmp_path / f"table.{layer}.p{i}.npy") for i in range(2)])
    np.testing.assert_allclose(got, np.asarray(want), rtol=2e-5, atol=5e-5)
    close = np.isclose(got, np.asarray(want), rtol=2e-5, atol=2e-6)
    assert close.mean() > 0.99
  # The collective checkpoint after step 2: both processes resumed from it and repeated steps
  # 3-4 exactly (checked by the workers); read here by one process, its shards reshard.
  assert all(o["resumed_equal"] for o in out)
  manifest = host_shards.read_manifest(tmp_path / "ckpt" / "host_tables")
  assert manifest["process_count"] == 2 and manifest["step"] == worker.STEPS // 2
  plans = {int(l): HostShardPlan(_mesh(1), ("data",), n) for l, n in ref["num_rows"].items()}
  for layer, table in host_shards.load_shards(tmp_path / "ckpt" / "host_tables", plans).items():
    assert (table.lo, table.hi) == (0, ref["num_rows"][str(layer)])
    assert table.state.count.max() == worker.STEPS // 2  # Adam counts of the first 2 steps
    assert ((table.state.count > 0) == (np.abs(table.state.m).sum(1) > 0)).all()
  # ... and a 1-process trainer (one device) resumes from it: steps 3-4 as the 2 processes ran them
  from engram_jax.train.sharded_host_trainer import ShardedHostTableTrainer
  from tests.test_offload_model import fresh_model
  from tests.test_offload_training import RATE, TRAIN

  one = ShardedHostTableTrainer(fresh_model(), TRAIN, _mesh(1), bias_update_rate=RATE)
  one.restore(tmp_path / "ckpt")
  half = worker.STEPS // 2
  again = one.train(worker.global_batches(fresh_model())[half:])
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([float(h[key]) for h in again], [h[key] for h in out[0]["history"][half:]], rtol=2e-5)


def test_tables_initialised_shard_by_shard_equal_the_whole_tables():
  from engram_jax.models import engram_table
  from engram_jax.train.sharded_host_trainer import ShardedHostTableTrainer
  from engram_jax.train.state import build_model
  from tests.test_offload_model import CONFIG, fresh_model
  from tests.test_offload_training import TRAIN

  trainer = ShardedHostTableTrainer(lambda: build_model(CONFIG, 0), TRAIN, _mesh(4))
  whole = fresh_model()
  rows = []
  for l in CONFIG.engram_layer_ids:
    want = np.asarray(engram_table(whole, l).get_value())
    rows.append(want.shape[0])
    np.testing.assert_array_equal(trainer.tables[l].table, want)  # 4 device blocks, joined
  assert any(r % 4 for r in rows)  # an uneven split is among them
  dense = jax.tree.map(np.asarray, trainer.state.params)
  from engram_jax.models.offloaded import split_tables
  from engram_jax.train.host_trainer import split_params

  _, want_params, _ = split_params(split_tables(fresh_model(), "host")[0], CONFIG.engram_layer_ids)
  jax.tree.map(np.testing.assert_array_equal, dense, jax.tree.map(np.asarray, want_params))


def test_a_repeated_row_travels_once_per_device():
  full = np.arange(R * D_ROW, dtype=np.float32).reshape(R, D_ROW)
  plan = HostShardPlan(_mesh(), ("data",), R, capacity_factor=0.3)
  table = ShardedHostTable.from_full(plan, full)
  ids = np.full((4, 5, H), 12)  # row 12 (device 1's) 10 times on every device
  req = host_shards.route_requests(plan, ids)
  assert req.capacity == 1  # 1 slot per owner suffices: no fallback to exact buckets
  requests = np.asarray(req.requests).reshape(4, 4, 1)  # [owner, sender, slot]
  assert (requests[1] == 2).all() and (np.delete(requests, 1, 0) == -1).all()  # local row 2 of device 1
  rows = jax.jit(lambda a, r: host_shards.receive_rows(plan, a, r))(table.serve(req), req)
  np.testing.assert_array_equal(np.asarray(rows), np.broadcast_to(np.tile(full[12], H), (4, 5, H * D_ROW)))
  g = np.ones((4, 5, H * D_ROW), np.float32)
  unique, summed, count = jax.jit(lambda g, r: host_shards.return_grads(plan, g, r))(g, req)
  assert np.asarray(count).tolist() == [0, 1, 0, 0]
  np.testing.assert_array_equal(np.asarray(summed).reshape(4, 4, D_ROW)[1, 0], [40.0] * D_ROW)  # 4 devices x 10
