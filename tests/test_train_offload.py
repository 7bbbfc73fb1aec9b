"""Trainer with host-placed Engram tables (TrainConfig.table_placement): training, evaluation,
exact resume from checkpoints holding the host tables and their sparse Adam state, and
`load_run` of such a checkpoint for evaluation and generation."""

import json
import math
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from engram_jax import sharding as sharding_lib
from engram_jax.data import DataConfig
from engram_jax.inference import Generator, SamplingConfig
from engram_jax.models.config import ModelConfig
from engram_jax.offload import HostTable, HotRowCache, TablePlacement, save_frequencies, top_rows
from engram_jax.offload.disk_table import DiskTable
from engram_jax.train import CheckpointMismatchError, TrainConfig
from engram_jax.train.metrics import read_metrics
from engram_jax.train.restore import evaluate_run, load_run
from engram_jax.train.trainer import Trainer
from tests.test_train import VOCAB, tiny_model

LAYER = 1  # tiny_model's only Engram layer
# warmup_steps=1: the lr of step 1 is 0, so step 1 moves no parameter (and no table row)
HOST = TrainConfig(
  total_steps=4,
  warmup_steps=1,
  eval_every=4,
  checkpoint_every=2,
  log_every=1,
  progress_bar=False,
  table_placement="host",
)
NO_EVAL_OR_CHECKPOINTS = {"eval_every": 0, "checkpoint_every": 0}


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
def straight(data_config, tmp_path_factory):
  trainer = Trainer(tiny_model(), HOST, data_config, tmp_path_factory.mktemp("runs") / "straight")
  return trainer, trainer.run()


@pytest.fixture(scope="module")
def device_first_step(data_config, tmp_path_factory):
  """The device-placement run of the same model, one step, on one device."""
  mesh = sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])
  trainer = Trainer(
    tiny_model(),
    HOST.replace(table_placement="device", **NO_EVAL_OR_CHECKPOINTS),
    data_config,
    tmp_path_factory.mktemp("runs") / "device",
    mesh=mesh,
  )
  return trainer, trainer.run(stop_after=1)


def _host_state(trainer):
  return {l: {k: np.copy(v) for k, v in d.items()} for l, d in trainer.host_trainer.host_state().items()}


def _resume_from_step_2(straight_trainer, tmp_path, placement):
  """A copy of the straight run's workdir without its step-4 checkpoint, resumed."""
  workdir = tmp_path / "resumed"
  shutil.copytree(straight_trainer.workdir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  (workdir / "metrics.jsonl").unlink()
  trainer = Trainer(tiny_model(), HOST.replace(table_placement=placement), straight_trainer.data_config, workdir)
  assert trainer.checkpointer.latest_step() == 2
  return trainer, trainer.run()


def test_host_placement_trains_and_evaluates(straight, device_first_step):
  trainer, result = straight
  assert result.status == "completed" and sorted(result.losses) == [1, 2, 3, 4]
  assert all(math.isfinite(v) for v in result.losses.values())
  assert set(result.eval) >= {"val_loss", "val_perplexity", "val_bits_per_byte"}
  assert all(math.isfinite(v) for v in result.eval.values())
  assert read_metrics(trainer.workdir, "val")[-1]["val_loss"] == result.eval["val_loss"]
  assert trainer.checkpointer.all_steps() == [2, 4]
  assert trainer.checkpointer.read_meta()[0]["host_table_layers"] == [LAYER]
  # the initial state is committed to the device like the step's outputs: one compilation
  assert trainer.host_trainer.train_step._cache_size() == 1
  # the table lives on the host; the model keeps a size-0 placeholder
  table = trainer.host_trainer.offloaded.tables[LAYER].numpy()
  assert table.shape[0] > 0 and trainer.state.rest["blocks"][LAYER]["engram"]["table"].get_value().shape[0] == 0
  # sparse Adam: every row counts the steps that touched it (logged per step) ...
  count = trainer.host_trainer.host_state()[LAYER]["count"]
  touched = [r[f"engram_rows_touched_{LAYER}"] for r in read_metrics(trainer.workdir, "train")]
  assert len(touched) == 4 and count.sum() == sum(touched) and count.max() <= 4
  # ... rows never touched keep their initial values (the device run's table after its
  # lr-0 first step), touched rows moved
  device_trainer, _ = device_first_step
  initial = np.asarray(device_trainer.state.params["blocks"][LAYER]["engram"]["table"].get_value())
  np.testing.assert_array_equal(table[count == 0], initial[count == 0])
  assert (count == 0).any() and not np.allclose(table[count > 1], initial[count > 1])


def test_first_step_loss_equals_device_placement(straight, device_first_step):
  _, host = straight
  _, device = device_first_step
  assert host.losses[1] == device.losses[1]  # same init, same batch, to the last bit


def test_resume_restores_host_tables_and_sparse_adam_exactly(straight, tmp_path):
  trainer, result = straight
  resumed, second = _resume_from_step_2(trainer, tmp_path, "host")
  assert sorted(second.losses) == [3, 4]
  for step in (3, 4):
    assert second.losses[step] == result.losses[step], step  # to the last bit
  assert second.eval == result.eval
  want, got = _host_state(trainer), _host_state(resumed)
  for key in ("table", "m", "v", "count"):
    np.testing.assert_array_equal(got[LAYER][key], want[LAYER][key], err_msg=key)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(resumed.state.params), jax.device_get(trainer.state.params)
  )


def test_load_run_puts_the_host_tables_back_and_evaluates_like_the_trainer(straight):
  trainer, result = straight
  run = load_run(trainer.workdir)
  assert run.step == 4 and run.host_table_layers == (LAYER,)
  # one model holding everything: the trained host table and the trained dense params
  table = run.model.blocks[LAYER].engram.table.get_value()
  np.testing.assert_array_equal(np.asarray(table), trainer.host_trainer.offloaded.tables[LAYER].numpy())
  params = jax.device_get(nnx.state(run.model, nnx.Param))
  dense = jax.device_get(trainer.state.params)
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, value in jax.tree_util.tree_flatten_with_path(dense)[0]:
    np.testing.assert_array_equal(flat[path], value, err_msg=str(path))
  assert len(flat) == len(jax.tree.leaves(dense)) + 1  # + the table
  assert abs(evaluate_run(run)["val_loss"] - result.eval["val_loss"]) < 1e-5
  prompt = run.tokenizer.encode("def main(", add_special_tokens=False).ids
  generated = Generator(run.model, run.hasher, run.compressor)(
    [prompt], max_new_tokens=3, sampling=SamplingConfig(greedy=True)
  )
  assert len(generated.tokens[0]) == 3


def test_load_run_keeps_the_host_tables_on_the_host(straight):
  """tables="host": the tables come back as HostTables equal to the device-loaded ones, the
  model keeps size-0 placeholders; evaluation and greedy generation equal the device path."""
  trainer, result = straight
  run = load_run(trainer.workdir, tables="host")
  on_device = load_run(trainer.workdir)
  assert run.step == 4 and run.host_table_layers == (LAYER,) and on_device.host_tables is None
  assert set(run.host_tables) == {LAYER} and isinstance(run.host_tables[LAYER], HostTable)
  assert isinstance(run.host_tables[LAYER].array, np.ndarray)
  np.testing.assert_array_equal(
    run.host_tables[LAYER].numpy(), np.asarray(on_device.model.blocks[LAYER].engram.table.get_value())
  )
  assert run.model.blocks[LAYER].engram.table.get_value().shape == (0, run.host_tables[LAYER].dim)
  assert abs(evaluate_run(run)["val_loss"] - result.eval["val_loss"]) < 1e-5
  prompt = run.tokenizer.encode("def main(", add_special_tokens=False).ids
  greedy = {"max_new_tokens": 4, "sampling": SamplingConfig(greedy=True)}
  host = Generator(run.model, run.hasher, run.compressor, stores=run.stores)([prompt], **greedy)
  device = Generator(on_device.model, on_device.hasher, on_device.compressor)([prompt], **greedy)
  assert len(host.tokens[0]) == 4 and host.tokens == device.tokens
  with pytest.raises(ValueError, match=r"layers \[1\] are size-0 placeholders"):
    Generator(run.model, run.hasher, run.compressor)  # device placement needs the tables
  # any other placement: loaded, then split out of the model into its row stores
  disk = load_run(trainer.workdir, tables="disk@dram=0.05")
  assert isinstance(disk.host_tables[LAYER], DiskTable)
  np.testing.assert_array_equal(np.asarray(disk.host_tables[LAYER].numpy()), run.host_tables[LAYER].numpy())
  assert abs(evaluate_run(disk)["val_loss"] - result.eval["val_loss"]) < 1e-5
  with pytest.raises(ValueError, match="hots"):
    load_run(trainer.workdir, tables="hots")


def _copy_with_edited_meta(trainer, workdir, edit):
  """A copy of the run's checkpoints whose step-4 meta went through `edit(meta)`."""
  shutil.copytree(trainer.workdir / "checkpoints", workdir / "checkpoints")
  meta_file = workdir / "checkpoints" / "4" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  edit(meta)
  meta_file.write_text(json.dumps(meta))
  return workdir


def test_load_run_refuses_host_tables_for_a_device_run(straight, tmp_path):
  """A meta naming no host_table_layers (a device run's): tables="host" is refused."""
  trainer, _ = straight
  workdir = _copy_with_edited_meta(trainer, tmp_path / "device_meta", lambda meta: meta.update(host_table_layers=[]))
  with pytest.raises(ValueError, match="every Engram table on the device.*tables='device'"):
    load_run(workdir, tables="host")


def test_load_run_refuses_tampered_hash_constants(straight, tmp_path):
  trainer, _ = straight

  def tamper_multiplier(meta):
    meta["hash_constants"]["multipliers"][str(LAYER)][0] += 2

  def change_model_seed(meta):  # constants intact, but not the model's hashing
    meta["model"]["engram"]["seed"] += 1

  workdir = _copy_with_edited_meta(trainer, tmp_path / "tampered", tamper_multiplier)
  with pytest.raises(ValueError, match="hash constants.*multipliers differ for layers"):
    load_run(workdir)
  workdir = _copy_with_edited_meta(trainer, tmp_path / "reseeded", change_model_seed)
  with pytest.raises(CheckpointMismatchError, match="hash constants are for"):
    load_run(workdir)


def test_cached_placement_trains_like_host(straight, data_config, tmp_path):
  """The hot rows come from the first FREQUENCY_BATCHES batches of a separate iterator:
  training still sees batch 1 first, and the rows (so the losses) equal the host run's."""
  _, result = straight
  config = HOST.replace(table_placement=f"{LAYER}:cached@0.05", **NO_EVAL_OR_CHECKPOINTS)
  trainer = Trainer(tiny_model(), config, data_config, tmp_path / "cached")
  cached = trainer.run(stop_after=2)
  assert cached.losses == {1: result.losses[1], 2: result.losses[2]}
  cache = trainer.host_trainer.offloaded.stores[LAYER].cache
  assert isinstance(cache, HotRowCache)
  counts = trainer.row_frequencies(trainer.host_trainer.model, (LAYER,))[LAYER]
  assert counts.sum() > 0
  np.testing.assert_array_equal(np.sort(cache.hot_rows), np.sort(top_rows(counts, cache.capacity)))


def test_placement_mapping_sets_what_a_spec_cannot(straight, data_config, tmp_path):
  """Trainer(placements={layer: TablePlacement}): a frequency file for the hot rows (no spec
  string carries one) is used instead of counting; the losses equal the host run's, and the
  run records the mapping's spec."""
  host_trainer, result = straight
  num_rows = host_trainer.host_trainer.offloaded.tables[LAYER].num_rows
  counts = np.random.default_rng(0).integers(0, 1000, num_rows)
  save_frequencies(tmp_path / "freq.npy", counts)
  placements = {LAYER: TablePlacement("cached", cache_fraction=0.05, frequency_file=str(tmp_path / "freq.npy"))}
  config = HOST.replace(table_placement="device", **NO_EVAL_OR_CHECKPOINTS)
  trainer = Trainer(tiny_model(), config, data_config, tmp_path / "mapped", placements=placements)
  assert trainer.train_config.table_placement == "cached@0.05" and trainer.placements == placements
  cached = trainer.run(stop_after=2)
  assert cached.losses == {1: result.losses[1], 2: result.losses[2]}
  cache = trainer.host_trainer.offloaded.stores[LAYER].cache
  np.testing.assert_array_equal(np.sort(cache.hot_rows), np.sort(top_rows(counts, cache.capacity)))
  assert json.loads((trainer.workdir / "meta.json").read_text())["train"]["table_placement"] == "cached@0.05"


def test_host_checkpoint_resumes_as_cached_but_not_on_device(straight, tmp_path):
  trainer, result = straight
  _, second = _resume_from_step_2(trainer, tmp_path, "cached@0.1")  # same host state
  assert second.losses == {3: result.losses[3], 4: result.losses[4]}
  with pytest.raises(CheckpointMismatchError, match=r"table placement differs.*layers \[1\].*'host'"):
    Trainer(tiny_model(), HOST.replace(table_placement="device"), trainer.data_config, trainer.workdir).run()
  assert trainer.checkpointer.all_steps() == [2, 4]  # nothing overwritten


def test_bad_placements_are_refused(data_config, tmp_path):
  with pytest.raises(ValueError, match="table_placement.*'hots'"):
    TrainConfig(table_placement="hots")
  with pytest.raises(ValueError, match="cache_fraction"):
    TrainConfig(table_placement="1:cached@1.5")
  with pytest.raises(ValueError, match="names layer 0, not an Engram layer"):
    Trainer(tiny_model(), HOST.replace(table_placement="0:host"), data_config, tmp_path / "a")
  dense = ModelConfig.tiny("moe", vocab_size=VOCAB)
  with pytest.raises(ValueError, match="needs a model with Engram layers"):
    Trainer(dense, HOST, data_config, tmp_path / "b")
  with pytest.raises(ValueError, match=r"placements name layers \[0\] that are not Engram layers \[1\]"):
    Trainer(tiny_model(), HOST, data_config, tmp_path / "e", placements={0: TablePlacement("host")})
  with pytest.raises(ValueError, match=r"placements \('cached@0.5'\) and TrainConfig.table_placement='host'"):
    Trainer(
      tiny_model(), HOST, data_config, tmp_path / "f", placements={1: TablePlacement("cached", cache_fraction=0.5)}
    )
  with pytest.raises(TypeError, match=r"placements\[1\] must be a TablePlacement, got str"):
    Trainer(tiny_model(), HOST.replace(table_placement="device"), data_config, tmp_path / "g", placements={1: "host"})
  with pytest.raises(ValueError, match="freeze_engram_tables"):
    Trainer(tiny_model(), HOST.replace(freeze_engram_tables=True), data_config, tmp_path / "c")
  if jax.device_count() > 1:
    mesh = sharding_lib.make_mesh(data=1, tensor=2)
    with pytest.raises(NotImplementedError, match=r"data-parallel meshes.*\{'tensor': 2\}"):
      Trainer(tiny_model(), HOST, data_config, tmp_path / "d", mesh=mesh)


def test_multi_process_host_table_trainer_is_refused(monkeypatch):
  # several processes split the tables instead (tests/test_host_shards.py)
  from engram_jax.train.host_trainer import check_data_parallel_mesh

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(NotImplementedError, match="HostTableTrainer runs in a single process; got 2 .*Sharded"):
    check_data_parallel_mesh(sharding_lib.make_mesh(data=1, devices=jax.devices()[:1]))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")
def test_data_parallel_host_placement_equals_one_device(straight, data_config, tmp_path):
  """data=2: batch and rows split over 2 devices, sparse grads reduced over the global
  batch: the same losses, eval and host tables as the one-device run (same global batch)."""
  one, want = straight
  mesh = sharding_lib.make_mesh(data=2)
  trainer = Trainer(tiny_model(), HOST.replace(checkpoint_every=0), data_config, tmp_path / "dp", mesh=mesh)
  got = trainer.run()
  host = trainer.host_trainer
  assert host.mesh is mesh and host.train_step._cache_size() == 1
  assert trainer.state.step.sharding.device_set == set(mesh.devices.flat)
  heads = host.offloaded.stores[LAYER].index.num_heads
  rows = host.gather({LAYER: np.zeros((4, data_config.seq_len, heads), np.int64)})[LAYER]
  assert sharding_lib.num_shards(rows) == 2  # each device gets its half of the batch's rows
  assert sorted(got.losses) == [1, 2, 3, 4]
  np.testing.assert_allclose([got.losses[s] for s in range(1, 5)], [want.losses[s] for s in range(1, 5)], rtol=1e-5)
  assert got.eval["val_loss"] == pytest.approx(want.eval["val_loss"], rel=1e-5)
  got_tables, want_tables = _host_state(trainer), _host_state(one)
  np.testing.assert_array_equal(got_tables[LAYER]["count"], want_tables[LAYER]["count"])
  # float32 reductions split over 2 devices round differently: ~1e-6 on O(1) table values
  np.testing.assert_allclose(got_tables[LAYER]["table"], want_tables[LAYER]["table"], rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    jax.device_get(trainer.state.params),
    jax.device_get(one.state.params),
  )
