"""`TrainConfig`: optimization, schedule, checkpointing and logging of a training run."""

from __future__ import annotations

import dataclasses
from typing import Any

from engram_jax.config import check_bool, check_choice, check_float, check_int, check_known_fields
from engram_jax.offload import parse_placements

TABLE_OPTIMIZERS = ("catchup_adam", "dense_adam", "sparse_adam")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of the training loop (the paper's recipe: ENGRAM_SPEC.md §5).

  Attributes:
    total_steps: optimizer steps of the run.
    learning_rate: peak backbone learning rate.
    warmup_steps: linear warmup from 0.
    schedule: "cosine" (to `min_lr_ratio` * peak) or "step" (multiply by
      `step_decay_factor` at each fraction of `step_decay_boundaries`).
    optimizer: backbone optimizer, "adamw" or "muon" (optax.contrib.muon; non-matrix
      parameters fall back to Adam inside it).
    weight_decay: backbone decoupled weight decay (not on norms, biases, Engram tables).
    engram_lr_multiplier: Engram tables use Adam at this multiple of the backbone lr,
      with weight decay 0.
    freeze_engram_tables: the Engram tables get no updates (optax.set_to_zero) and keep
      their random init: the "frozen random table" control.
    b1, b2, eps: Adam moments (both groups).
    grad_clip_norm: global-norm clipping (<= 0 disables).
    moe_bias_update_rate: the aux-loss-free router bias step (None: MoEConfig's).
    log_every / eval_every / checkpoint_every: in steps (0 disables eval / checkpoints).
    keep_checkpoints: how many checkpoints to keep (>= 1: the newest is never deleted).
    keep_best_by: None keeps the last `keep_checkpoints`; "val_loss" keeps the best ones
      and the newest (the one a resume starts from).
    on_divergence: what a non-finite loss, gradient norm or checkpoint candidate does:
      "stop" raises `TrainingDivergedError` naming the last verified checkpoint;
      "rollback" resumes from it with the learning rate times `rollback_lr_factor`
      (and, with `rollback_skip_batches`, past the batches since it), at most
      `max_rollbacks` times per `Trainer.run`.
    progress_bar: tqdm bar with tokens/s, loss and ETA.
    table_placement: where the Engram tables live while training
      (`engram_jax.offload.parse_placements`): "device" (default), "host" (host RAM,
      row-sparse Adam on the host), "cached@0.05" (host + 5% hottest rows on the device),
      or per layer, "1:host,15:cached@0.05" (unnamed layers stay on the device);
      "disk@dram=0.01" / "cached@0.05+disk@dram=0.01" keep the table and its Adam state in
      memory-mapped files under workdir/disk_tables with 1% of the rows cached in DRAM
      (docs/DISK_TIER.md).
      Anything but "device" needs a mesh that only splits the batch; with several
      processes only "host" on every layer, split by rows over the processes
      (`engram_jax.train.sharded_host_trainer`).
    table_optimizer: how device-placed tables are updated (engram_jax/offload/sparse_adam.py):
      "catchup_adam" (the default): dense Adam evaluated lazily on the rows a batch touches,
      the steps a row sat out caught up in closed form when it is next touched; O(tokens)
      per step whatever the table size, and in a paired comparison on the tiny config
      (30k slots per head, 200 steps, 2 seeds, README) not detectably different from
      "dense_adam" (optax Adam over the whole table: the reference). "sparse_adam": per-row
      Adam counts, untouched rows not decayed or moved (the host tables' update; it trained
      worse in the same comparison). catchup_adam evaluation and `load_run` read the tables
      brought up to date (`SparseTableOptimizer.flushed_params`). Host tables are
      always "sparse_adam"; row-sharded device tables use `table_optimizer` too (their
      per-row state split like them); the device layers of a mixed placement ("1:host") follow `table_optimizer`.
  """

  total_steps: int = 200
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  schedule: str = "cosine"
  min_lr_ratio: float = 0.1
  step_decay_boundaries: tuple[float, ...] = (0.8, 0.9)
  step_decay_factor: float = 0.316
  optimizer: str = "adamw"
  weight_decay: float = 0.1
  engram_lr_multiplier: float = 5.0
  freeze_engram_tables: bool = False
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float = 1.0
  moe_bias_update_rate: float | None = None
  log_every: int = 10
  eval_every: int = 100
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  keep_best_by: str | None = None
  progress_bar: bool = True
  table_placement: str = "device"
  on_divergence: str = "stop"
  rollback_lr_factor: float = 0.5
  max_rollbacks: int = 3
  rollback_skip_batches: bool = False
  table_optimizer: str = "catchup_adam"

  def __post_init__(self):
    object.__setattr__(self, "step_decay_boundaries", tuple(float(b) for b in self.step_decay_boundaries))
    self.validate()

  def validate(self) -> None:
    """Checks every field; ValueError names the field, its value and the allowed range (called on construction)."""
    _check_int(self, "total_steps", 1)
    _check_float(self, "learning_rate", 0.0, low_open=True)
    _check_int(self, "warmup_steps", 0, self.total_steps)
    if self.schedule not in ("cosine", "step", "constant"):
      raise ValueError(f"TrainConfig.schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
    _check_float(self, "min_lr_ratio", 0.0, 1.0)
    if any(isinstance(b, bool) or not 0 < b < 1 for b in self.step_decay_boundaries):
      raise ValueError(
        f"TrainConfig.step_decay_boundaries must be fractions in (0, 1), got {self.step_decay_boundaries}"
      )
    if list(self.step_decay_boundaries) != sorted(self.step_decay_boundaries):
      raise ValueError(f"TrainConfig.step_decay_boundaries must be increasing, got {self.step_decay_boundaries}")
    _check_float(self, "step_decay_factor", 0.0, low_open=True)
    if self.optimizer not in ("adamw", "muon"):
      raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
    _check_float(self, "weight_decay", 0.0)
    _check_float(self, "engram_lr_multiplier", 0.0, low_open=True)
    _check_float(self, "b1", 0.0, 1.0, high_open=True)
    _check_float(self, "b2", 0.0, 1.0, high_open=True)
    _check_float(self, "eps", 0.0, low_open=True)
    _check_float(self, "grad_clip_norm", None)  # <= 0 disables clipping; must be finite
    if self.moe_bias_update_rate is not None:
      _check_float(self, "moe_bias_update_rate", 0.0)
    for name in ("log_every", "eval_every", "checkpoint_every"):
      _check_int(self, name, 0)
    # 0 used to reach orbax as max_to_keep=0, which deletes every checkpoint, the final one included
    _check_int(self, "keep_checkpoints", 1)
    if self.keep_best_by not in (None, "val_loss"):
      raise ValueError(f"TrainConfig.keep_best_by must be None or 'val_loss', got {self.keep_best_by!r}")
    if self.keep_best_by and not self.eval_every:
      raise ValueError("TrainConfig.keep_best_by='val_loss' needs eval_every > 0")
    for name in ("freeze_engram_tables", "progress_bar", "rollback_skip_batches"):
      check_bool("TrainConfig", name, getattr(self, name))
    check_choice("TrainConfig", "on_divergence", self.on_divergence, ("stop", "rollback"))
    _check_float(self, "rollback_lr_factor", 0.0, 1.0, low_open=True)
    _check_int(self, "max_rollbacks", 0)
    _check_table_placement(self.table_placement)
    check_choice("TrainConfig", "table_optimizer", self.table_optimizer, TABLE_OPTIMIZERS)

  def replace(self, **changes: Any) -> TrainConfig:
    """A copy with the given fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict of the fields (what a checkpoint's meta stores); inverse of `from_dict`."""
    d = dataclasses.asdict(self)
    d["step_decay_boundaries"] = list(self.step_decay_boundaries)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
    """The config `to_dict` wrote; unknown fields are refused by name."""
    check_known_fields(cls, d)
    return cls(**d)


def _check_int(cfg: TrainConfig, name: str, low: int, high: int | None = None) -> None:
  check_int("TrainConfig", name, getattr(cfg, name), low=low, high=high)


def _check_float(cfg: TrainConfig, name: str, low: float | None, high: float | None = None, **open_ends: bool) -> None:
  """A finite real number in the range [low, high] (open ends where said; None: unbounded)."""
  check_float("TrainConfig", name, getattr(cfg, name), low=low, high=high, **open_ends)


def _check_table_placement(spec: str) -> None:
  """Syntax and kinds of a placement spec; the layer ids are checked against the model later."""
  if not isinstance(spec, str):
    raise TypeError(f"TrainConfig.table_placement must be a string, got {spec!r}")
  named = []
  if ":" in spec:  # per-layer spec: parse it against the layers it names
    for item in spec.split(","):
      layer = item.partition(":")[0].strip()
      try:
        named.append(int(layer))
      except ValueError:
        raise ValueError(f"TrainConfig.table_placement={spec!r}: bad layer id {layer!r}") from None
  try:
    parse_placements(spec, named or (0,))
  except ValueError as e:
    raise ValueError(f"TrainConfig.table_placement: {e}") from None
