"""Loading a trained run back: model, tokenizer, compression table and hasher."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from engram_jax import sharding as sharding_lib
from engram_jax.data import DataConfig, EngramRowHasher, make_eval_batches, special_ids
from engram_jax.hashing import NgramHasher, TokenizerCompressor, tokenizer_fingerprint
from engram_jax.models.config import ModelConfig
from engram_jax.models.transformer import Transformer
from engram_jax.train.checkpoint import Checkpointer, CheckpointMismatchError
from engram_jax.train.config import TrainConfig
from engram_jax.train.optimizer import make_optimizer
from engram_jax.train.state import abstract_like, create_train_state
from engram_jax.train.steps import make_eval_step


@dataclasses.dataclass
class LoadedRun:
  """A trained model with everything needed to feed it."""

  model: Transformer
  model_config: ModelConfig
  data_config: DataConfig
  tokenizer: Tokenizer
  compressor: TokenizerCompressor
  hasher: NgramHasher | None
  meta: dict[str, Any]
  step: int

  @property
  def row_hasher(self) -> EngramRowHasher:
    return EngramRowHasher(self.hasher, self.compressor if self.hasher is not None else None)


def _checkpoint_dir(path: str | Path) -> Path:
  path = Path(path)
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_run(path: str | Path, *, step: int | None = None, mesh=None) -> LoadedRun:
  """Loads a run directory (or its checkpoints/ folder); checks the stored constants."""
  ckpt = Checkpointer(_checkpoint_dir(path))
  meta, vocab = ckpt.read_meta(step)
  tokenizer = Tokenizer.from_str(vocab["tokenizer_json"])
  if tokenizer_fingerprint(tokenizer) != meta["tokenizer_fingerprint"]:
    raise CheckpointMismatchError("stored tokenizer does not match its recorded fingerprint")
  compressor = TokenizerCompressor(np.asarray(vocab["compression_table"], np.int64), vocab["num_compressed"],
                                   tokenizer_fingerprint(tokenizer) if meta.get("compressed", True) else None)
  model_config = ModelConfig.from_dict(meta["model"])
  hasher = None
  if meta.get("hash_constants"):
    hasher = NgramHasher.from_constants(meta["hash_constants"])  # re-derives and checks them
  train_config = TrainConfig.from_dict(meta["train"])
  mesh = mesh or sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])
  graphdef, state, shardings, _ = create_train_state(
      model_config, lambda p: make_optimizer(train_config, p), meta.get("seed", 0), mesh)
  state, _ = ckpt.restore(abstract_like(state), current_meta=meta, step=step)
  model = nnx.merge(graphdef, state.params, state.rest)
  loaded_step = int(state.step)
  ckpt.close()
  return LoadedRun(model, model_config, DataConfig.from_dict(meta["data"]), tokenizer, compressor,
                   hasher, meta, loaded_step)


def evaluate_run(run: LoadedRun, data_config: DataConfig | None = None) -> dict[str, float]:
  """Validation loss / perplexity / bits per byte of a loaded run on its validation split."""
  from engram_jax.train.loss import summarize_eval

  data_config = data_config or run.data_config
  batches = make_eval_batches(data_config, run.tokenizer, row_hasher=run.row_hasher)
  graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
  step = jax.jit(make_eval_step(graphdef))
  from engram_jax.train.state import TrainState
  state = TrainState(step=np.int32(run.step), params=params, rest=rest, opt_state=None)
  totals: dict[str, float] = {}
  for batch in batches:
    for k, v in step(state, batch).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return summarize_eval(totals)


__all__ = ["LoadedRun", "evaluate_run", "load_run", "special_ids"]
