"""Row-sparse updates of device tables against the dense-Adam reference. table_optimizer=
"catchup_adam": dense Adam, lazily (equal to it, flushed, also when rows sit out steps);
"sparse_adam" (per-row counts): equal while every row is touched at every step; afterwards
touched rows still follow Adam and untouched rows, their m, v and count stay unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import sharding as sharding_lib
from engram_jax.train import CheckpointMismatchError
from engram_jax.train.checkpoint import compare_meta
from engram_jax.train.config import TrainConfig
from engram_jax.train.optimizer import SparseTableOptimizer, make_table_optimizer
from engram_jax.train.restore import evaluate_run, load_run
from engram_jax.train.state import TrainState, create_train_state, split_model
from engram_jax.train.steps import make_train_step
from engram_jax.train.trainer import Trainer
from tests.test_offload_model import CONFIG, fresh_model
from tests.test_offload_training import SCHEDULE, _batch
from tests.test_train import TRAIN as TRAINER_CFG
from tests.test_train import data_config, tiny_model  # noqa: F401  (data_config: a fixture)

LAYERS = CONFIG.engram_layer_ids
TRAIN = TrainConfig(
  total_steps=10, learning_rate=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip_norm=0.5, progress_bar=False
)
RATE = CONFIG.moe.bias_update_rate


def _table(params, layer):
  return np.asarray(params["blocks"][layer]["engram"]["table"][...])


def _run(cfg: TrainConfig, batches):
  """States (device copies) and metrics after each step of the trainer's jitted step."""
  graphdef, params, rest = split_model(fresh_model())
  tx, lr = make_table_optimizer(cfg, params)
  step = jax.jit(make_train_step(graphdef, tx, lr, bias_update_rate=RATE))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
  states, metrics = [], []
  for batch in batches:
    state, m, _ = step(state, batch)
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return tx, states, metrics


@pytest.fixture(scope="module")
def runs():
  batches = [_batch(seed, frac) for seed, frac in enumerate(SCHEDULE)]
  dense = _run(TRAIN.replace(table_optimizer="dense_adam"), batches)
  sparse = _run(TRAIN.replace(table_optimizer="sparse_adam"), batches)
  return batches, dense, sparse


@pytest.fixture(scope="module")
def catchup(runs):
  return _run(TRAIN.replace(table_optimizer="catchup_adam"), runs[0])


def test_catchup_adam_equals_dense_adam_with_partial_touches(runs, catchup):
  """Rows sit out steps 4-6 (SCHEDULE): the forward pass sees dense Adam's rows (loss, grad
  norm), the backbone follows dense, and the flushed tables equal dense Adam's tables."""
  batches, (_, dense, dense_m), _ = runs
  tx, states, metrics = catchup
  assert isinstance(tx, SparseTableOptimizer) and tx.catch_up
  for i in range(len(batches)):
    np.testing.assert_allclose(metrics[i]["loss"], dense_m[i]["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics[i]["grad_norm"], dense_m[i]["grad_norm"], rtol=1e-4)
    flushed = jax.device_get(tx.flushed_params(states[i].params, states[i].opt_state))
    for a, b in zip(jax.tree.leaves(flushed), jax.tree.leaves(dense[i].params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
  for i in range(3, len(batches)):
    for j, l in enumerate(LAYERS):
      touched = _touched(batches[i], l)
      lazy, flushed = _table(states[i].params, l), _table(tx.flushed_params(states[i].params, states[i].opt_state), l)
      # untouched rows are not written until they are next touched (or flushed)
      np.testing.assert_array_equal(lazy[~touched], _table(states[i - 1].params, l)[~touched])
      assert np.abs(flushed[~touched] - lazy[~touched]).max() > 0
      np.testing.assert_array_equal(np.asarray(states[i].opt_state[1][j].last)[touched], i)


def test_the_optimizer_chosen(runs):
  _, (dense_tx, _, _), (sparse_tx, _, _) = runs
  assert not isinstance(dense_tx, SparseTableOptimizer)
  assert isinstance(sparse_tx, SparseTableOptimizer) and sparse_tx.layers == LAYERS


def test_equal_to_dense_adam_while_every_row_is_touched(runs):
  _, (_, dense, dense_m), (_, sparse, sparse_m) = runs
  for i in range(3):  # SCHEDULE: steps 1-3 touch every row of every head
    np.testing.assert_allclose(sparse_m[i]["loss"], dense_m[i]["loss"], rtol=1e-5)
    np.testing.assert_allclose(sparse_m[i]["grad_norm"], dense_m[i]["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sparse[i].params), jax.tree.leaves(dense[i].params)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for l in LAYERS:
      assert int(sparse_m[i][f"engram_rows_touched_{l}"]) == fresh_model().blocks[l].engram.num_rows


def _touched(batch, layer):
  engram = fresh_model().blocks[layer].engram
  flat = np.asarray(batch["engram_ids"][layer]) + np.asarray(engram.offsets)
  mask = np.zeros(engram.num_rows, bool)
  mask[flat.reshape(-1)] = True
  return mask


def test_partial_steps_update_touched_rows_only(runs):
  batches, (_, dense, _), (sparse_tx, sparse, _) = runs
  for i in range(3, len(SCHEDULE)):
    for j, l in enumerate(sparse_tx.layers):
      touched = _touched(batches[i], l)
      assert 0 < touched.sum() < touched.size
      before, after = _table(sparse[i - 1].params, l), _table(sparse[i].params, l)
      m0, v0, c0 = sparse[i - 1].opt_state[1][j]
      m1, v1, c1 = sparse[i].opt_state[1][j]
      # untouched: bit-identical rows, moments and counts
      np.testing.assert_array_equal(after[~touched], before[~touched])
      np.testing.assert_array_equal(m1[~touched], m0[~touched])
      np.testing.assert_array_equal(v1[~touched], v0[~touched])
      np.testing.assert_array_equal(c1[~touched], c0[~touched])
      # touched: one more Adam step each, and the rows move
      np.testing.assert_array_equal(c1[touched], c0[touched] + 1)
      assert (np.abs(after[touched] - before[touched]).max(-1) > 0).all()
      # dense Adam keeps moving the untouched rows (decayed m), sparse does not
      dense_moved = np.abs(_table(dense[i].params, l) - _table(dense[i - 1].params, l))[~touched]
      assert dense_moved.max() > 0
  # step 4 (index 3) comes after steps that touched every row: both optimizers agree on the
  # rows it touches (same m, v history, count = global step)
  for l in LAYERS:
    touched = _touched(batches[3], l)
    np.testing.assert_allclose(
      _table(sparse[3].params, l)[touched], _table(dense[3].params, l)[touched], rtol=1e-4, atol=1e-5
    )


def test_first_touch_step_size_is_about_lr():
  """A row first touched late takes a fresh-Adam first step (~lr), not a global-count one."""
  batches = [_batch(s, 0.5) for s in range(3)] + [_batch(3, 1.0)]
  tx, states, _ = _run(
    TRAIN.replace(table_optimizer="sparse_adam", grad_clip_norm=0.0, warmup_steps=0, schedule="constant"), batches
  )
  l = LAYERS[0]
  new = _touched(batches[3], l) & ~np.any([_touched(b, l) for b in batches[:3]], 0)
  assert new.any()
  step = np.abs(_table(states[3].params, l) - _table(states[2].params, l))[new]
  lr = TRAIN.learning_rate * TRAIN.engram_lr_multiplier
  # |m_hat / (sqrt(v_hat) + eps)| = 1 - O(eps / |g|) at a row's first step; a global count
  # (t = 4) would give 0.56 lr
  assert np.all(step <= lr * (1 + 1e-5))
  np.testing.assert_allclose(np.median(step), lr, rtol=1e-3)


def test_frozen_tables_stay_put():
  batches = [_batch(s) for s in range(2)]
  tx, states, metrics = _run(TRAIN.replace(table_optimizer="sparse_adam", freeze_engram_tables=True), batches)
  assert isinstance(tx, SparseTableOptimizer) and states[-1].opt_state[1] == ()
  start = split_model(fresh_model())[1]
  for l in LAYERS:
    np.testing.assert_array_equal(_table(states[-1].params, l), _table(start, l))
  assert np.isfinite(metrics[-1]["loss"])


def _mesh_run(mesh, cfg, batches):
  graphdef, state, state_sh, (tx, lr) = create_train_state(CONFIG, lambda p: make_table_optimizer(cfg, p), 0, mesh)
  step = jax.jit(
    make_train_step(graphdef, tx, lr, bias_update_rate=RATE),
    in_shardings=(state_sh, None),
    out_shardings=(state_sh, None, None),
  )
  with jax.set_mesh(mesh):
    for batch in batches:
      state, _, _ = step(state, batch)
  return tx, jax.device_get(state)


def test_data_parallel_mesh_equals_dense():
  mesh = sharding_lib.make_mesh(data=2, devices=jax.devices()[:2])
  batches = [_batch(s) for s in range(2)]
  sparse_tx, sparse = _mesh_run(mesh, TRAIN.replace(table_optimizer="catchup_adam"), batches)
  _, dense = _mesh_run(mesh, TRAIN.replace(table_optimizer="dense_adam"), batches)
  assert isinstance(sparse_tx, SparseTableOptimizer)
  for a, b in zip(jax.tree.leaves(sparse.params), jax.tree.leaves(dense.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_row_sharded_tables_train_row_sparse_like_one_device():
  """sparse_adam on tables split by rows over tensor=2: the same tables as on one device."""
  batches = [_batch(s) for s in range(2)]
  mesh = sharding_lib.make_mesh(tensor=2, devices=jax.devices()[:2])
  tx, split = _mesh_run(mesh, TRAIN.replace(table_optimizer="sparse_adam"), batches)
  _, one = _mesh_run(
    sharding_lib.make_mesh(devices=jax.devices()[:1]), TRAIN.replace(table_optimizer="sparse_adam"), batches
  )
  assert isinstance(tx, SparseTableOptimizer)
  for l in LAYERS:
    np.testing.assert_allclose(_table(split.params, l), _table(one.params, l), rtol=2e-5, atol=2e-6)
  for a, b in zip(split.opt_state[1], one.opt_state[1]):
    np.testing.assert_array_equal(a.count, b.count)


def test_trainer_resume_is_bit_exact_and_keeps_its_table_optimizer(data_config, tmp_path):  # noqa: F811
  cfg = TRAINER_CFG.replace(table_optimizer="catchup_adam")
  # evaluating (at steps 3 and 6) reads flushed copies: the training state stays as it was
  straight = Trainer(tiny_model(), cfg.replace(eval_every=3), data_config, tmp_path / "straight").run()
  assert Trainer(tiny_model(), cfg, data_config, tmp_path / "resumed").run(stop_after=3).step == 3
  second = Trainer(tiny_model(), cfg, data_config, tmp_path / "resumed").run()
  for step in (4, 5, 6):
    assert second.losses[step] == straight.losses[step], step  # to the last bit
  # the trainer evaluates, and load_run exports, the flushed tables (dense Adam's)
  assert abs(evaluate_run(load_run(tmp_path / "straight"))["val_loss"] - straight.eval["val_loss"]) < 1e-5
  with pytest.raises(CheckpointMismatchError, match="table_optimizer"):
    Trainer(tiny_model(), cfg.replace(table_optimizer="sparse_adam"), data_config, tmp_path / "resumed").run()


def test_a_checkpoint_resumes_only_with_its_table_optimizer():
  meta = lambda opt: {"train": TRAIN.replace(table_optimizer=opt).to_dict()}  # noqa: E731
  assert compare_meta(meta("sparse_adam"), meta("sparse_adam")) == []
  (problem,) = compare_meta(meta("dense_adam"), meta("sparse_adam"))
  assert "table_optimizer" in problem
  # saved before the field existed: dense Adam
  assert compare_meta({"train": {}}, meta("dense_adam")) == []


def test_bad_table_optimizer_is_refused():
  with pytest.raises(ValueError, match="table_optimizer"):
    TrainConfig(table_optimizer="lazy_adam")
