"""Training: optimizer groups, exact resume, divergence, checkpoint compatibility checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import EngramConfig
from engram_jax import sharding as sharding_lib
from engram_jax.data import DataConfig
from engram_jax.models.config import ModelConfig
from engram_jax.train import (
  CheckpointMismatchError,
  TrainConfig,
  learning_rate_schedule,
  make_optimizer,
  parameter_labels,
)
from engram_jax.train import trainer as trainer_lib
from engram_jax.train.state import build_model, split_model
from engram_jax.train.trainer import Trainer, TrainingDivergedError

VOCAB = 512


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


def tiny_model(**engram_overrides):
  engram = EngramConfig(
    vocab_sizes=(211, 223), n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=(1,), pad_id=0, **engram_overrides
  )
  return ModelConfig.tiny("engram_moe", vocab_size=VOCAB, engram=engram)


def one_device():
  """A one-device mesh, for the `Trainer` tests whose subject is not the mesh: one device
  compiles and checkpoints faster than the default mesh over all 8 virtual devices, and the
  tests here compile the same programs (a persistent-cache hit after the first). Bit-exact
  resume on the default mesh: test_train_sparse_tables'
  test_trainer_resume_is_bit_exact_and_keeps_its_table_optimizer."""
  return sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])


TRAIN = TrainConfig(total_steps=6, warmup_steps=1, eval_every=0, checkpoint_every=3, log_every=1, progress_bar=False)


def test_parameter_groups_and_engram_learning_rate():
  cfg = tiny_model()
  _, params, _ = split_model(build_model(cfg, 0))
  labels = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(parameter_labels(params))[0]}
  table = [k for k in labels if "engram" in k and "table" in k]
  assert table and all(labels[k] == "engram_table" for k in table)
  assert all(v == "no_decay" for k, v in labels.items() if "norm" in k or "bias'" in k)
  assert labels[[k for k in labels if "value_kernel" in k][0]] == "decay"
  # One Adam step moves every coordinate by ~lr (sign of the gradient): tables by 5x lr.
  tc = TrainConfig(
    total_steps=10, warmup_steps=0, schedule="constant", learning_rate=1e-2, weight_decay=0.0, grad_clip_norm=0.0
  )
  tx, _ = make_optimizer(tc, params)
  grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
  np.testing.assert_allclose(np.abs(np.asarray(flat[table[0]])).max(), 5e-2, rtol=1e-4)
  value = [k for k in flat if "value_kernel" in k][0]
  np.testing.assert_allclose(np.abs(np.asarray(flat[value])).max(), 1e-2, rtol=1e-4)


def test_weight_decay_skips_tables_norms_and_biases():
  cfg = tiny_model()
  _, params, _ = split_model(build_model(cfg, 0))
  tc = TrainConfig(
    total_steps=10, warmup_steps=0, schedule="constant", learning_rate=1e-2, weight_decay=0.5, grad_clip_norm=0.0
  )
  tx, _ = make_optimizer(tc, params)
  params = jax.tree.map(jnp.ones_like, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)  # zero gradient: only decay moves
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    key = jax.tree_util.keystr(path)
    moved = bool(np.abs(np.asarray(u)).max() > 0)
    decays = not ("table" in key or "norm" in key or "bias'" in key or u.ndim <= 1)
    assert moved == decays, key


def test_schedules():
  cos = learning_rate_schedule(TrainConfig(total_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1))
  assert float(cos(0)) == 0.0 and math.isclose(float(cos(10)), 1.0, rel_tol=1e-6)
  assert math.isclose(float(cos(100)), 0.1, rel_tol=1e-4)
  step = learning_rate_schedule(
    TrainConfig(
      total_steps=100,
      warmup_steps=10,
      learning_rate=1.0,
      schedule="step",
      step_decay_boundaries=(0.5,),
      step_decay_factor=0.1,
    )
  )
  assert math.isclose(float(step(40)), 1.0) and math.isclose(float(step(60)), 0.1, rel_tol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    TrainConfig(schedule="linear")


def test_resume_is_bit_exact(data_config, tmp_path):
  straight = Trainer(tiny_model(), TRAIN, data_config, tmp_path / "straight", mesh=one_device()).run()
  assert straight.status == "completed" and sorted(straight.losses) == list(range(1, 7))
  first = Trainer(tiny_model(), TRAIN, data_config, tmp_path / "resumed", mesh=one_device()).run(stop_after=3)
  assert first.step == 3
  # a fresh Trainer (as after a killed process) resumes from the step-3 checkpoint
  second = Trainer(tiny_model(), TRAIN, data_config, tmp_path / "resumed", mesh=one_device()).run()
  assert sorted(second.losses) == [4, 5, 6]
  for step in (4, 5, 6):
    assert second.losses[step] == straight.losses[step], step  # to the last bit


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(data_config, tmp_path, monkeypatch):
  real = trainer_lib.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def wrapped(state, batch, *rows):
      new_state, metrics, row_grads = step_fn(state, batch, *rows)
      bad = jnp.where(state.step == 4, jnp.nan, 0.0)
      return new_state, {**metrics, "loss": metrics["loss"] + bad}, row_grads

    return wrapped

  monkeypatch.setattr(trainer_lib, "make_train_step", poisoned)
  trainer = Trainer(tiny_model(), TRAIN, data_config, tmp_path / "nan", mesh=one_device())
  with pytest.raises(TrainingDivergedError, match=r"nan at step 5.*checkpoint \(step 3\)"):
    trainer.run()
  assert trainer.checkpointer.all_steps() == [3]
  monkeypatch.setattr(trainer_lib, "make_train_step", real)
  resumed = Trainer(tiny_model(), TRAIN, data_config, tmp_path / "nan", mesh=one_device()).run()
  assert sorted(resumed.losses) == [4, 5, 6] and all(math.isfinite(v) for v in resumed.losses.values())


def test_checkpoint_refuses_other_hash_constants_or_shapes(data_config, tmp_path):
  Trainer(tiny_model(), TRAIN, data_config, tmp_path / "run", mesh=one_device()).run(stop_after=3)
  with pytest.raises(CheckpointMismatchError, match="hash constants.*multipliers"):
    Trainer(tiny_model(seed=7), TRAIN, data_config, tmp_path / "run", mesh=one_device()).run()
  wider = tiny_model().replace(hidden_size=48)
  with pytest.raises(CheckpointMismatchError, match="model config: hidden_size: checkpoint has 32, current run has 48"):
    Trainer(wider, TRAIN, data_config, tmp_path / "run", mesh=one_device()).run()
  other_tok = data_config.replace(
    bpe_vocab_size=VOCAB, tokenizer_train_bytes=150_000, tokenizer_dir=str(tmp_path / "othertok")
  )
  with pytest.raises(CheckpointMismatchError, match="tokenizer differs"):
    Trainer(tiny_model(), TRAIN, other_tok, tmp_path / "run", mesh=one_device()).run()
  # nothing was lost: the original still resumes
  assert Trainer(tiny_model(), TRAIN, data_config, tmp_path / "run", mesh=one_device()).checkpointer.all_steps() == [3]


def test_vocab_mismatch_is_reported(data_config, tmp_path):
  with pytest.raises(ValueError, match="vocab_size=1000 but the tokenizer has 512"):
    Trainer(tiny_model().replace(vocab_size=1000), TRAIN, data_config, tmp_path / "v")


def test_checkpointer_reports_parameter_shape_differences(tmp_path):
  from engram_jax.train import Checkpointer

  ck = Checkpointer(tmp_path / "ckpt")
  meta = {"model": {"hidden_size": 3}, "hash_constants": None, "tokenizer_fingerprint": "abc"}
  ck.save(1, {"w": jnp.zeros((2, 3)), "b": jnp.ones((3,))}, meta=meta, vocab={"tokenizer_json": "{}"})
  wanted = {"w": jax.ShapeDtypeStruct((2, 4), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(CheckpointMismatchError, match=r"parameter w: checkpoint shape \(2, 3\), model shape \(2, 4\)"):
    ck.restore(wanted, current_meta=meta)
  restored, _ = ck.restore(
    {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}, current_meta=meta
  )
  np.testing.assert_array_equal(np.asarray(restored["b"]), np.ones(3))
