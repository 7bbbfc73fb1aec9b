"""The training loop: data, sharded state, steps, evaluation, checkpoints, signals.

    trainer = Trainer(model_config, train_config, data_config, workdir="runs/x")
    result = trainer.run()          # resumes from workdir/checkpoints when present

SIGTERM / SIGINT save a checkpoint and return with status "preempted"; a non-finite loss
or gradient norm, or a checkpoint candidate that fails its check (non-finite weights or
optimizer state, or a non-finite loss of its weights on the step's batch: nothing unverified
is ever saved), raises `TrainingDivergedError` naming the step and the last good checkpoint,
or with `TrainConfig.on_divergence="rollback"` resumes from that checkpoint at a lower
learning rate. A run holds `workdir/run.lock` (`run_lock.RunLock`); a corrupt newest
checkpoint is reported and set aside, and the run resumes from the newest intact one.

Engram tables in host memory (`TrainConfig.table_placement`, e.g. "host", "cached@0.05",
"1:host", parsed once by `offload.parse_placements`): the same train step runs with row
stores outside it (`_Engine`, `engram_jax.train.host_trainer.HostTableTrainer`: rows of step
t+1 gathered on the host during step t, row-sparse Adam applied by the stores); checkpoints
add the host tables and their Adam state (item "host_tables"); evaluation feeds the
gathered rows.
One process: by default on jax.devices()[0], or data-parallel over a given mesh whose
tensor / expert axes are 1 (batch and rows split over its devices). "cached" layers keep the
rows most frequent in the first `FREQUENCY_BATCHES` training batches on the device.
Several processes, "host" on every layer: `_ShardedHostEngine` (`ShardedHostTableTrainer`)
splits every table by rows over the processes on the data-parallel global mesh (default: all
devices); checkpoints add each process's shards (item "host_shards"), resumed on the same
process count. Other placements with several processes raise NotImplementedError.

Multi-process (after `jax.distributed.initialize`): every process runs this same loop on the
global mesh and feeds its rows of the global batch (`engram_jax.train.multihost`); process 0
trains / writes the cached tokenizer first and alone writes metrics and meta.json; checkpoints
are saved collectively by orbax; a signal on any process stops all of them at the same step.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
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
from engram_jax.models import engram_table_filter
from engram_jax.models.accounting import count_params, flops_per_token
from engram_jax.models.config import ModelConfig
from engram_jax.models.host_init import build_offloaded
from engram_jax.offload import (
  TablePlacement,
  count_row_frequencies,
  format_placements,
  layer_placements,
  parse_placements,
)
from engram_jax.offload.disk_table import with_disk_dir
from engram_jax.train import evaluation, multihost
from engram_jax.train.checkpoint import (
  Checkpointer,
  CheckpointMismatchError,
  CorruptCheckpointError,
  compare_data,
  compare_meta,
  nonfinite_leaves,
  vocab_item,
)
from engram_jax.train.config import TrainConfig
from engram_jax.train.host_trainer import HostTableTrainer, check_data_parallel_mesh
from engram_jax.train.metrics import MetricsWriter
from engram_jax.train.optimizer import SparseTableOptimizer, make_table_optimizer
from engram_jax.train.run_lock import RunLock, WorkdirLockedError, drop_metrics_after
from engram_jax.train.sharded_host_trainer import ShardedHostTableTrainer, local_value
from engram_jax.train.state import abstract_like, build_model, create_train_state
from engram_jax.train.steps import batch_shardings, make_train_step

log = logging.getLogger(__name__)

#: Training batches whose row ids are counted to pick the device-resident hot rows of
#: "cached" tables (read from a separate iterator: training still starts at batch 0).
FREQUENCY_BATCHES = 20


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
  status: str  # "completed" or "preempted"
  step: int  # steps done in total (including before a resume)
  losses: dict[int, float]  # step -> train loss, for the steps run in this call
  eval: dict[str, float] | None  # last validation metrics
  tokens_per_second: float  # training throughput after compilation
  workdir: Path


def resolve_model_config(config: ModelConfig, tokenizer: Any, compressor: TokenizerCompressor) -> ModelConfig:
  """Checks the model against the tokenizer and fills in the compressed vocabulary size."""
  vocab = tokenizer.get_vocab_size(with_added_tokens=True)
  if config.vocab_size != vocab:
    raise ValueError(
      f"ModelConfig.vocab_size={config.vocab_size} but the tokenizer has {vocab} ids; "
      f"set the model's vocab_size to {vocab}"
    )
  if config.engram is not None:
    pad = special_ids(tokenizer).pad
    if config.engram.pad_id != pad:
      raise ValueError(f"EngramConfig.pad_id={config.engram.pad_id} is not the tokenizer's pad id {pad}")
    if config.engram_compressed_vocab not in (None, compressor.num_compressed):
      raise ValueError(
        f"ModelConfig.engram_compressed_vocab={config.engram_compressed_vocab} but the "
        f"tokenizer compresses to {compressor.num_compressed} ids"
      )
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

  def __init__(
    self,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_config: DataConfig,
    workdir: str | Path,
    *,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    tokenizer: Tokenizer | None = None,
    compress_tokens: bool = True,
    data_shards: int | None = None,
    placements: Mapping[int, TablePlacement] | None = None,
  ):
    """`data_shards`: document streams the global batch is drawn from (default: one per data
    group of processes); fix it to reproduce a multi-process run's batches on fewer processes
    (see `engram_jax.train.multihost`). `mesh` defaults to all devices, or to
    jax.devices()[0] alone when `train_config.table_placement` puts tables on the host in
    a one-process run (a data-parallel mesh may be given then; after `run`,
    `self.host_trainer` is the `HostTableTrainer`, in a multi-process host run the
    `ShardedHostTableTrainer`, else None).

    `placements` {layer: `TablePlacement`} (layers it does not name: device): where each table lives
    (`offload.parse_placements`' output, or built by hand for what a spec string does not
    carry: frequency_file, host_gather, disk_dir); the trainer builds the layers' row
    stores from it once. None: parsed from `train_config.table_placement`. When given,
    `train_config.table_placement` must be "device" (its default) or the same spec; the run
    records `offload.format_placements(placements)` there (checkpoint meta, resume checks)."""
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.data_config, self.seed = data_config, seed
    self.tokenizer = tokenizer or self._load_tokenizer()
    vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
    # compress_tokens=False is the "no tokenizer compression" ablation: identity table.
    self.compressor = (
      TokenizerCompressor.from_tokenizer(self.tokenizer) if compress_tokens else TokenizerCompressor.identity(vocab)
    )
    self.model_config = resolve_model_config(model_config, self.tokenizer, self.compressor)
    self.row_hasher = EngramRowHasher.build(
      self.model_config.engram, self.tokenizer, special_ids(self.tokenizer).pad, self.compressor
    )
    self.placements, train_config = _table_placements(self.model_config, train_config, placements)
    self.train_config = train_config
    self.host_layers = tuple(sorted(l for l, p in self.placements.items() if p.on_host))
    if self.host_layers and mesh is None and jax.process_count() == 1:
      mesh = sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])
    self.mesh = mesh or sharding_lib.make_mesh(data=jax.device_count())
    if self.host_layers:
      _check_host_placement_setup(self.mesh, train_config, self.placements)
    self.layout = multihost.data_layout(self.mesh, data_config.batch_size, data_shards)
    self.checkpointer = Checkpointer(
      self.workdir / "checkpoints", keep=train_config.keep_checkpoints, best_by=train_config.keep_best_by
    )
    self._stop_signal: int | None = None
    # learning-rate multiplier left by divergence rollbacks (saved in the checkpoints' meta)
    self.lr_scale = 1.0

  def optimizer_config(self) -> TrainConfig:
    """The train config the optimizer is built from: learning rate times `lr_scale`."""
    cfg = self.train_config
    return cfg if self.lr_scale == 1.0 else cfg.replace(learning_rate=cfg.learning_rate * self.lr_scale)

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
    iterators = [
      make_train_iterator(config, self.tokenizer, row_hasher=self.row_hasher, shard=(i, lay.num_shards))
      for i in lay.shards
    ]
    return iterators[0] if len(iterators) == 1 else multihost.ConcatBatchIterator(iterators)

  # -- metadata ----------------------------------------------------------------------------
  def meta(self) -> dict[str, Any]:
    """The run's metadata saved with every checkpoint: model, train and data configs, seed, hash constants, tokenizer fingerprint, parameter counts, FLOPs per token and host-table layers."""
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
      "host_table_layers": list(self.host_layers),
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
  def run(self, *, stop_after: int | None = None, resume_step: int | None = None) -> RunResult:
    """Trains to `train_config.total_steps` (or `stop_after` more steps), resuming if possible.

    Resumes from the newest intact checkpoint, or from `resume_step` (the checkpoints after
    it are moved to workdir/superseded_checkpoints). Holds workdir/run.lock meanwhile.
    """
    lock = self._lock_workdir()
    try:
      return self._run(stop_after, resume_step)
    finally:
      if lock is not None:
        lock.release()

  def _run(self, stop_after: int | None, resume_step: int | None) -> RunResult:
    cfg = self.train_config
    meta = self.meta()
    # each data group of processes reads its own document shards; batch_size is per process
    data_iter = self._train_iterator()
    rate = cfg.moe_bias_update_rate
    if rate is None and self.model_config.moe is not None:
      rate = self.model_config.moe.bias_update_rate
    engine = self._build_engine(meta, data_iter, rate or 0.0, resume_step)
    start = engine.step
    if start:
      log.info("resumed from step %d", start)
    meta["lr_scale"] = self.lr_scale
    if self.host_layers:  # host memory of the tables + Adam state, per process (gathered)
      meta["host_table_bytes_per_process"] = engine.host_bytes_per_process()
    if jax.process_index() == 0:
      (self.workdir / "meta.json").write_text(json.dumps(meta, indent=1))
      dropped = drop_metrics_after(self.workdir, start)  # rows of steps about to be replayed
      if dropped:
        log.warning("dropped %d rows of metrics.jsonl past step %d (replayed now)", dropped, start)

    global_batch = self.layout.global_batch
    # Every process builds the same validation batches (rows default to the global batch).
    eval_data = self.data_config.replace(eval_batch_size=self.data_config.eval_batch_size or global_batch)
    eval_batches = make_eval_batches(eval_data, self.tokenizer, row_hasher=self.row_hasher) if cfg.eval_every else []
    eval_fingerprint = evaluation.tokens_fingerprint(eval_batches) if eval_batches else ""

    writer = MetricsWriter(self.workdir) if jax.process_index() == 0 else _NoMetrics()
    previous_handlers = self._install_signal_handlers()
    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, start + stop_after)
    tokens_per_step = global_batch * self.data_config.seq_len
    bar = None
    if cfg.progress_bar and jax.process_index() == 0:
      from tqdm.auto import tqdm

      bar = tqdm(total=cfg.total_steps, initial=start, unit="step", dynamic_ncols=True, desc=self.workdir.name)
    losses: dict[int, float] = {}
    last_eval, status = None, "completed"
    timed_tokens, timed_seconds = 0, 0.0
    step = start
    steps = engine.steps(data_iter)
    rollbacks, rolled_back_to = 0, None

    def recover(problem: str) -> None:
      """Divergence: stop, or roll back to the last verified checkpoint (on_divergence)."""
      nonlocal engine, data_iter, steps, step, writer, rollbacks, losses, rolled_back_to
      good = self.checkpointer.latest_step()
      if good is not None and good == rolled_back_to:
        # diverged again before a newer checkpoint: its weights evaluate finite but do not
        # train (e.g. a NaN gradient); go one checkpoint further back where there is one
        older = [s for s in self.checkpointer.all_steps() if s < good]
        good = max(older) if older else good
      where = (
        f"The last good checkpoint (step {good}) under {self.checkpointer.directory} is intact "
        "(its weights were checked finite when saved)"
        if good is not None
        else "No checkpoint was saved yet"
      )
      if cfg.on_divergence != "rollback" or rollbacks >= cfg.max_rollbacks:
        for later in self.checkpointer.all_steps() if good is not None else ():
          if later > good:  # so that a plain rerun resumes from the checkpoint named here
            self._set_aside(later, "diverged_checkpoints", f"training from it diverged again at step {step}")
        tried = f" after {rollbacks} rollbacks" if rollbacks else ""
        raise TrainingDivergedError(f"{problem}; stopping{tried}. {where}")
      rollbacks += 1
      diverged_at = step
      context.close()  # the state is built outside the mesh context
      steps.close()
      if hasattr(data_iter, "close"):
        data_iter.close()
      scale = self.lr_scale * cfg.rollback_lr_factor
      log.warning(
        "%s; rollback %d of %d: resuming from %s at learning rate x%g",
        problem,
        rollbacks,
        cfg.max_rollbacks,
        f"step {good}" if good is not None else "the initial state",
        scale,
      )
      data_iter = self._train_iterator()
      engine = self._build_engine(meta, data_iter, rate or 0.0, good, lr_scale=scale, later_to="diverged_checkpoints")
      context.enter_context(engine.context())
      rolled_back_to = step = engine.step
      if cfg.rollback_skip_batches:
        log.warning("skipping the %d batches of steps %d..%d", diverged_at - step, step + 1, diverged_at)
        engine.skip(diverged_at - step)
      meta["lr_scale"] = self.lr_scale
      meta["rollbacks"] = [
        *meta.get("rollbacks", []),
        {"diverged_at": diverged_at, "resumed_from": step, "lr_scale": self.lr_scale, "problem": problem},
      ]
      losses = {k: v for k, v in losses.items() if k <= step}
      if jax.process_index() == 0:
        (self.workdir / "meta.json").write_text(json.dumps(meta, indent=1))
        writer.close()
        drop_metrics_after(self.workdir, step)
        writer = MetricsWriter(self.workdir)
      if bar is not None:
        bar.n = step
        bar.refresh()
      steps = engine.steps(data_iter)

    try:
      with contextlib.ExitStack() as context:
        context.enter_context(engine.context())
        while step < end:
          t0 = time.perf_counter()  # wall time per step, input pipeline included
          metrics = next(steps)
          loss = float(metrics["loss"])  # syncs; also what the NaN check needs
          dt = time.perf_counter() - t0
          step += 1
          problem = _divergence(loss, metrics, step)
          if problem:
            recover(problem)
            continue
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
            eval_rows = engine.evaluate_rows(eval_batches)
            last_eval = evaluation.summarize_rows(eval_rows)
            writer.write(step, last_eval, split="val")
            if jax.process_index() == 0:  # per-sequence sums: paired comparisons between runs
              evaluation.save_rows(
                self.workdir / evaluation.ROWS_FILE, eval_rows, step=step, fingerprint=eval_fingerprint
              )
          if multihost.any_process(self._stop_signal is not None):
            status = "preempted"
            log.warning(
              "signal %s: checkpointing at step %d and exiting", self._stop_signal or "on another process", step
            )
            problem = self._save(engine, step, meta, last_eval)
            if problem:  # no rollback while stopping: the last good checkpoint stays the newest
              cfg = cfg.replace(on_divergence="stop")
              recover(problem)
            break
          if at_end or step == end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            problem = self._save(engine, step, meta, last_eval)
            if problem:
              recover(problem)
              continue
    finally:
      steps.close()  # host placement: stops the row prefetcher, which reads data_iter
      for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
      if bar is not None:
        bar.close()
      writer.close()
      if hasattr(data_iter, "close"):
        data_iter.close()
    self.state = engine.state
    self.host_trainer = getattr(engine, "host", None)
    tps = timed_tokens / timed_seconds if timed_seconds else float("nan")
    return RunResult(status, step, losses, last_eval, tps, self.workdir)

  def _save(self, engine, step, meta, last_eval) -> str | None:
    """Saves a checkpoint of `step` if its state passes `engine.verify`; else returns why not."""
    problem = engine.verify()
    if problem:
      return f"the state after step {step} is not fit to checkpoint: {problem}"
    metrics = None
    if self.train_config.keep_best_by:
      metrics = {"val_loss": float("inf") if last_eval is None else last_eval["val_loss"]}
    engine.save(self.checkpointer, step, meta=meta, vocab=vocab_item(self.tokenizer, self.compressor), metrics=metrics)
    return None

  # -- run safety: lock, resume point, fallback past corrupt checkpoints ---------------------
  def _lock_workdir(self) -> RunLock | None:
    """Process 0 takes workdir/run.lock; every process raises if it could not."""
    lock = RunLock(self.workdir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
      try:
        lock.acquire()
      except WorkdirLockedError as e:
        error = e
    if multihost.any_process(error is not None):
      raise error or WorkdirLockedError(f"process 0 could not lock the run directory {self.workdir}")
    return lock

  def _set_aside(self, step: int, folder: str, reason: str) -> None:
    if jax.process_index() == 0:
      self.checkpointer.move_aside(step, self.workdir / folder, reason)
    multihost.barrier(f"engram_jax.set_aside.{step}")
    self.checkpointer.manager.reload()

  def _build_engine(
    self,
    meta,
    data_iter,
    rate: float,
    resume_step: int | None,
    *,
    lr_scale: float | None = None,
    later_to: str = "superseded_checkpoints",
  ):
    """The run's `_Engine`, restored from the newest intact checkpoint (or `resume_step`).

    The optimizer's learning rate is scaled by `lr_scale`, by default the checkpoint's (that
    divergence rollbacks left), else 1.

    A checkpoint that cannot be read is reported with its path; the next older one is
    tried, and once one restores, the unreadable ones are moved to workdir/corrupt_checkpoints
    (kept, not deleted). With none intact, or an unreadable `resume_step`, nothing is moved
    and CorruptCheckpointError is raised. Configs / data that differ raise CheckpointMismatchError.
    """
    ckpt = self.checkpointer
    candidates = ckpt.steps_newest_first()
    if resume_step is not None:
      if resume_step not in candidates:
        raise ValueError(
          f"resume_step={resume_step}: no checkpoint of that step under {ckpt.directory} "
          f"(it holds steps {sorted(candidates)})"
        )
      for s in candidates:
        if s > resume_step:
          self._set_aside(s, later_to, f"resuming from step {resume_step}")
      candidates = [resume_step]
    if not candidates:
      self.lr_scale = 1.0 if lr_scale is None else lr_scale
      return self._engine_class()(self, meta, data_iter, rate, None)
    unreadable: list[CorruptCheckpointError] = []
    for i, step in enumerate(candidates):
      try:
        saved, _ = ckpt.read_meta(step)
        problems = compare_meta(saved, meta) + compare_data(saved, meta)
        if problems:  # fail fast, before any compilation
          raise CheckpointMismatchError(
            f"checkpoint {ckpt.directory}/{step} does not match this run:\n  " + "\n  ".join(problems)
          )
        self.lr_scale = float(saved.get("lr_scale", 1.0)) if lr_scale is None else lr_scale
        engine = self._engine_class()(self, meta, data_iter, rate, step)
      except CorruptCheckpointError as e:
        log.error("%s", e)
        unreadable.append(e)
        if i + 1 < len(candidates):
          log.warning("falling back to the checkpoint of step %d", candidates[i + 1])
        continue
      if self.lr_scale != 1.0:
        log.warning(
          "the checkpoint of step %d was saved after divergence rollbacks: learning rate x%g", step, self.lr_scale
        )
      for e in unreadable:
        self._set_aside(e.step, "corrupt_checkpoints", "unreadable")
      if unreadable:
        log.warning("resumed from step %d, the newest intact checkpoint", step)
      return engine
    if resume_step is not None:
      raise unreadable[0]
    raise CorruptCheckpointError(
      f"no intact checkpoint under {ckpt.directory}: "
      + "; ".join(str(e) for e in unreadable)
      + ". Nothing was moved or deleted; remove the damaged steps to start afresh",
      unreadable[0].step,
      unreadable[0].path,
    )

  def _engine_class(self) -> type:
    """`_ShardedHostEngine` for host tables in a multi-process run, else `_Engine`."""
    return _ShardedHostEngine if self.host_layers and jax.process_count() > 1 else _Engine

  def row_frequencies(self, model: Any, layers: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Row counts {layer: np.int64 [R]} over the first `FREQUENCY_BATCHES` training batches.

    Read from a separate iterator over the same stream, so the training iterator loses no
    batch; the counts (and so the hot rows of "cached" tables) are the same on resume.
    """
    index = {l: model.blocks[l].engram.row_index for l in layers}
    counts = {l: np.zeros(index[l].num_rows, np.int64) for l in layers}
    it = self._train_iterator()
    try:
      for _ in range(FREQUENCY_BATCHES):
        try:
          batch = next(it)
        except StopIteration:
          break
        for l in layers:
          flat = index[l].flat_np(batch["engram_ids"][l], f"Engram layer {l}")
          counts[l] += count_row_frequencies([flat], counts[l].shape[0])
    finally:
      if hasattr(it, "close"):
        it.close()
    return counts


def _divergence(loss: float, metrics: dict[str, Any], step: int) -> str | None:
  """Why step `step` diverged (a non-finite loss or gradient norm), or None."""
  if not math.isfinite(loss):
    return f"training loss became {loss} at step {step}"
  if "grad_norm" in metrics:
    norm = float(metrics["grad_norm"])
    if not math.isfinite(norm):  # the update of this step already poisoned the weights
      return f"gradient norm became {norm} at step {step} (loss {loss})"
  return None


def _table_placements(
  model_config: ModelConfig, cfg: TrainConfig, placements: Mapping[int, TablePlacement] | None
) -> tuple[dict[int, TablePlacement], TrainConfig]:
  """({layer: TablePlacement}, the TrainConfig recording them) of a run: `placements` checked
  against the model's Engram layers (unnamed layers: device), or `cfg.table_placement` parsed."""
  layers = model_config.engram_layer_ids if model_config.engram is not None else ()
  if placements is None:
    if not layers:
      if cfg.table_placement.strip() not in ("", "device"):
        raise ValueError(
          f"TrainConfig.table_placement={cfg.table_placement!r} needs a model with Engram layers; this model has none"
        )
      return {}, cfg
    return parse_placements(cfg.table_placement, layers), cfg
  if not layers:
    raise ValueError("Trainer placements need a model with Engram layers; this model has none")
  placements = layer_placements(placements, layers)
  spec = format_placements(placements)
  if cfg.table_placement.strip() not in ("", "device", spec):
    raise ValueError(
      f"Trainer got placements ({spec!r}) and TrainConfig.table_placement={cfg.table_placement!r}: give one of them"
    )
  return placements, cfg.replace(table_placement=spec)


def _check_host_placement_setup(mesh: jax.sharding.Mesh, cfg: TrainConfig, placements: dict) -> None:
  n = jax.process_count()
  if n > 1:
    # the sharded-host path: every Engram table "host" (DRAM, NumPy gather), split by rows
    not_host = {
      l: p for l, p in sorted(placements.items()) if (p.kind, p.storage, p.host_gather) != ("host", "dram", "numpy")
    }
    if not_host:
      kinds = sorted({p.kind + ("" if p.storage == "dram" else "+" + p.storage) for p in not_host.values()})
      raise NotImplementedError(
        f"TrainConfig.table_placement={cfg.table_placement!r} with {n} processes: host tables are split "
        "over the processes only when every Engram layer is placed 'host' (DRAM, numpy gather); layers "
        f"{sorted(not_host)} are placed {kinds}. Cached, disk, compute_on and mixed placements train in "
        "one process; or use 'host' for every layer"
      )
    model_axes = multihost.model_parallel_axes(mesh)
    if model_axes:
      raise NotImplementedError(
        f"TrainConfig.table_placement={cfg.table_placement!r} with {n} processes: host tables split over "
        f"the processes need a data-parallel mesh (data, fsdp); the mesh {dict(mesh.shape)} has "
        f"model-parallel axes {model_axes}"
      )
  else:
    try:
      check_data_parallel_mesh(mesh)
    except NotImplementedError as e:
      raise NotImplementedError(f"TrainConfig.table_placement={cfg.table_placement!r}: {e}") from None
  if cfg.freeze_engram_tables:
    raise ValueError(
      f"TrainConfig.freeze_engram_tables=True is not supported with "
      f"table_placement={cfg.table_placement!r} (the host optimizer always "
      "updates the tables); use table_placement='device'"
    )


class _Engine:
  """A run's state, row stores and the one jitted step (`steps.make_train_step`), for every
  table placement.

  Device row stores: their tables are in the TrainState, sharded on the mesh with the rest,
  and the step updates them (dense or row-sparse Adam, `make_table_optimizer`). With host /
  cached stores a `HostTableTrainer` holds the state: their tables are initialised in host
  memory (`build_offloaded`, never on the device, which keeps size-0 placeholders), the
  rows of step t+1 are gathered during step t and the stores apply the step's row grads.

  The checkpoint's `state` item is the TrainState without the size-0 placeholders;
  `host_tables` holds each host store's `state_dict` (table, row-sparse Adam m, v, count).
  """

  def __init__(self, trainer: Trainer, meta: dict[str, Any], data_iter: Any, rate: float, step: int | None):
    cfg, mesh = trainer.optimizer_config(), trainer.mesh
    self.host, self.data_iter, self.global_batch = None, data_iter, trainer.layout.global_batch
    layers = trainer.host_layers
    self._is_placeholder = engram_table_filter(layers)
    if layers:
      build = lambda: build_model(trainer.model_config, trainer.seed)  # noqa: E731
      cached = tuple(l for l, p in trainer.placements.items() if p.kind == "cached" and not p.frequency_file)
      frequencies = trainer.row_frequencies(nnx.eval_shape(build), cached) if cached else None
      # disk tables: working files under the run's folder (rebuilt from the checkpoint on resume)
      placements = with_disk_dir(trainer.placements, trainer.workdir / "disk_tables")
      model, offloaded = build_offloaded(build, placements, frequencies=frequencies, device=mesh.devices.flat[0])
      # one device: the state and rows stay on it; a data-parallel mesh splits them over it
      self.host = HostTableTrainer(model, offloaded, cfg, bias_update_rate=rate, mesh=mesh if mesh.size > 1 else None)
      del model
      graphdef, self.mesh = self.host.graphdef, self.host.mesh
      self.position = _ConsumedPosition(data_iter)
      out = None
    else:
      graphdef, self._state, state_sh, (tx, lr) = create_train_state(
        trainer.model_config, lambda p: make_table_optimizer(cfg, p), trainer.seed, mesh
      )
      self.mesh, self.position = mesh, data_iter
      spec = batch_spec(trainer.data_config.replace(batch_size=self.global_batch), trainer.model_config.engram)
      example = jax.tree.map(lambda s: np.zeros(s[0], s[1]), spec, is_leaf=lambda x: isinstance(x, tuple))
      self.b_shard = batch_shardings(example, mesh)
      self.train_step = jax.jit(
        make_train_step(graphdef, tx, lr, bias_update_rate=rate),
        in_shardings=(state_sh, self.b_shard),
        out_shardings=(state_sh, None, None),
        donate_argnums=(0,),
      )
      out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.eval_step = jax.jit(evaluation.make_row_eval_step(graphdef), out_shardings=out)
    tx = tx if self.host is None else self.host.tx
    self.flushed = jax.jit(tx.flushed_params) if isinstance(tx, SparseTableOptimizer) else (lambda p, _: p)
    if step is None:
      return
    ckpt, target = trainer.checkpointer, abstract_like(self._savable_state())
    if self.host is None:
      del self._state  # freed before the restored copy arrives
      self._state, _ = ckpt.restore(target, current_meta=meta, step=step, data_iterator=data_iter)
      return
    restored, _ = ckpt.restore(target, current_meta=meta, step=step, data_iterator=data_iter)
    placeholders, _ = nnx.split_state(self.state.rest, self._is_placeholder, ...)
    self.state = restored.replace(rest=nnx.merge_state(restored.rest, placeholders))
    self.host.load_host_state(ckpt.restore_host_tables(self.host.host_state(), step=step))

  @property
  def state(self):
    return self._state if self.host is None else self.host.state

  @state.setter
  def state(self, value) -> None:
    if self.host is None:
      self._state = value
    else:
      self.host.state = value

  @property
  def step(self) -> int:
    return int(self.state.step)

  def context(self):
    # Host stores: no mesh around the loop. With one device the state lives on it (under
    # jax.set_mesh the step's outputs would carry the mesh and recompile the next step);
    # with a mesh the host trainer enters it around its steps only, as the hot-row caches
    # of "cached" layers stay on one device.
    return contextlib.nullcontext() if self.host is not None else jax.set_mesh(self.mesh)

  def _savable_state(self):
    # orbax cannot write the size-0 table placeholders; they carry nothing
    _, rest = nnx.split_state(self.state.rest, self._is_placeholder, ...)
    return self.state.replace(rest=rest)

  def steps(self, data_iter):
    """Yields each step's metrics (row-store updates applied); host rows prefetched one step ahead."""
    if self.host is not None:
      for metrics in self.host.iterate(self.position):
        self.position.consumed()
        yield metrics
      return
    while True:
      try:
        batch = next(data_iter)
      except StopIteration:
        return
      batch = multihost.put_process_batch(batch, self.b_shard, self.global_batch)
      self.state, metrics, _ = self.train_step(self.state, batch)
      self.last_batch = batch  # what `verify` evaluates the new weights on
      yield metrics

  def skip(self, n: int) -> None:
    for _ in range(n):
      next(self.position)
      if self.host is not None:
        self.position.consumed()

  def verify(self) -> str | None:
    """Why the current state must not be checkpointed (non-finite values or loss), or None."""
    bad = nonfinite_leaves(self._savable_state())
    bad += [
      f"host table of layer {l}: {k}"
      for l, d in (self.host.host_state() if self.host is not None else {}).items()
      for k, v in d.items()
      if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all()
    ]
    if bad:
      return f"non-finite values in {bad[:5]}"
    if self.host is None:  # the step's batch, already placed on the mesh
      rows = evaluation.concat_rows([jax.device_get(self.eval_step(self.state, self.last_batch, None))])
    else:
      rows = self.evaluate_rows([self.position.last_batch])
    loss = evaluation.summarize_rows(rows)["val_loss"]
    return None if math.isfinite(loss) else f"its weights give loss {loss} on the step's batch"

  def evaluate_rows(self, eval_batches) -> dict[str, np.ndarray]:
    """Per-sequence sums (`evaluation.row_sums`) over the validation batches. Without host
    stores every process holds the same full batches and each device evaluates its rows
    (returned replicated, so every process can read them). catchup_adam device tables are
    evaluated brought up to date (a copy; training stays lazy)."""
    state = self.state.replace(params=self.flushed(self.state.params, self.state.opt_state))
    parts = []
    for batch in eval_batches:
      if self.host is None:
        batch = multihost.put_replicated_batch(batch, batch_shardings(batch, self.mesh))
        parts.append(self.eval_step(state, batch, None))
        continue
      rows = self.host.gather(batch["engram_ids"])
      with self.host.context():
        parts.append(self.eval_step(state, self.host.put_batch(batch), rows))
    return evaluation.concat_rows(jax.device_get(parts))

  def save(self, checkpointer: Checkpointer, step: int, **kwargs) -> None:
    if self.host is not None:
      kwargs["host_tables"] = self.host.host_state()
    checkpointer.save(step, self._savable_state(), data_iterator=self.position, **kwargs)

  def host_bytes_per_process(self) -> list[int]:
    """Bytes of the host tables and their Adam state ([one figure]: one process; disk
    placements count their memory-mapped files)."""
    state = self.host.host_state() if self.host is not None else {}
    return [int(sum(np.asarray(v).nbytes for d in state.values() for v in d.values()))]


class _ShardedHostEngine:
  """`_Engine`'s interface for host-placed tables in a multi-process run: a
  `ShardedHostTableTrainer` (engram_jax/train/sharded_host_trainer.py) holds the dense
  state on the global data-parallel mesh and, in each process, rows [lo, hi) of every host
  table and their row-sparse Adam state. Its tables are initialised shard by shard (never
  whole anywhere). The checkpoint's `state` item is the dense state (without the size-0
  placeholders), `host_shards` each process's table shards (`shard_checkpoint`)."""

  def __init__(self, trainer: Trainer, meta: dict[str, Any], data_iter: Any, rate: float, step: int | None):
    self.mesh, self.data_iter = trainer.mesh, data_iter
    build = lambda: build_model(trainer.model_config, trainer.seed)  # noqa: E731
    self.host = ShardedHostTableTrainer(build, trainer.optimizer_config(), self.mesh, bias_update_rate=rate)
    if step is not None:
      ckpt = trainer.checkpointer
      target = abstract_like(self.host.savable_state())
      restored, _ = ckpt.restore(target, current_meta=meta, step=step, data_iterator=data_iter)
      self.host.load_state(restored, ckpt.restore_host_shards(self.host.plans, step))
    self.position = _ConsumedPosition(data_iter)  # after the restore: its position

  @property
  def state(self):
    return self.host.state

  @property
  def step(self) -> int:
    return int(local_value(self.host.state.step))

  def context(self):
    return contextlib.nullcontext()

  def steps(self, data_iter):
    """Yields each step's metrics (the shards updated); the ids of step t+1 routed during step t."""
    del data_iter  # read through self.position
    for metrics in self.host.iterate(self.position):
      self.position.consumed()
      yield metrics

  def skip(self, n: int) -> None:
    for _ in range(n):
      next(self.position)
      self.position.consumed()

  def verify(self) -> str | None:
    """As `_Engine.verify`, over every process's shards (a collective: the same answer on all)."""
    bad = self.host.nonfinite()
    if multihost.any_process(bool(bad)):
      return f"non-finite values in {bad[:5]}" if bad else "non-finite values in another process's table shards"
    rows = self.host.evaluate_rows([self.position.last_batch])
    loss = evaluation.summarize_rows(rows)["val_loss"]
    return None if math.isfinite(loss) else f"its weights give loss {loss} on the step's batch"

  def evaluate_rows(self, eval_batches) -> dict[str, np.ndarray]:
    """Per-sequence sums over the global validation batches (every process holds them all
    and feeds its rows; every process gets every row's sums)."""
    return self.host.evaluate_rows([self.host.local_rows(b) for b in eval_batches])

  def save(self, checkpointer: Checkpointer, step: int, **kwargs) -> None:
    checkpointer.save(
      step, self.host.savable_state(), data_iterator=self.position, host_shards=self.host.tables, **kwargs
    )

  def host_bytes_per_process(self) -> list[int]:
    """Host bytes of this process's table shards and Adam state, of every process (gathered)."""
    return [int(b) for b in np.asarray(multihost_utils.process_allgather(np.int64(self.host.host_bytes())))]


class _ConsumedPosition:
  """The training iterator as the row prefetcher reads it, checkpointed where the loop is.

  The prefetcher pulls batches ahead of the step that runs; this records the iterator's
  state after each pull, and `get_state` (what grain's orbax handler saves) returns the
  state after the last batch the loop has consumed (`consumed()` once per step).
  """

  def __init__(self, iterator: Any):
    self.iterator = iterator
    self._pending: collections.deque = collections.deque()
    self._state = self._read_state()
    self.last_batch = None  # the batch of the last consumed step

  def _read_state(self) -> bytes:
    state = self.iterator.get_state()
    # grain's handler json-dumps DatasetIterator states, saves other iterators' bytes
    return state if isinstance(state, bytes) else json.dumps(copy.deepcopy(state), indent=4).encode()

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.iterator)
    self._pending.append((self._read_state(), batch))  # the prefetch thread
    return batch

  def consumed(self) -> None:
    self._state, self.last_batch = self._pending.popleft()

  def get_state(self) -> bytes:
    return self._state
