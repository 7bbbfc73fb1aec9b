"""`TrainConfig`: optimization, schedule, checkpointing and logging of a training run."""

from __future__ import annotations

import dataclasses
from typing import Any

from engram_jax.config import check_known_fields
from engram_jax.offload import parse_placements


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
    keep_checkpoints: how many checkpoints to keep.
    keep_best_by: None keeps the last `keep_checkpoints`; "val_loss" keeps the best ones.
    progress_bar: tqdm bar with tokens/s, loss and ETA.
    table_placement: where the Engram tables live while training
      (`engram_jax.offload.parse_placements`): "device" (default), "host" (host RAM,
      row-sparse Adam on the host), "cached@0.05" (host + 5% hottest rows on the device),
      or per layer, "1:host,15:cached@0.05" (unnamed layers stay on the device).
      Anything but "device" needs a single-device mesh and a single process.
    table_optimizer: how device-placed tables are updated: "dense_adam" (optax Adam over
      the whole table; the default: it trained better in a paired comparison, README) or
      "sparse_adam" (the rows a batch touched, per-row Adam counts, O(tokens) per step;
      the host tables' update). Host tables are
      always row-sparse; row-sharded device tables, and the device layers of a mixed
      placement ("1:host"), keep dense Adam (logged for the former).
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
  table_optimizer: str = "dense_adam"

  def __post_init__(self):
    object.__setattr__(self, "step_decay_boundaries", tuple(float(b) for b in self.step_decay_boundaries))
    self.validate()

  def validate(self) -> None:
    if self.total_steps < 1:
      raise ValueError(f"TrainConfig.total_steps must be >= 1, got {self.total_steps}")
    if self.learning_rate <= 0:
      raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")
    if self.schedule not in ("cosine", "step", "constant"):
      raise ValueError(f"TrainConfig.schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
    if self.optimizer not in ("adamw", "muon"):
      raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
    if any(not 0 < b < 1 for b in self.step_decay_boundaries):
      raise ValueError(f"TrainConfig.step_decay_boundaries must be fractions in (0, 1), got {self.step_decay_boundaries}")
    if self.engram_lr_multiplier <= 0:
      raise ValueError(f"TrainConfig.engram_lr_multiplier must be > 0, got {self.engram_lr_multiplier}")
    if self.keep_best_by not in (None, "val_loss"):
      raise ValueError(f"TrainConfig.keep_best_by must be None or 'val_loss', got {self.keep_best_by!r}")
    if self.keep_best_by and not self.eval_every:
      raise ValueError("TrainConfig.keep_best_by='val_loss' needs eval_every > 0")
    for name in ("log_every", "eval_every", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainConfig.{name} must be >= 0")
    _check_table_placement(self.table_placement)
    if self.table_optimizer not in ("sparse_adam", "dense_adam"):
      raise ValueError(f"TrainConfig.table_optimizer must be 'sparse_adam' or 'dense_adam', got {self.table_optimizer!r}")

  def replace(self, **changes: Any) -> TrainConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["step_decay_boundaries"] = list(self.step_decay_boundaries)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
    check_known_fields(cls, d)
    return cls(**d)


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
