"""Training with host-placed Engram tables (sparse table grads + SparseRowAdam on the host)
equals device-placement training with dense Adam when every row is touched at every step;
untouched rows and their m, v stay unchanged otherwise (where dense Adam lets them drift)."""

import jax
import numpy as np
import pytest

from engram_jax.train.config import TrainConfig
from engram_jax.train.host_trainer import HostTableTrainer
from engram_jax.train.optimizer import make_optimizer
from engram_jax.train.state import TrainState, split_model
from engram_jax.train.steps import make_train_step
from tests.test_offload_model import CONFIG, fresh_model

B, T = 2, 48  # B*T = 96 positions >= every head's rows: a batch can touch every row
LAYERS = CONFIG.engram_layer_ids
TRAIN = TrainConfig(
  total_steps=10, learning_rate=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip_norm=0.5, progress_bar=False
)
RATE = CONFIG.moe.bias_update_rate


def _sizes(layer):
  return fresh_model().blocks[layer].engram.table_sizes


def _batch(seed, fraction=1.0):
  """Head h's ids: a random permutation of its first ceil(fraction * size) rows, tiled."""
  rng = np.random.default_rng(seed)
  ids = {}
  for l in LAYERS:
    heads = []
    for s in _sizes(l):
      n = int(np.ceil(fraction * s))
      assert n <= B * T
      heads.append(np.resize(rng.permutation(n), B * T).reshape(B, T))
    ids[l] = np.stack(heads, -1).astype(np.int32)
  tokens = rng.integers(0, CONFIG.vocab_size, (B, T + 1)).astype(np.int32)
  return {
    "tokens": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "engram_ids": ids,
    "loss_mask": np.ones((B, T), np.float32),
  }


def _device_run(batches):
  """The normal device-placement training: dense Adam on the tables (make_optimizer).
  Returns the state after every step (copied: the jitted step does not donate here)."""
  graphdef, params, rest = split_model(fresh_model())
  tx, lr = make_optimizer(TRAIN, params)
  step = jax.jit(make_train_step(graphdef, tx, lr, bias_update_rate=RATE))
  state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, rest=rest, opt_state=tx.init(params))
  states, losses = [], []
  for batch in batches:
    state, metrics, _ = step(state, batch)
    states.append(state)
    losses.append(float(metrics["loss"]))
  return states, losses


def _snapshot(trainer):
  return {
    "params": trainer.full_params(),
    "rest": jax.device_get(trainer.state.rest),
    "host": {l: {k: np.copy(v) for k, v in d.items()} for l, d in trainer.host_state().items()},
  }


# Steps 1-3 touch every row of every head; step 4 each head's first 3/4 rows, steps 5-6
# its first half: rows in [1/2, 3/4) are last touched at step 4, rows in [3/4, 1) at step 3.
SCHEDULE = [1.0, 1.0, 1.0, 0.75, 0.5, 0.5]


@pytest.fixture(scope="module")
def runs():
  batches = [_batch(seed, frac) for seed, frac in enumerate(SCHEDULE)]
  want, want_losses = _device_run(batches)
  trainer = HostTableTrainer(
    fresh_model(),
    "1:host,2:cached@0.2",
    TRAIN,
    bias_update_rate=RATE,
    frequencies={2: np.arange(fresh_model().blocks[2].engram.num_rows)},
  )
  snaps, history = [], []
  # the first 3 steps through the prefetcher (rows of t+1 gathered during t, then patched)
  for metrics in trainer.iterate(iter(batches[:3])):
    history.append(jax.device_get(metrics))
    snaps.append(_snapshot(trainer))
  for batch in batches[3:]:
    metrics, _ = trainer.step(batch)
    history.append(jax.device_get(metrics))
    snaps.append(_snapshot(trainer))
  return want, want_losses, trainer, snaps, history


def _table(params, layer):
  return np.asarray(params["blocks"][layer]["engram"]["table"].get_value())


def _assert_trees_close(got, want, **tol):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol), got, want)


def _router_biases(rest):
  return {l: b["ffn"] for l, b in rest.to_pure_dict()["blocks"].items() if "ffn" in b}


TOL = {"rtol": 2e-5, "atol": 2e-6}


def test_host_placement_equals_dense_adam_when_every_row_is_touched(runs):
  want, want_losses, trainer, snaps, history = runs
  np.testing.assert_allclose([h["loss"] for h in history], want_losses, rtol=1e-5)
  for h in history[:3]:
    for l in LAYERS:
      assert int(h[f"engram_rows_touched_{l}"]) == trainer.offloaded.stores[l].index.num_rows
  got = snaps[2]["params"]  # after 3 steps: all parameters, tables included
  assert jax.tree.structure(got) == jax.tree.structure(want[2].params)
  _assert_trees_close(got, want[2].params, **TOL)
  _assert_trees_close(_router_biases(snaps[2]["rest"]), _router_biases(want[2].rest), **TOL)
  initial = split_model(fresh_model())[1]
  for l in LAYERS:  # the tables really trained
    assert not np.allclose(_table(got, l), _table(initial, l))
  cache = trainer.offloaded.stores[2].cache  # the device cache follows the host table
  np.testing.assert_array_equal(np.asarray(cache.rows), trainer.offloaded.tables[2].numpy()[cache.hot_rows])


def _ranges(layer, lo, hi):
  engram = fresh_model().blocks[layer].engram
  return np.concatenate(
    [o + np.arange(int(np.ceil(lo * s)), int(np.ceil(hi * s))) for o, s in zip(engram.offsets, engram.table_sizes)]
  )


def test_untouched_rows_and_their_adam_state_stay_unchanged(runs):
  want, _, _, snaps, _ = runs
  final = snaps[-1]
  for l in LAYERS:
    read = _ranges(l, 0.0, 0.5)  # touched at every step
    after4 = _ranges(l, 0.5, 0.75)  # last touched at step 4
    after3 = _ranges(l, 0.75, 1.0)  # last touched at step 3
    host, dense = final["host"][l], _table(want[-1].params, l)
    # rows read at steps 5-6 (and the backbone, below) still follow dense Adam
    np.testing.assert_allclose(host["table"][read], dense[read], **TOL)
    np.testing.assert_array_equal(host["count"][read], 6)
    for rows, last in ((after4, snaps[3]), (after3, snaps[2])):
      then = last["host"][l]
      for key in ("table", "m", "v", "count"):  # exactly as after their last touch
        np.testing.assert_array_equal(host[key][rows], then[key][rows])
      assert then["m"][rows].any()
      # ... where dense Adam kept moving them with its decaying momentum (the documented
      # difference of sparse Adam)
      assert np.abs(dense[rows] - then["table"][rows]).max() > 1e-4
  got, ref = final["params"].to_pure_dict(), want[-1].params.to_pure_dict()
  for l in LAYERS:
    del got["blocks"][l]["engram"]["table"], ref["blocks"][l]["engram"]["table"]
  _assert_trees_close(got, ref, **TOL)


def test_reuse_step_of_checks_the_configuration(runs):
  trainer = runs[2]
  with pytest.raises(ValueError, match="reuse_step_of"):
    HostTableTrainer(
      fresh_model(), "host", TRAIN.replace(learning_rate=1e-3), bias_update_rate=RATE, reuse_step_of=trainer
    )
  with pytest.raises(ValueError, match="at least one 'host' or 'cached'"):
    HostTableTrainer(fresh_model(), "device", TRAIN)


def test_host_state_round_trip(runs):
  trainer, snaps = runs[2], runs[3]
  saved = trainer.host_state()
  trainer.load_host_state(snaps[2]["host"])  # back to step 3
  for l in LAYERS:
    for key, value in snaps[2]["host"][l].items():
      np.testing.assert_array_equal(trainer.host_state()[l][key], value)
  cache = trainer.offloaded.stores[2].cache
  np.testing.assert_array_equal(np.asarray(cache.rows), snaps[2]["host"][2]["table"][cache.hot_rows])
  trainer.load_host_state(saved)
  with pytest.raises(ValueError, match="host state for layers"):
    trainer.load_host_state({1: saved[1]})
