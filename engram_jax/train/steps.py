"""Train and eval steps, compiled with `jax.jit` and shardings from the logical rules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from engram_jax import sharding as sharding_lib
from engram_jax.models.transformer import updated_router_biases
from engram_jax.offload.indexing import RowIndex, check_int32_rows
from engram_jax.offload.sparse_adam import sparse_grad
from engram_jax.train.loss import batch_loss
from engram_jax.train.optimizer import SparseTableOptimizer
from engram_jax.train.state import TrainState

Batch = dict[str, Any]


def batch_shardings(batch: Batch, mesh: Mesh) -> Any:
  """Batch dimension over the data-parallel axes; everything else replicated."""

  def one(x):
    names = ("batch", "sequence") + (None,) * (len(x.shape) - 2)
    return NamedSharding(mesh, sharding_lib.logical_to_spec(names, mesh, x.shape))

  return jax.tree.map(one, batch)


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation | SparseTableOptimizer,
  lr_schedule: Callable,
  *,
  bias_update_rate: float = 0.0,
  store_rows: Mapping[int, RowIndex] | None = None,
  grad_clip_norm: float | None = None,
  sparse_size: int | None = None,
) -> Callable[..., tuple[TrainState, dict, dict]]:
  """The one optimizer step of every table placement: loss + MoE balance loss, clipped
  AdamW/Adam groups, then the auxiliary-loss-free router-bias update (outside the optimizer).

      step(state, batch, engram_rows=None) -> (state, metrics, row_grads)

  Tables whose rows live in the model (device row stores) are updated here by `tx`, from
  `make_table_optimizer`: an optax transformation over every param (dense Adam on the
  tables, the reference), or a `SparseTableOptimizer`: its tables' rows are gathered here,
  the loss is differentiated w.r.t. those rows and the tables get row-sparse Adam
  (O(tokens), not O(table rows)).

  `store_rows` {layer: RowIndex} names the layers whose rows come from a row store outside
  the model (host / cached): their gathered rows enter as `engram_rows` {layer: [B, T,
  H*d_h]}, and their row gradients come back in `row_grads` {layer: `sparse_grad` output
  (unique int32 [S], summed [S, d_h], count int32 [])} for the store to apply; `tx` then
  holds no global-norm clip (`make_table_optimizer(cfg.replace(grad_clip_norm=0), ...)`)
  and `grad_clip_norm` clips dense and row grads together (the norm of the dense table
  gradient). `sparse_size`: slots of each store layer's `sparse_grad` (default B*T*H).
  `row_grads` is {} without store layers. Metrics add `engram_rows_touched_<layer>` for
  every row-sparse layer, and `moe_max_load` / `moe_dropped` for MoE models."""
  sparse_tx = tx if isinstance(tx, SparseTableOptimizer) else None
  store_rows = dict(store_rows or {})
  if store_rows and sparse_tx is None and grad_clip_norm is None:
    raise ValueError("make_train_step: store_rows needs grad_clip_norm (the clip over dense and row grads)")
  if grad_clip_norm is None:  # without store rows: the clip of the SparseTableOptimizer (or inside tx)
    grad_clip_norm = sparse_tx.grad_clip_norm if sparse_tx is not None else 0.0
  for l, index in store_rows.items():
    check_int32_rows(index.num_rows + 1, f"row store of Engram layer {l} (device ids are int32)")

  def step(state: TrainState, batch: Batch, engram_rows: Mapping[int, jax.Array] | None = None):
    all_ids = batch.get("engram_ids") or {}
    rows = dict(engram_rows or {})
    missing = sorted(set(store_rows) - set(rows))
    if missing:
      raise ValueError(f"engram_rows lacks the row-store Engram layers {missing}")
    flat = {l: index.flat_jnp(all_ids[l])[0] for l, index in store_rows.items()}
    params, tables = state.params, None
    if sparse_tx is not None:
      model = nnx.merge(graphdef, state.params, state.rest)
      for l in sparse_tx.layers:
        flat[l] = model.blocks[l].engram.flat_row_ids(all_ids[l])
      # catchup_adam: the batch's rows brought up to this step before they are read
      state = sparse_tx.caught_up(state, {l: flat[l] for l in sparse_tx.layers})
      tables, params = sparse_tx.split(state.params)
      model = nnx.merge(graphdef, state.params, state.rest)
      for l in sparse_tx.layers:
        rows[l] = model.blocks[l].engram.lookup(all_ids[l])

    def loss_fn(params, rows):
      parts = (params, state.rest) if tables is None else (params, tables, state.rest)
      return batch_loss(nnx.merge(graphdef, *parts), batch, all_ids or None, rows or None)

    (total, (lm_loss, sums, aux)), (grads, row_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      params, rows
    )
    lr = lr_schedule(state.step)
    metrics, sparse = {}, {}
    for l in flat:  # summed in the table's dtype, as the dense gradient's scatter-add is
      g = row_grads[l].reshape(flat[l].shape + (-1,))
      if l in store_rows:
        sparse[l] = sparse_grad(flat[l], g, store_rows[l].num_rows, sparse_size)
      else:
        table = sparse_tx.tables(state.params)[l]
        sparse[l] = sparse_grad(flat[l], g.astype(table.dtype), table.shape[0])
      metrics[f"engram_rows_touched_{l}"] = sparse[l][2]
    if not sparse:
      grad_norm = optax.global_norm(grads)
      updates, opt_state = tx.update(grads, state.opt_state, params)
      params = optax.apply_updates(params, updates)
    else:
      if sparse_tx is not None and sparse_tx.frozen:  # as make_optimizer zeroes frozen table grads
        sparse = {l: s for l, s in sparse.items() if l in store_rows}
      grads, sparse, grad_norm = clip_with_row_grads(grads, sparse, grad_clip_norm)
      dense_tx, dense_state = (tx, state.opt_state) if sparse_tx is None else (sparse_tx.dense, state.opt_state[0])
      updates, opt_state = dense_tx.update(grads, dense_state, params)
      params = optax.apply_updates(params, updates)
      if sparse_tx is not None:
        params, opt_state = _device_table_update(sparse_tx, state, tables, params, opt_state, sparse, lr)
    rest = state.rest
    if aux["router"]:
      rest = updated_router_biases(state.rest, aux["router"], bias_update_rate)
    metrics.update(step_metrics(lm_loss, total, sums, aux, grad_norm, lr))
    new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
    return new_state, metrics, {l: sparse[l] for l in store_rows}

  return step


def step_metrics(lm_loss, total, sums: dict, aux: dict, grad_norm, lr) -> dict[str, jax.Array]:
  """The metrics of a train step (traceable): loss, total_loss, balance_loss, grad_norm, lr,
  tokens, and `moe_max_load` / `moe_dropped` for MoE models, `engram_gate_mean` for Engram
  models (from the model's `aux`)."""
  metrics = {
    "loss": lm_loss,
    "total_loss": total,
    "balance_loss": aux["balance_loss"],
    "grad_norm": grad_norm,
    "lr": lr,
    "tokens": sums["tokens"],
  }
  if aux["router"]:
    loads = jnp.stack([s["load"] for s in aux["router"].values()])
    metrics["moe_max_load"] = jnp.max(loads) * loads.shape[-1]  # 1.0 = perfectly balanced
    metrics["moe_dropped"] = sum(s["dropped"] for s in aux["router"].values()).astype(jnp.float32)
  if aux["engram_gates"]:
    metrics["engram_gate_mean"] = jnp.mean(jnp.stack([g.mean() for g in aux["engram_gates"].values()]))
  return metrics


def clip_with_row_grads(grads: Any, sparse: dict, clip_norm: float) -> tuple[Any, dict, jax.Array]:
  """Global-norm clip over dense grads and `sparse_grad` outputs {layer: (rows, summed, count)}
  together (the norm the dense table gradient would have). Returns (grads, sparse, norm
  before clipping); clip_norm <= 0: no clip."""
  summed = {l: s[1] for l, s in sparse.items()}
  norm = optax.global_norm((grads, summed))
  if clip_norm > 0:
    (grads, summed), _ = optax.clip_by_global_norm(clip_norm).update((grads, summed), optax.EmptyState())
    sparse = {l: (s[0], summed[l], s[2]) for l, s in sparse.items()}
  return grads, sparse, norm


def _device_table_update(
  tx: SparseTableOptimizer, state: TrainState, tables: nnx.State, params: nnx.State, dense_state, sparse: dict, lr
) -> tuple[nnx.State, Any]:
  """Row-sparse Adam on the device tables of `tx`: (all params, opt state)."""
  table_states = state.opt_state[1]
  if not tx.frozen:
    new_tables, table_states = tx.apply_tables(tx.tables(state.params), table_states, sparse, lr)
    tables = jax.tree_util.tree_map_with_path(lambda path, x: new_tables[path[1].key], tables)
  return nnx.merge_state(params, tables), (dense_state, table_states)
