"""Parameter groups and the optax optimizer of the paper's recipe.

Groups (labels):
  "engram_table"  Engram memory tables (logical axis "engram_rows"): Adam at
                  `engram_lr_multiplier` x the backbone lr, no weight decay
                  (`freeze_engram_tables`: no updates at all, optax.set_to_zero).
  "no_decay"      norms (logical axis "norm"), biases and other vectors: backbone
                  optimizer without weight decay.
  "decay"         every other matrix: AdamW (or Muon) with weight decay.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import nnx

from engram_jax.train.config import TrainConfig

ENGRAM_TABLE, NO_DECAY, DECAY = "engram_table", "no_decay", "decay"


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Backbone lr per step: linear warmup, then cosine / step decay / constant."""
  peak, warm, total = cfg.learning_rate, cfg.warmup_steps, cfg.total_steps
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(total - warm, 1), alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "step":
    # boundaries are fractions of the whole run; the joined schedule counts from warmup's end
    after = optax.piecewise_constant_schedule(
        peak, {max(1, int(b * total) - warm): cfg.step_decay_factor for b in cfg.step_decay_boundaries})
  else:
    after = optax.constant_schedule(peak)
  if not warm:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def parameter_label(path: tuple[Any, ...], variable: nnx.Variable) -> str:
  """The optimizer group of one parameter, from its logical axis names and shape."""
  names = tuple(variable.get_metadata().get("out_sharding") or ())
  if "engram_rows" in names or "engram_rows_all" in names:
    return ENGRAM_TABLE
  last = str(getattr(path[-1], "key", path[-1])) if path else ""
  if "norm" in names or variable.get_value().ndim <= 1 or last.endswith("bias"):
    return NO_DECAY
  return DECAY


def parameter_labels(params: nnx.State) -> Any:
  """A pytree of group labels matching `params` (an `nnx.State` of `nnx.Param`s)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, v: v.replace(parameter_label(p, v)), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, backbone lr schedule) for `params`."""
  lr = learning_rate_schedule(cfg)
  engram_lr = lambda step: cfg.engram_lr_multiplier * lr(step)  # noqa: E731
  if cfg.optimizer == "muon":
    backbone = lambda wd: optax.contrib.muon(  # noqa: E731
        lr, weight_decay=wd, adam_b1=cfg.b1, adam_b2=cfg.b2, eps=cfg.eps, adam_weight_decay=wd)
  else:
    backbone = lambda wd: optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=wd)  # noqa: E731
  groups = {
      ENGRAM_TABLE: (optax.set_to_zero() if cfg.freeze_engram_tables
                     else optax.adam(engram_lr, cfg.b1, cfg.b2, cfg.eps)),
      NO_DECAY: backbone(0.0),
      DECAY: backbone(cfg.weight_decay),
  }
  labels = parameter_labels(params)
  chain = []
  if cfg.freeze_engram_tables:
    # zero the table gradients before clipping, so they do not shrink the backbone's steps
    keep = optax.identity()
    chain.append(optax.multi_transform(
        {ENGRAM_TABLE: optax.set_to_zero(), NO_DECAY: keep, DECAY: keep}, labels))
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  tx = optax.chain(*chain, optax.multi_transform(groups, labels))
  return tx, lr
