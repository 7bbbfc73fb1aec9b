"""The placement matrix (issue 13): every supported row-store placement x {train, evaluate,
decode} against the device-table reference, on one tiny MoE + Engram model with two Engram
layers, and a clear error for each unsupported combination.

The one train step (`steps.make_train_step`) runs for every placement; row-sparse Adam on
host / cached stores equals row-sparse Adam on device tables at every step (and dense Adam
where every row is touched: tests/test_offload_training.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import NgramHasher, TokenizerCompressor
from engram_jax import sharding as sharding_lib
from engram_jax.inference import Decoder
from engram_jax.models import engram_table_value
from engram_jax.models.config import ModelConfig
from engram_jax.models.offloaded import split_tables
from engram_jax.offload import HostTable, TablePlacement, count_row_frequencies
from engram_jax.offload.row_store import HostRowStore
from engram_jax.train import evaluation
from engram_jax.train.config import TrainConfig
from engram_jax.train.host_trainer import HostTableTrainer
from engram_jax.train.optimizer import make_table_optimizer
from engram_jax.train.state import TrainState, build_model, create_train_state, split_model
from engram_jax.train.steps import make_train_step

B, T, STEPS, KNOWN_IDS = 2, 16, 2, 100
_BASE = ModelConfig.tiny("engram_moe")
BASE = _BASE.replace(engram=dataclasses.replace(_BASE.engram, layer_ids=(1, 2)))
RATE = BASE.moe.bias_update_rate
TRAIN = TrainConfig(
  total_steps=10,
  learning_rate=1e-2,
  warmup_steps=0,
  grad_clip_norm=0.5,
  progress_bar=False,
  table_optimizer="sparse_adam",
)
# One model variant whose flat row ids need every part of `RowIndex` (fold, offsets,
# padding rows); placements as `parse_placements` specs.
OVERRIDES = (("engram_fold_rows", 5), ("engram_row_multiple", 64))
CASES = {"host": "host", "cached_beside_device": "1:cached@0.5"}


@functools.cache
def setup(overrides: tuple):
  """(config, model, hasher, compressor, batches) of a model variant; ids hashed from tokens."""
  config = BASE.replace(**dict(overrides))
  compressor = TokenizerCompressor(np.arange(KNOWN_IDS) % 97)
  hasher = NgramHasher(config.engram, compressor.num_compressed)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    tokens = rng.integers(0, KNOWN_IDS, (B, T + 1)).astype(np.int32)
    ids = {l: r.astype(np.int32) for l, r in hasher.hash(compressor(tokens[:, :-1])).items()}
    batches.append(
      {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "engram_ids": ids, "loss_mask": np.ones((B, T), np.float32)}
    )
  return config, build_model(config, 0), hasher, compressor, batches


@functools.cache
def device_run(table_optimizer: str = "sparse_adam"):
  """Device-table training on one device (the reference): (graphdef, state, per-step
  metrics, the reference decoder)."""
  _, model, hasher, compressor, batches = setup(OVERRIDES)
  graphdef, params, rest = split_model(nnx.clone(model))
  tx, lr = make_table_optimizer(TRAIN.replace(table_optimizer=table_optimizer), params)
  step = jax.jit(make_train_step(graphdef, tx, lr, bias_update_rate=RATE))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
  history = []
  for batch in batches:
    state, metrics, row_grads = step(state, batch)
    assert row_grads == {}  # every row lives in the model: nothing for a store to apply
    history.append(jax.device_get(metrics))
  decoder = Decoder(nnx.merge(graphdef, state.params, state.rest), hasher, compressor)
  return graphdef, state, history, decoder


def _decode_logits(decoder: Decoder, tokens: np.ndarray, prompt: int = 5) -> np.ndarray:
  """Prefill logits of the first `prompt` tokens, then one decode step per later token."""
  b = tokens.shape[0]
  logits, state = decoder.prefill(tokens[:, :prompt], np.full(b, prompt, np.int32), max_len=tokens.shape[1])
  out = [np.asarray(logits)]
  for t in range(prompt, tokens.shape[1]):
    step_logits, state = decoder.step(tokens[:, t], state)
    out.append(np.asarray(step_logits)[:, None])
  return np.concatenate(out, axis=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_placement_trains_evaluates_and_decodes_like_device_tables(case):
  spec = CASES[case]
  config, model, hasher, compressor, batches = setup(OVERRIDES)
  indexes = {l: model.blocks[l].engram.row_index for l in config.engram_layer_ids}
  freqs = {
    l: count_row_frequencies([i.flat_np(b["engram_ids"][l]) for b in batches], i.num_rows) for l, i in indexes.items()
  }
  trainer = HostTableTrainer(nnx.clone(model), spec, TRAIN, frequencies=freqs, bias_update_rate=RATE)
  host_layers = trainer.offloaded.host_layers
  assert host_layers and set(trainer.offloaded.stores) == set(config.engram_layer_ids)

  # train: the host step logs what the device step logs (MoE metrics included)
  got = trainer.train(batches)
  graphdef, want_state, want, reference = device_run()
  assert set(got[0]) == set(want[0]) and {"moe_max_load", "moe_dropped", "engram_gate_mean"} <= set(got[0])
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=1e-6, err_msg=k)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    jax.device_get(trainer.full_params()),
    jax.device_get(want_state.params),
  )

  # evaluate: the one row eval step, rows gathered from the stores
  batch = batches[0]
  host_eval = jax.jit(evaluation.make_row_eval_step(trainer.graphdef))
  device_eval = jax.jit(evaluation.make_row_eval_step(graphdef))
  got_rows = jax.device_get(host_eval(trainer.state, batch, trainer.gather(batch["engram_ids"])))
  want_rows = jax.device_get(device_eval(want_state, batch))
  for k in want_rows:
    np.testing.assert_allclose(got_rows[k], want_rows[k], rtol=1e-5, err_msg=k)

  # decode: the trained stores serve the decoder (host / cached rows read in the loop)
  host_model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.rest)
  decoder = Decoder(host_model, hasher, compressor, stores=trainer.offloaded.stores)
  assert decoder.decode_path == ("cached_in_loop" if "cached" in spec else "host_in_loop")
  tokens = batch["tokens"][:, :7]
  np.testing.assert_allclose(_decode_logits(decoder, tokens), _decode_logits(reference, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (virtual) devices")
@pytest.mark.parametrize("table_optimizer", ["dense_adam", "catchup_adam"])
def test_row_sharded_device_store_trains_evaluates_and_decodes_like_one_device(table_optimizer):
  """A device store whose table is split by rows over the tensor axis (the all_to_all route,
  `distributed.sharded_gather`): the same step, eval and decode as one device, with dense
  Adam and with the row-sparse catch-up Adam (its m, v and row records split like the table)."""
  config, _, hasher, compressor, batches = setup(OVERRIDES)
  graphdef, want_state, want, reference = device_run(table_optimizer)
  mesh = sharding_lib.make_mesh(data=1, tensor=2)
  cfg = TRAIN.replace(table_optimizer=table_optimizer)
  _, state, state_sh, (tx, lr) = create_train_state(config, lambda p: make_table_optimizer(cfg, p), 0, mesh)
  step = jax.jit(
    make_train_step(graphdef, tx, lr, bias_update_rate=RATE),
    in_shardings=(state_sh, None),
    out_shardings=(state_sh, None, None),
  )
  with jax.set_mesh(mesh):
    assert sharding_lib.num_shards(engram_table_value(state.params, 1).get_value()) == 2
    if table_optimizer == "catchup_adam":  # its per-row Adam state is split like the table
      catchup = state.opt_state[1][0]
      assert all(sharding_lib.num_shards(x) == 2 for x in (catchup.m, catchup.v, catchup.last))
    for batch, w in zip(batches, want):
      state, metrics, _ = step(state, batch)
      np.testing.assert_allclose(float(metrics["loss"]), w["loss"], rtol=1e-5)
    got_rows = jax.device_get(jax.jit(evaluation.make_row_eval_step(graphdef))(state, batches[0]))
    decoder = Decoder(nnx.merge(graphdef, state.params, state.rest), hasher, compressor)
    tokens = batches[0]["tokens"][:, :7]
    # two Adam steps with float32 reductions split over the tensor axis: ~1e-4 on O(1) logits
    got_logits = _decode_logits(decoder, tokens)
  np.testing.assert_allclose(got_logits, _decode_logits(reference, tokens), rtol=1e-3, atol=1e-3)
  want_rows = jax.device_get(jax.jit(evaluation.make_row_eval_step(graphdef))(want_state, batches[0]))
  for k in want_rows:
    np.testing.assert_allclose(got_rows[k], want_rows[k], rtol=1e-5, err_msg=k)


def test_unsupported_combinations_are_refused():
  _, model, _, _, batches = setup(OVERRIDES)
  with pytest.raises(ValueError, match=r"training needs host_gather='numpy' tables; Engram layer 1 uses 'compute_on'"):
    HostTableTrainer(nnx.clone(model), {1: TablePlacement("host", host_gather="compute_on")}, TRAIN)
  index = model.blocks[1].engram.row_index
  with pytest.raises(ValueError, match=r"host table of Engram layer 1 has 7 rows, its row index \d+"):
    HostRowStore(1, HostTable(np.zeros((7, BASE.engram.head_dim), np.float32)), index)
  graphdef, params, rest = split_model(nnx.clone(model))
  tx, lr = make_table_optimizer(TRAIN.replace(table_optimizer="dense_adam"), params)
  with pytest.raises(ValueError, match="store_rows needs grad_clip_norm"):
    make_train_step(graphdef, tx, lr, store_rows={1: index})
  step = make_train_step(graphdef, tx, lr, store_rows={1: index}, grad_clip_norm=1.0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=None)
  with pytest.raises(ValueError, match=r"engram_rows lacks the row-store Engram layers \[1\]"):
    step(state, batches[0])
  with pytest.raises(ValueError, match=r"row id 999 at position \(0, 0, 0\) is outside head 0's table"):
    split_tables(nnx.clone(model), "host")[1].gather({l: np.full((1, 1, 4), 999) for l in (1, 2)})
