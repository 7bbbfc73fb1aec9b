"""Train and eval steps, compiled with `jax.jit` and shardings from the logical rules."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from engram_jax import sharding as sharding_lib
from engram_jax.models.offloaded import apply_offloaded
from engram_jax.models.transformer import updated_router_biases
from engram_jax.train.loss import masked_lm_loss
from engram_jax.train.state import TrainState

Batch = dict[str, Any]


def batch_shardings(batch: Batch, mesh: Mesh) -> Any:
  """Batch dimension over the data-parallel axes; everything else replicated."""
  def one(x):
    names = ("batch", "sequence") + (None,) * (len(x.shape) - 2)
    return NamedSharding(mesh, sharding_lib.logical_to_spec(names, mesh, x.shape))
  return jax.tree.map(one, batch)


def model_inputs(batch: Batch) -> tuple[tuple, dict]:
  return (batch["tokens"], batch.get("engram_rows") or None), {
      "positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr_schedule: Callable,
                    *, bias_update_rate: float = 0.0) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """One optimizer step: loss + MoE balance loss, clipped AdamW/Adam groups, then the
  auxiliary-loss-free router-bias update (outside the optimizer)."""

  def step(state: TrainState, batch: Batch):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest)
      args, kwargs = model_inputs(batch)
      logits, aux = model(*args, **kwargs)
      lm_loss, sums = masked_lm_loss(logits, batch["targets"], batch["loss_mask"])
      return lm_loss + aux["balance_loss"], (lm_loss, sums, aux)

    (total, (lm_loss, sums, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rest = state.rest
    if aux["router"]:
      rest = updated_router_biases(state.rest, aux["router"], bias_update_rate)
    metrics = {
        "loss": lm_loss, "total_loss": total, "balance_loss": aux["balance_loss"],
        "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step),
        "tokens": sums["tokens"],
    }
    if aux["router"]:
      loads = jnp.stack([s["load"] for s in aux["router"].values()])
      metrics["moe_max_load"] = jnp.max(loads) * loads.shape[-1]  # 1.0 = perfectly balanced
      metrics["moe_dropped"] = sum(s["dropped"] for s in aux["router"].values()).astype(jnp.float32)
    if aux["engram_gates"]:
      metrics["engram_gate_mean"] = jnp.mean(jnp.stack([g.mean() for g in aux["engram_gates"].values()]))
    new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
    return new_state, metrics

  return step


def _eval_sums(logits: jax.Array, batch: Batch) -> dict:
  """Summed loss, tokens, correct predictions (and target bytes) of one batch's logits."""
  _, sums = masked_lm_loss(logits, batch["targets"], batch["loss_mask"])
  if "target_bytes" in batch:
    sums["bytes"] = jnp.sum(batch["target_bytes"] * batch["loss_mask"]).astype(jnp.float32)
  return sums


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, Batch], dict]:
  """Summed loss, tokens, bytes and correct predictions of one batch."""

  def step(state: TrainState, batch: Batch):
    model = nnx.merge(graphdef, state.params, state.rest)
    args, kwargs = model_inputs(batch)
    logits, _ = model(*args, **kwargs)
    return _eval_sums(logits, batch)

  return step


def make_host_eval_step(graphdef: nnx.GraphDef, host_layers: tuple[int, ...]
                        ) -> Callable[[TrainState, Batch, dict], dict]:
  """As `make_eval_step` for a model whose `host_layers` tables live in host memory:
  (state, batch, rows {layer: [B, T, d_mem]} gathered from the host tables) -> sums."""
  def step(state: TrainState, batch: Batch, rows: dict):
    device_ids = {l: v for l, v in batch["engram_rows"].items() if l not in host_layers} or None
    logits, _ = apply_offloaded(graphdef, nnx.merge_state(state.params, state.rest),
                                batch["tokens"], device_ids, rows,
                                positions=batch.get("positions"),
                                segment_ids=batch.get("segment_ids"))
    return _eval_sums(logits, batch)

  return step


def compile_steps(graphdef, tx, lr_schedule, state_shardings, example_batch: Batch, mesh: Mesh,
                  *, bias_update_rate: float = 0.0):
  """jit-compiled (train_step, eval_step) with explicit shardings; the state is donated."""
  b_shard = batch_shardings(example_batch, mesh)
  train = jax.jit(make_train_step(graphdef, tx, lr_schedule, bias_update_rate=bias_update_rate),
                  in_shardings=(state_shardings, b_shard), out_shardings=(state_shardings, None),
                  donate_argnums=(0,))
  evaluate = jax.jit(make_eval_step(graphdef), in_shardings=(state_shardings, b_shard))
  return train, evaluate, b_shard
