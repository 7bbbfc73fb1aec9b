"""The training loop: data, sharded state, steps, evaluation, checkpoints, signals.

    trainer = Trainer(model_config, train_config, data_config, workdir="runs/x")
    result = trainer.run()          # resumes from workdir/checkpoints when present

SIGTERM / SIGINT save a checkpoint and return with status "preempted"; a non-finite loss
raises `TrainingDivergedError` naming the step and leaves the last good checkpoint alone.

Multi-process (after `jax.distributed.initialize`): every process runs this same loop on the
global mesh and feeds its rows of the global batch (`engram_jax.train.multihost`); process 0
trains / writes the cached tokenizer first and alone writes metrics and meta.json; checkpoints
are saved collectively by orbax; a signal on any process stops all of them at the same step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tokenizers import Tokenizer

from engram_jax import sharding as sharding_lib
from engram_jax.data import (
  DataConfig,
  EngramRowHasher,
  batch_spec,
  load_or_train_tokenizer,
  make_eval_batches,
  make_train_iterator,
  special_ids,
)
from engram_jax.hashing import TokenizerCompressor, tokenizer_fingerprint
from engram_jax.models.accounting import count_params, flops_per_token
from engram_jax.models.config import ModelConfig
from engram_jax.train import multihost
from engram_jax.train.checkpoint import Checkpointer, vocab_item
from engram_jax.train.config import TrainConfig
from engram_jax.train.loss import summarize_eval
from engram_jax.train.metrics import MetricsWriter
from engram_jax.train.optimizer import make_optimizer
from engram_jax.train.state import abstract_like, create_train_state
from engram_jax.train.steps import batch_shardings, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
  status: str                       # "completed" or "preempted"
  step: int                         # steps done in total (including before a resume)
  losses: dict[int, float]          # step -> train loss, for the steps run in this call
  eval: dict[str, float] | None     # last validation metrics
  tokens_per_second: float          # training throughput after compilation
  workdir: Path


def resolve_model_config(config: ModelConfig, tokenizer: Any, compressor: TokenizerCompressor
                         ) -> ModelConfig:
  """Checks the model against the tokenizer and fills in the compressed vocabulary size."""
  vocab = tokenizer.get_vocab_size(with_added_tokens=True)
  if config.vocab_size != vocab:
    raise ValueError(f"ModelConfig.vocab_size={config.vocab_size} but the tokenizer has {vocab} ids; "
                     f"set the model's vocab_size to {vocab}")
  if config.engram is not None:
    pad = special_ids(tokenizer).pad
    if config.engram.pad_id != pad:
      raise ValueError(f"EngramConfig.pad_id={config.engram.pad_id} is not the tokenizer's pad id {pad}")
    if config.engram_compressed_vocab not in (None, compressor.num_compressed):
      raise ValueError(f"ModelConfig.engram_compressed_vocab={config.engram_compressed_vocab} but the "
                       f"tokenizer compresses to {compressor.num_compressed} ids")
    config = config.replace(engram_compressed_vocab=compressor.num_compressed)
  return config


class _NoMetrics:
  """The metrics sink of non-primary processes (process 0 writes metrics.jsonl)."""

  def write(self, *args, **kwargs) -> None:
    pass

  def close(self) -> None:
    pass


class Trainer:
  """Trains one model on one data configuration in `workdir`."""

  def __init__(self, model_config: ModelConfig, train_config: TrainConfig, data_config: DataConfig,
               workdir: str | Path, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
               tokenizer: Tokenizer | None = None, compress_tokens: bool = True,
               data_shards: int | None = None):
    """`data_shards`: document streams the global batch is drawn from (default: one per data
    group of processes); fix it to reproduce a multi-process run's batches on fewer processes
    (see `engram_jax.train.multihost`)."""
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.train_config, self.data_config, self.seed = train_config, data_config, seed
    self.tokenizer = tokenizer or self._load_tokenizer()
    vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
    # compress_tokens=False is the "no tokenizer compression" ablation: identity table.
    self.compressor = (TokenizerCompressor.from_tokenizer(self.tokenizer) if compress_tokens
                       else TokenizerCompressor.identity(vocab))
    self.model_config = resolve_model_config(model_config, self.tokenizer, self.compressor)
    self.row_hasher = EngramRowHasher.build(self.model_config.engram, self.tokenizer,
                                            special_ids(self.tokenizer).pad, self.compressor)
    self.mesh = mesh or sharding_lib.make_mesh(data=jax.device_count())
    self.layout = multihost.data_layout(self.mesh, data_config.batch_size, data_shards)
    self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=train_config.keep_checkpoints,
                                     best_by=train_config.keep_best_by)
    self._stop_signal: int | None = None

  def _load_tokenizer(self) -> Tokenizer:
    cache_dir = self.data_config.tokenizer_dir or self.workdir
    # Process 0 trains (or loads) the cached tokenizer first, so that processes sharing a
    # filesystem do not race writing it; then all must hold the same one.
    if jax.process_index() == 0:
      tokenizer = load_or_train_tokenizer(self.data_config, cache_dir=cache_dir)
    multihost.barrier("engram_jax.tokenizer")
    if jax.process_index() != 0:
      tokenizer = load_or_train_tokenizer(self.data_config, cache_dir=cache_dir)
    multihost.assert_same_on_all_processes(tokenizer_fingerprint(tokenizer), "the tokenizer")
    return tokenizer

  def _train_iterator(self):
    """This process's training batches: its document shards, concatenated along rows."""
    lay = self.layout
    config = self.data_config.replace(batch_size=lay.rows_per_shard)
    iterators = [make_train_iterator(config, self.tokenizer, row_hasher=self.row_hasher,
                                     shard=(i, lay.num_shards)) for i in lay.shards]
    return iterators[0] if len(iterators) == 1 else multihost.ConcatBatchIterator(iterators)

  # -- metadata ----------------------------------------------------------------------------
  def meta(self) -> dict[str, Any]:
    hasher = self.row_hasher.hasher
    counts = count_params(self.model_config)
    return {
        "model": self.model_config.to_dict(),
        "train": self.train_config.to_dict(),
        "data": self.data_config.to_dict(),
        "seed": self.seed,
        "hash_constants": None if hasher is None else hasher.constants(),
        "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
        "compressed": self.compressor.fingerprint is not None,
        "params": {"total": counts.total, "active": counts.active, "sparse": counts.sparse},
        "flops_per_token": flops_per_token(self.model_config, self.data_config.seq_len),
    }

  # -- signals -----------------------------------------------------------------------------
  def _install_signal_handlers(self):
    if threading.current_thread() is not threading.main_thread():
      return {}
    def handler(signum, frame):
      del frame
      self._stop_signal = signum
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

  # -- the loop ------------------------------------------------------------------------------
  def run(self, *, stop_after: int | None = None) -> RunResult:
    """Trains to `train_config.total_steps` (or `stop_after` more steps), resuming if possible."""
    cfg = self.train_config
    meta = self.meta()
    if self.checkpointer.latest_step() is not None:
      self.checkpointer.check_meta(meta)  # fail fast, before any compilation
    graphdef, state, state_sh, (tx, lr) = create_train_state(
        self.model_config, lambda p: make_optimizer(cfg, p), self.seed, self.mesh)
    # each data group of processes reads its own document shards; batch_size is per process
    data_iter = self._train_iterator()
    start = 0
    if self.checkpointer.latest_step() is not None:
      abstract = abstract_like(state)
      del state
      state, _ = self.checkpointer.restore(abstract, current_meta=meta, data_iterator=data_iter)
      start = int(state.step)
      log.info("resumed from step %d", start)
    if jax.process_index() == 0:
      (self.workdir / "meta.json").write_text(json.dumps(meta, indent=1))

    global_batch = self.layout.global_batch
    spec = batch_spec(self.data_config.replace(batch_size=global_batch), self.model_config.engram)
    example = jax.tree.map(lambda s: np.zeros(s[0], s[1]), spec, is_leaf=lambda x: isinstance(x, tuple))
    b_shard = batch_shardings(example, self.mesh)
    rate = cfg.moe_bias_update_rate
    if rate is None and self.model_config.moe is not None:
      rate = self.model_config.moe.bias_update_rate
    train_step = jax.jit(make_train_step(graphdef, tx, lr, bias_update_rate=rate or 0.0),
                         in_shardings=(state_sh, b_shard), out_shardings=(state_sh, None),
                         donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(graphdef))
    # Every process builds the same validation batches (rows default to the global batch).
    eval_data = self.data_config.replace(
        eval_batch_size=self.data_config.eval_batch_size or global_batch)
    eval_batches = make_eval_batches(eval_data, self.tokenizer, row_hasher=self.row_hasher) \
        if cfg.eval_every else []

    writer = MetricsWriter(self.workdir) if jax.process_index() == 0 else _NoMetrics()
    previous_handlers = self._install_signal_handlers()
    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, start + stop_after)
    tokens_per_step = global_batch * self.data_config.seq_len
    bar = None
    if cfg.progress_bar and jax.process_index() == 0:
      from tqdm.auto import tqdm
      bar = tqdm(total=cfg.total_steps, initial=start, unit="step", dynamic_ncols=True,
                 desc=self.workdir.name)
    losses: dict[int, float] = {}
    last_eval, status = None, "completed"
    timed_tokens, timed_seconds = 0, 0.0
    step = start
    try:
      with jax.set_mesh(self.mesh):
        while step < end:
          t0 = time.perf_counter()  # wall time per step, input pipeline included
          batch = multihost.put_process_batch(next(data_iter), b_shard, global_batch)
          state, metrics = train_step(state, batch)
          loss = float(metrics["loss"])  # syncs; also what the NaN check needs
          dt = time.perf_counter() - t0
          step += 1
          if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"training loss became {loss} at step {step}; stopping. The last good checkpoint "
                f"(step {self.checkpointer.latest_step()}) under {self.checkpointer.directory} is intact")
          losses[step] = loss
          if step > start + 1:  # the first step includes compilation
            timed_tokens += tokens_per_step
            timed_seconds += dt
          tps = timed_tokens / timed_seconds if timed_seconds else float("nan")
          if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
          if cfg.log_every and (step % cfg.log_every == 0 or step == end):
            writer.write(step, {**{k: float(v) for k, v in metrics.items()}, "tokens_per_second": tps})
          at_end = step == cfg.total_steps
          if eval_batches and (step % cfg.eval_every == 0 or at_end):
            last_eval = self.evaluate(eval_step, state, eval_batches, self.mesh)
            writer.write(step, last_eval, split="val")
          if multihost.any_process(self._stop_signal is not None):
            status = "preempted"
            log.warning("signal %s: checkpointing at step %d and exiting",
                        self._stop_signal or "on another process", step)
            self._save(step, state, meta, data_iter, last_eval)
            break
          if at_end or step == end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            self._save(step, state, meta, data_iter, last_eval)
    finally:
      for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
      if bar is not None:
        bar.close()
      writer.close()
      if hasattr(data_iter, "close"):
        data_iter.close()
    self.state = state
    tps = timed_tokens / timed_seconds if timed_seconds else float("nan")
    return RunResult(status, step, losses, last_eval, tps, self.workdir)

  def _save(self, step, state, meta, data_iter, last_eval):
    metrics = None
    if self.train_config.keep_best_by:
      metrics = {"val_loss": float("inf") if last_eval is None else last_eval["val_loss"]}
    self.checkpointer.save(step, state, meta=meta, vocab=vocab_item(self.tokenizer, self.compressor),
                           data_iterator=data_iter, metrics=metrics)

  @staticmethod
  def evaluate(eval_step, state, eval_batches, mesh) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over the fixed validation batches.

    Every process holds the same full validation batches; each device evaluates its rows.
    """
    totals: dict[str, float] = {}
    for batch in eval_batches:
      sums = eval_step(state, multihost.put_replicated_batch(batch, batch_shardings(batch, mesh)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return summarize_eval(totals)
