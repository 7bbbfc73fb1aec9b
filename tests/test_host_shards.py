"""Host tables split by rows over processes (engram_jax/distributed/host_shards.py).

In-process (one process, 4 CPU devices, each device owning a quarter of the rows): the
routed gather equals `HostTable.gather`, the returned row gradients equal `sparse_grad`,
the host update equals `SparseRowAdam` on the whole table, checkpoints round-trip and
reshard. Two processes (`python -m experiments.train --config.train.table_placement=host`,
jax.distributed over localhost): the tiny Engram model trains with each process holding half
of every table, to the losses of the one-process host run on the same global batches, resumes
exactly, and `load_run` joins the shards in one process.
"""

import json
import shutil
import threading
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
from tests.test_multiprocess import MICRO, _env, _metrics, _run_all, completed_train_rows

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
STEPS = 4
# tests/test_multiprocess.py's MICRO run with the Engram table host-placed (not row-sharded
# over the devices) and a checkpoint + evaluation every 2 steps
HOST_MICRO = [
  a
  for a in MICRO
  if not a.startswith(("--config.model.engram_table_sharding", "--config.model.engram_row_multiple"))
  and not a.startswith(("--config.train.total_steps", "--config.train.eval_every", "--config.train.checkpoint_every"))
] + [
  "--config.train.table_placement=host",
  f"--config.train.total_steps={STEPS}",
  "--config.train.eval_every=2",
  "--config.train.checkpoint_every=2",
  "--config.train.keep_checkpoints=3",
]


def _two_processes(workdir: Path, tok: str, logs: Path, *extra: str) -> list[tuple[list[str], dict, Path]]:
  """The (args, env, log) of the 2 processes of a host-table run (batch 2 each)."""
  logs.mkdir()
  port = portpicker.pick_unused_port()
  args = [f"--workdir={workdir}", tok, "--config.data.batch_size=2", f"--coordinator_address=localhost:{port}"]
  return [([*args, "--num_processes=2", f"--process_id={i}", *extra], _env(1), logs / f"{i}.log") for i in range(2)]


def _shard_files(step_dir: Path) -> dict[str, np.ndarray]:
  root = step_dir / "host_shards"
  return {str(f.relative_to(root)): np.load(f) for f in sorted(root.rglob("*.npy"))}


def test_two_processes_train_to_the_one_process_host_losses(tmp_path):
  """`python -m experiments.train --config.train.table_placement=host` on 2 processes: each
  holds half of the host table; losses, evaluation and the tables equal the one-process
  host run's on the same global batch; a resume repeats the steps exactly; `load_run`
  joins the shards in one process, to the same evaluation."""
  tok = f"--config.data.tokenizer_dir={tmp_path / 'tok'}"
  ref_dir, two_dir = tmp_path / "one", tmp_path / "two"
  # the one-process host run with the same global batch, beside the 2 processes (both train
  # the shared tokenizer, deterministically; written atomically)
  one = ([f"--workdir={ref_dir}", tok, "--config.data.batch_size=4", "--data_shards=2"], _env(1), tmp_path / "one.log")
  ref, *summaries = _run_all([one, *_two_processes(two_dir, tok, tmp_path / "a")], base=HOST_MICRO)
  ref_rows, two_rows, ref_train, two_train = completed_train_rows(ref, summaries, ref_dir, two_dir, STEPS)
  meta = json.loads((two_dir / "meta.json").read_text())
  [layer] = meta["host_table_layers"]
  for step, want in ref_train.items():
    got = two_train[step]
    assert got["tokens"] == want["tokens"] > 0.9 * 4 * 32  # the same global batch
    assert got[f"engram_rows_touched_{layer}"] == want[f"engram_rows_touched_{layer}"] > 0
    assert got["moe_dropped"] == want["moe_dropped"]
    for key in ("loss", "total_loss", "moe_max_load"):
      # float summation order only (the row grads are summed per owner process)
      assert got[key] == pytest.approx(want[key], rel=2e-5), (step, key)
    # Adam on a table row whose summed gradient is near 0 turns the rounding of that sum into
    # a visible step (m / sqrt(v)); the grad norm of step 4 sees it (measured 1.6e-4, lr x20)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-5 if step < 4 else 1e-3), step
  ref_val = {r["step"]: r for r in ref_rows if r["split"] == "val"}
  two_val = {r["step"]: r for r in two_rows if r["split"] == "val"}
  assert sorted(two_val) == sorted(ref_val) == [2, STEPS]
  assert ref_val[STEPS]["val_loss"] < ref_val[2]["val_loss"]  # it trained
  for step, want in ref_val.items():  # every process feeds its rows of each global eval batch
    assert two_val[step]["val_tokens"] == want["val_tokens"] > 0
    for key in ("val_loss", "val_loss_se", "val_accuracy"):
      assert two_val[step][key] == pytest.approx(want[key], rel=2e-5), (step, key)
  assert summaries[1]["eval"]["val_loss"] == summaries[0]["eval"]["val_loss"]  # every process: global sums

  # each process holds only its half of the table and of its Adam state
  step_dir = two_dir / "checkpoints" / str(STEPS)
  manifest = host_shards.read_manifest(step_dir / "host_shards")
  assert manifest["process_count"] == 2 and manifest["layers"] == [layer] and manifest["step"] == STEPS
  rows = manifest["num_rows"][str(layer)]
  halves = [(0, -(-rows // 2)), (-(-rows // 2), rows)]
  shards = _shard_files(step_dir)
  for i, (lo, hi) in enumerate(halves):
    assert json.loads((step_dir / "host_shards" / f"layer_{layer}" / f"rows.p{i}-of-2.json").read_text())["lo"] == lo
    arrays = [shards[f"layer_{layer}/{w}.p{i}-of-2.npy"] for w in host_shards.ARRAYS]
    assert [a.shape[0] for a in arrays] == [hi - lo] * 4
    # the bytes each process reported holding (meta.json): its rows' table + m + v + count
    assert meta["host_table_bytes_per_process"][i] == sum(a.nbytes for a in arrays)
  [one_bytes] = json.loads((ref_dir / "meta.json").read_text())["host_table_bytes_per_process"]
  assert sum(meta["host_table_bytes_per_process"]) == one_bytes
  assert max(meta["host_table_bytes_per_process"]) <= one_bytes // 2 + one_bytes // rows  # half, +1 row

  # resume from the checkpoint of step 2 (in the background, while this process checks a
  # copy of the first run's checkpoints): steps 3-4 must repeat exactly
  shutil.copytree(two_dir / "checkpoints", tmp_path / "copy" / "checkpoints")
  resume: list = []

  def run_resume():
    try:
      resume.append(_run_all(_two_processes(two_dir, tok, tmp_path / "b", "--resume_step=2"), base=HOST_MICRO))
    except BaseException as e:  # noqa: BLE001  re-raised below, in the test's thread
      resume.append(e)

  thread = threading.Thread(target=run_resume)
  thread.start()
  try:
    _check_joined(ref_dir, tmp_path / "copy", layer, shards, two_val[STEPS])
  finally:
    thread.join()
  if isinstance(resume[0], BaseException):
    raise resume[0]
  assert [(s["status"], s["step"]) for s in resume[0]] == [("completed", STEPS)] * 2
  resumed = {r["step"]: r for r in _metrics(two_dir) if r["split"] == "train"}
  timing = ("time", "tokens_per_second")
  for step in (3, 4):
    assert {k: v for k, v in resumed[step].items() if k not in timing} == {
      k: v for k, v in two_train[step].items() if k not in timing
    }, step
  first = _shard_files(two_dir / "superseded_checkpoints" / str(STEPS))  # the first run's step 4
  second = _shard_files(two_dir / "checkpoints" / str(STEPS))
  assert sorted(first) == sorted(second) and len(first) == 2 * 4
  for name, a in first.items():
    np.testing.assert_array_equal(second[name], a, err_msg=name)


def _check_joined(ref_dir: Path, two_dir: Path, layer: int, shards: dict, two_val: dict) -> None:
  """The 2-process run's tables equal the 1-process run's; `load_run` joins them in one
  process, to the 2-process run's evaluation."""
  from engram_jax.train.checkpoint import Checkpointer
  from engram_jax.train.restore import evaluate_run, load_run

  # The two halves are the one-process table. Adam divides by sqrt(v): for a row whose
  # summed gradient is near 0 the summation-order rounding moves its step (measured: 0.8% of
  # the entries off by more than 2e-6, at most 2.5e-4 = 0.4% of one step at lr 0.06).
  halves = [[shards[f"layer_{layer}/{w}.p{i}-of-2.npy"] for i in range(2)] for w in host_shards.ARRAYS]
  joined = dict(zip(host_shards.ARRAYS, (np.concatenate(h) for h in halves)))
  ckpt = Checkpointer(ref_dir / "checkpoints")
  try:
    want = ckpt.restore_host_tables({layer: joined}, STEPS)[layer]
  finally:
    ckpt.close()
  np.testing.assert_allclose(joined["table"], want["table"], rtol=2e-5, atol=1e-3)
  assert np.isclose(joined["table"], want["table"], rtol=2e-5, atol=2e-6).mean() > 0.98
  np.testing.assert_array_equal(joined["count"], want["count"])  # the same rows updated as often

  # load_run joins the shards in one process (tables="host": NumPy row stores, what
  # evaluate_run, Decoder / Generator and experiments.generate take): the 2-process evaluation
  run = load_run(two_dir, tables="host")
  np.testing.assert_array_equal(run.host_tables[layer].numpy(), joined["table"])
  val = evaluate_run(run, run.data_config.replace(eval_batch_size=4))  # the global eval batch
  assert val["val_tokens"] == two_val["val_tokens"]
  for key in ("val_loss", "val_loss_se", "val_accuracy"):
    assert val[key] == pytest.approx(two_val[key], rel=1e-5), key


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


def test_checkpointer_saves_the_shards_and_refuses_another_process_count(tmp_path):
  from engram_jax.train.checkpoint import Checkpointer, CheckpointMismatchError

  rng = np.random.default_rng(2)
  plan = HostShardPlan(_mesh(), ("data",), R)
  table = ShardedHostTable.from_full(plan, rng.normal(size=(R, D_ROW)).astype(np.float32))
  table.state.v[:] = 1.5
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(3, {"w": jnp.arange(3.0)}, meta={"seed": 0}, vocab={}, host_shards={4: table})
  back = ckpt.restore_host_shards({4: plan}, 3)[4]
  for a, b in zip((back.table, *back.state), (table.table, *table.state)):
    np.testing.assert_array_equal(a, b)
  [joined] = host_shards.assemble_tables(tmp_path / "ckpt" / "3" / "host_shards")[4]
  np.testing.assert_array_equal(joined, table.table)
  like = {4: {"table": table.table, "m": table.state.m, "v": table.state.v, "count": table.state.count}}
  with pytest.raises(CheckpointMismatchError, match=r"split over 1 processes \(item host_shards\)"):
    ckpt.restore_host_tables(like, 3)
  manifest = tmp_path / "ckpt" / "3" / "host_shards" / "manifest.json"
  manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "process_count": 2}))
  with pytest.raises(CheckpointMismatchError, match="split over 2 processes, this run has 1; resume with 2"):
    ckpt.restore_host_shards({4: plan}, 3)
  ckpt.save(4, {"w": jnp.arange(3.0)}, meta={"seed": 0}, vocab={}, host_tables=like)
  with pytest.raises(CheckpointMismatchError, match="holds no host_shards item"):
    ckpt.restore_host_shards({4: plan}, 4)


def test_several_processes_refuse_placements_the_shards_cannot_hold(monkeypatch):
  from engram_jax.offload import parse_placements
  from engram_jax.train.config import TrainConfig
  from engram_jax.train.trainer import _check_host_placement_setup

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  mesh = _mesh(4)
  for spec in ("host", "1:host,2:host"):
    _check_host_placement_setup(mesh, TrainConfig(table_placement=spec), parse_placements(spec, (1, 2)))
  for spec, named in [("cached@0.1", "['cached']"), ("1:host", "['device']"), ("disk", "['host+disk']")]:
    with pytest.raises(NotImplementedError, match=rf"table_placement='{spec}' with 2 processes.*placed {named}"):
      _check_host_placement_setup(mesh, TrainConfig(table_placement=spec), parse_placements(spec, (1, 2)))
  with pytest.raises(NotImplementedError, match=r"with 2 processes.*model-parallel axes \{'tensor': 2\}"):
    _check_host_placement_setup(
      sharding_lib.make_mesh(data=2, tensor=2), TrainConfig(table_placement="host"), parse_placements("host", (1, 2))
    )
