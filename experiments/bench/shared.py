"""What the benchmark scripts (and gpu_check) train with: the training settings, synthetic
language-model batches and the jitted device train step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.train.config import TrainConfig
from engram_jax.train.optimizer import make_optimizer
from engram_jax.train.state import TrainState, split_model
from engram_jax.train.steps import make_train_step


def note_cpu() -> bool:
  """Whether jax runs on CPU; if so, prints what the figures of a placement benchmark mean there."""
  cpu = jax.default_backend() == "cpu"
  if cpu:
    print(
      "NOTE: on CPU host and device memory are the same RAM: these figures show that the paths work and their "
      "software overheads (dispatch, copies), NOT PCIe transfer behaviour."
    )
  return cpu


@dataclasses.dataclass(frozen=True)
class GatherCase:
  """A row gather: a table of `rows` x `d` (`dtype`) read at `tokens` x `heads` row ids."""

  rows: int  # table rows R
  d: int  # row width
  dtype: str
  tokens: int  # N
  heads: int  # H


#: The backbone fields a benchmark preset sets, in `backbone`'s order.
BACKBONE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden")


def backbone(*values: int) -> dict:
  """ModelConfig fields of a backbone: the `BACKBONE` values and one leading dense block."""
  return {**dict(zip(BACKBONE, values, strict=True)), "num_dense_layers": 1}


#: The benchmarks' training settings: lr 1e-3 from the first step (no warm-up), no progress bar.
TRAIN = TrainConfig(total_steps=1000, learning_rate=1e-3, warmup_steps=0, progress_bar=False)


def lm_batch(rng: np.random.Generator, vocab_size: int, b: int, t: int, engram_ids: Callable) -> dict:
  """A batch of `b` random token sequences of length `t` (targets: the next tokens), every
  position scored; engram_ids(rng) gives its {layer: row ids}, drawn after the tokens."""
  tokens = rng.integers(0, vocab_size, (b, t + 1)).astype(np.int32)
  return {
    "tokens": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "loss_mask": np.ones((b, t), np.float32),
    "engram_ids": engram_ids(rng),
  }


def device_train_step(model, train: TrainConfig = TRAIN, tx_factory=make_optimizer, bias_update_rate: float = 0.0):
  """(step, state): the jitted train step of `model` with every table on the device (the
  state donated) and its initial state; tx_factory(train, params) -> (optimizer, lr)."""
  graphdef, params, rest = split_model(model)
  tx, lr = tx_factory(train, params)
  step = jax.jit(make_train_step(graphdef, tx, lr, bias_update_rate=bias_update_rate), donate_argnums=(0,))
  return step, TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
