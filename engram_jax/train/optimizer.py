"""Parameter groups and the optax optimizer of the paper's recipe.

Groups (labels):
  "engram_table"  Engram memory tables (logical axis "engram_rows"): Adam at
                  `engram_lr_multiplier` x the backbone lr, no weight decay
                  (`freeze_engram_tables`: no updates at all, optax.set_to_zero).
                  `make_table_optimizer` with `table_optimizer="catchup_adam"` (the
                  default) or "sparse_adam" takes the device tables out of this group:
                  `SparseTableOptimizer`, row-sparse.
  "no_decay"      norms (logical axis "norm"), biases and other vectors: backbone
                  optimizer without weight decay.
  "decay"         every other matrix: AdamW (or Muon) with weight decay.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from engram_jax.models import engram_table_filter
from engram_jax.offload.sparse_adam import (
  CATCHUP_RECORD_STEPS,
  CatchupState,
  SparseRowState,
  apply_row_adam,
  catchup_flush,
  catchup_rows,
  catchup_window,
)
from engram_jax.train.config import TrainConfig

log = logging.getLogger(__name__)

ENGRAM_TABLE, NO_DECAY, DECAY = "engram_table", "no_decay", "decay"


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Backbone lr per step: linear warmup, then cosine / step decay / constant."""
  peak, warm, total = cfg.learning_rate, cfg.warmup_steps, cfg.total_steps
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(total - warm, 1), alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "step":
    # boundaries are fractions of the whole run; the joined schedule counts from warmup's end
    after = optax.piecewise_constant_schedule(
      peak, {max(1, int(b * total) - warm): cfg.step_decay_factor for b in cfg.step_decay_boundaries}
    )
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
    lambda p, v: v.replace(parameter_label(p, v)), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, backbone lr schedule) for `params`."""
  lr = learning_rate_schedule(cfg)
  engram_lr = lambda step: cfg.engram_lr_multiplier * lr(step)  # noqa: E731
  if cfg.optimizer == "muon":
    backbone = lambda wd: optax.contrib.muon(  # noqa: E731
      lr, weight_decay=wd, adam_b1=cfg.b1, adam_b2=cfg.b2, eps=cfg.eps, adam_weight_decay=wd
    )
  else:
    backbone = lambda wd: optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=wd)  # noqa: E731
  groups = {
    ENGRAM_TABLE: (optax.set_to_zero() if cfg.freeze_engram_tables else optax.adam(engram_lr, cfg.b1, cfg.b2, cfg.eps)),
    NO_DECAY: backbone(0.0),
    DECAY: backbone(cfg.weight_decay),
  }
  labels = parameter_labels(params)
  chain = []
  if cfg.freeze_engram_tables:
    # zero the table gradients before clipping, so they do not shrink the backbone's steps
    keep = optax.identity()
    chain.append(optax.multi_transform({ENGRAM_TABLE: optax.set_to_zero(), NO_DECAY: keep, DECAY: keep}, labels))
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  tx = optax.chain(*chain, optax.multi_transform(groups, labels))
  return tx, lr


@dataclasses.dataclass(frozen=True)
class SparseTableOptimizer:
  """Row-sparse Adam on the device Engram tables of `layers`, `dense` on everything else.

  The train step gathers each table's rows of the batch itself, differentiates w.r.t. those
  rows (never w.r.t. the table: no dense [R, d] gradient), sums them per distinct row
  (`sparse_grad`) and updates those rows at `engram_lr_multiplier * lr(step)`, b1, b2, eps,
  weight decay 0. A step costs O(tokens) in the tables, whatever their size. Two updates
  (engram_jax/offload/sparse_adam.py):
    catch_up=True ("catchup_adam"): dense Adam, lazily: before the step gathers a row,
      `caught_up` applies the steps it sat out (m, v decay and the drift dense Adam gives
      it); then one global-step Adam step. Equal to dense Adam up to the documented
      approximation of the skipped steps' drift; read the tables through `flushed_params`.
    catch_up=False ("sparse_adam"): per-row step counts (the host tables' `SparseRowAdam`):
      untouched rows and their m, v, count stay exactly unchanged.

  Attributes:
    dense: `make_optimizer` of the params without these tables and without its clip.
    layers: the Engram layers whose tables are updated row-sparse.
    grad_clip_norm: global-norm clip over the dense grads and the summed row grads together
      (the norm of the dense table gradient; <= 0: none).
    frozen: `freeze_engram_tables`: the tables get neither updates nor optimizer state.
    catch_up: catch-up Adam (above) instead of per-row counts.
  State (`init`): (dense optax state, (one `CatchupState` or `SparseRowState` per layer in
  order)).
  """

  dense: optax.GradientTransformation
  layers: tuple[int, ...]
  lr_multiplier: float
  b1: float
  b2: float
  eps: float
  grad_clip_norm: float
  frozen: bool
  catch_up: bool = False

  def split(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(the tables of `layers`, every other param)."""
    return nnx.split_state(params, engram_table_filter(self.layers), ...)

  def tables(self, params: nnx.State) -> dict[int, jax.Array]:
    """{layer: table [R, d]} of `params`."""
    return {path[1].key: x for path, x in jax.tree_util.tree_flatten_with_path(self.split(params)[0])[0]}

  def init(self, params: nnx.State) -> tuple[Any, tuple[SparseRowState, ...]]:
    tables, dense = self.split(params)
    if self.frozen:
      return self.dense.init(dense), ()
    zeros = lambda t: jnp.zeros(t.shape, jnp.promote_types(t.dtype, jnp.float32))  # noqa: E731
    if self.catch_up:
      window = catchup_window(self.b1, self.b2)
      states = tuple(
        CatchupState(
          zeros(t),
          zeros(t),
          jnp.full(t.shape[0], -1, jnp.int32),
          jnp.zeros((), jnp.int32),
          jnp.zeros(window),
          jnp.zeros((CATCHUP_RECORD_STEPS, 2)),
        )
        for t in self.tables(params).values()
      )
      return self.dense.init(dense), states
    return self.dense.init(dense), tuple(
      SparseRowState(zeros(t), zeros(t), jnp.zeros(t.shape[0], jnp.int32)) for t in self.tables(params).values()
    )

  def state_shardings(self, param_shardings: nnx.State, opt_shardings: Any) -> Any:
    """`opt_shardings` (the opt state's layout, replicated where nothing says otherwise) with
    each table's per-row state (m, v and last / count) split over the mesh like the table's
    rows, so a row-sharded table's Adam state is row-sharded too (not a full copy on every
    device)."""
    if self.frozen:
      return opt_shardings
    dense, states = opt_shardings
    tables = self.tables(param_shardings)
    out = []
    for l, st in zip(self.layers, states):
      table = tables[l]
      rows = table.spec[0] if len(table.spec) else None
      split = lambda x, nd: NamedSharding(table.mesh, PartitionSpec(rows, *([None] * (nd - 1))))  # noqa: E731
      fields = {"m": 2, "v": 2, "last" if self.catch_up else "count": 1}
      out.append(st._replace(**{f: split(getattr(st, f), nd) for f, nd in fields.items()}))
    return dense, tuple(out)

  def _with_tables(self, params: nnx.State, new: dict[int, jax.Array]) -> nnx.State:
    tables, rest = self.split(params)
    tables = jax.tree_util.tree_map_with_path(lambda path, x: new[path[1].key], tables)
    return nnx.merge_state(rest, tables)

  def caught_up(self, state: Any, flat: dict[int, jax.Array]) -> Any:
    """`state` (a TrainState) with the rows `flat` {layer: flat row ids} of each table
    brought up to this step (catch_up; else `state` itself). Before the step's gather."""
    if not self.catch_up or self.frozen:
      return state
    dense_state, states = state.opt_state
    tables = self.tables(state.params)
    out = [
      catchup_rows(tables[l], s, flat[l], b1=self.b1, b2=self.b2, eps=self.eps) for l, s in zip(self.layers, states)
    ]
    params = self._with_tables(state.params, {l: t for l, (t, _) in zip(self.layers, out)})
    return state.replace(params=params, opt_state=(dense_state, tuple(s for _, s in out)))

  def flushed_params(self, params: nnx.State, opt_state: Any) -> nnx.State:
    """`params` with every table row brought up to the current step (catch_up; else
    `params`): what dense Adam's tables would be. O(table); for evaluation and export."""
    if not self.catch_up or self.frozen:
      return params
    tables = self.tables(params)
    new = {
      l: catchup_flush(tables[l], s, b1=self.b1, b2=self.b2, eps=self.eps)[0] for l, s in zip(self.layers, opt_state[1])
    }
    return self._with_tables(params, new)

  def apply_tables(
    self,
    tables: dict[int, jax.Array],
    states: tuple[SparseRowState, ...],
    sparse: dict[int, tuple[jax.Array, jax.Array, jax.Array]],
    lr: jax.Array,
  ) -> tuple[dict[int, jax.Array], tuple[SparseRowState, ...]]:
    """One row-sparse Adam step per table; `sparse` {layer: `sparse_grad` output}, `lr` the
    backbone lr of this step."""
    lr = self.lr_multiplier * lr
    out = {
      l: apply_row_adam(tables[l], s, sparse[l], lr, b1=self.b1, b2=self.b2, eps=self.eps)
      for l, s in zip(self.layers, states)
    }
    return {l: t for l, (t, _) in out.items()}, tuple(s for _, s in out.values())


def make_table_optimizer(
  cfg: TrainConfig, params: nnx.State
) -> tuple[optax.GradientTransformation | SparseTableOptimizer, Callable]:
  """(optimizer, backbone lr schedule) of a model with device-placed tables: `make_optimizer`
  for `cfg.table_optimizer="dense_adam"` (or a model without Engram tables), else a
  `SparseTableOptimizer`, for replicated and row-sharded tables alike (a row-sharded table's
  per-row state is split like it: `SparseTableOptimizer.state_shardings`)."""
  dense_tx, lr = make_optimizer(cfg, params)
  if cfg.table_optimizer == "dense_adam":
    return dense_tx, lr
  tables, rest = nnx.split_state(params, engram_table_filter(), ...)
  layers = tuple(sorted(path[1].key for path, _ in jax.tree_util.tree_flatten_with_path(tables)[0]))
  if not layers:
    return dense_tx, lr
  dense_rest, _ = make_optimizer(cfg.replace(grad_clip_norm=0.0), rest)
  return SparseTableOptimizer(
    dense_rest,
    layers,
    cfg.engram_lr_multiplier,
    cfg.b1,
    cfg.b2,
    cfg.eps,
    cfg.grad_clip_norm,
    cfg.freeze_engram_tables,
    catch_up=cfg.table_optimizer == "catchup_adam",
  ), lr
