"""Train and eval steps, compiled with `jax.jit` and shardings from the logical rules."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from engram_jax import sharding as sharding_lib
from engram_jax.models.transformer import updated_router_biases
from engram_jax.offload.sparse_adam import sparse_grad
from engram_jax.train.loss import masked_lm_loss
from engram_jax.train.optimizer import SparseTableOptimizer
from engram_jax.train.state import TrainState

Batch = dict[str, Any]


def batch_shardings(batch: Batch, mesh: Mesh) -> Any:
  """Batch dimension over the data-parallel axes; everything else replicated."""

  def one(x):
    names = ("batch", "sequence") + (None,) * (len(x.shape) - 2)
    return NamedSharding(mesh, sharding_lib.logical_to_spec(names, mesh, x.shape))

  return jax.tree.map(one, batch)


def model_inputs(batch: Batch) -> tuple[tuple, dict]:
  return (batch["tokens"], batch.get("engram_ids") or None), {
    "positions": batch.get("positions"),
    "segment_ids": batch.get("segment_ids"),
  }


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation | SparseTableOptimizer,
  lr_schedule: Callable,
  *,
  bias_update_rate: float = 0.0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """One optimizer step: loss + MoE balance loss, clipped AdamW/Adam groups, then the
  auxiliary-loss-free router-bias update (outside the optimizer).

  `tx` from `make_table_optimizer`: an optax transformation over every param (dense Adam on
  the tables), or a `SparseTableOptimizer`: its tables' rows are gathered here, the loss is
  differentiated w.r.t. those rows and the tables get row-sparse Adam (O(tokens), not
  O(table rows); metrics add `engram_rows_touched_<layer>`)."""
  sparse_tx = tx if isinstance(tx, SparseTableOptimizer) else None

  def step(state: TrainState, batch: Batch):
    if sparse_tx is None:
      params, tables, ids, rows = state.params, None, batch.get("engram_ids") or None, {}
    else:
      model = nnx.merge(graphdef, state.params, state.rest)
      all_ids = batch["engram_ids"]
      ids = {l: v for l, v in all_ids.items() if l not in sparse_tx.layers} or None
      flat = {l: model.blocks[l].engram.flat_row_ids(all_ids[l]) for l in sparse_tx.layers}
      state = sparse_tx.caught_up(state, flat)  # catchup_adam: the batch's rows brought to this step
      tables, params = sparse_tx.split(state.params)
      model = nnx.merge(graphdef, state.params, state.rest)
      rows = {l: model.blocks[l].engram.lookup(all_ids[l]) for l in sparse_tx.layers}

    def loss_fn(params, rows):
      model = (
        nnx.merge(graphdef, params, state.rest) if tables is None else nnx.merge(graphdef, params, tables, state.rest)
      )
      logits, aux = model(
        batch["tokens"],
        ids,
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        engram_rows=rows or None,
      )
      lm_loss, sums = masked_lm_loss(logits, batch["targets"], batch["loss_mask"])
      return lm_loss + aux["balance_loss"], (lm_loss, sums, aux)

    (total, (lm_loss, sums, aux)), (grads, row_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      params, rows
    )
    lr = lr_schedule(state.step)
    metrics = {}
    if sparse_tx is None:
      grad_norm = optax.global_norm(grads)
      updates, opt_state = tx.update(grads, state.opt_state, params)
      params = optax.apply_updates(params, updates)
    else:
      params, opt_state, grad_norm = _sparse_table_update(
        sparse_tx, state, tables, params, grads, flat, row_grads, lr, metrics
      )
    rest = state.rest
    if aux["router"]:
      rest = updated_router_biases(state.rest, aux["router"], bias_update_rate)
    metrics.update(
      {
        "loss": lm_loss,
        "total_loss": total,
        "balance_loss": aux["balance_loss"],
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": sums["tokens"],
      }
    )
    if aux["router"]:
      loads = jnp.stack([s["load"] for s in aux["router"].values()])
      metrics["moe_max_load"] = jnp.max(loads) * loads.shape[-1]  # 1.0 = perfectly balanced
      metrics["moe_dropped"] = sum(s["dropped"] for s in aux["router"].values()).astype(jnp.float32)
    if aux["engram_gates"]:
      metrics["engram_gate_mean"] = jnp.mean(jnp.stack([g.mean() for g in aux["engram_gates"].values()]))
    new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
    return new_state, metrics

  return step


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


def _sparse_table_update(
  tx: SparseTableOptimizer,
  state: TrainState,
  tables: nnx.State,
  params: nnx.State,
  grads: nnx.State,
  flat: dict,
  row_grads: dict,
  lr: jax.Array,
  metrics: dict,
) -> tuple[nnx.State, Any, jax.Array]:
  """The `SparseTableOptimizer` half of a step: (all params, opt state, grad norm)."""
  dense_state, table_states = state.opt_state
  table_values = tx.tables(state.params)
  sparse = {}
  for l in tx.layers:
    # summed in the table's dtype, as the dense gradient's scatter-add is
    g = row_grads[l].reshape(flat[l].shape + (-1,)).astype(table_values[l].dtype)
    sparse[l] = sparse_grad(flat[l], g, table_values[l].shape[0])
    metrics[f"engram_rows_touched_{l}"] = sparse[l][2]
  if tx.frozen:
    sparse = {}  # as make_optimizer zeroes frozen table grads before its clip
  grads, sparse, grad_norm = clip_with_row_grads(grads, sparse, tx.grad_clip_norm)
  updates, dense_state = tx.dense.update(grads, dense_state, params)
  params = optax.apply_updates(params, updates)
  if not tx.frozen:
    new_tables, table_states = tx.apply_tables(table_values, table_states, sparse, lr)
    tables = jax.tree_util.tree_map_with_path(lambda path, x: new_tables[path[1].key], tables)
  return nnx.merge_state(params, tables), (dense_state, table_states), grad_norm


def compile_steps(
  graphdef, tx, lr_schedule, state_shardings, example_batch: Batch, mesh: Mesh, *, bias_update_rate: float = 0.0
):
  """jit-compiled train step with explicit shardings (the state is donated), and the batch's shardings."""
  b_shard = batch_shardings(example_batch, mesh)
  train = jax.jit(
    make_train_step(graphdef, tx, lr_schedule, bias_update_rate=bias_update_rate),
    in_shardings=(state_shardings, b_shard),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )
  return train, b_shard
