"""Next-token cross-entropy with a loss mask, and the sums evaluation aggregates."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy [B, T] (nats) of float32 logits [B, T, V]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def masked_lm_loss(
  logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the tokens where loss_mask is 1, plus sums for logging."""
  mask = loss_mask.astype(jnp.float32)
  ce = token_losses(logits, targets) * mask
  tokens = jnp.sum(mask)
  loss = jnp.sum(ce) / jnp.maximum(tokens, 1.0)
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) * mask)
  return loss, {"loss_sum": jnp.sum(ce), "tokens": tokens, "correct": correct}


def batch_forward(model, batch: dict, engram_ids=None, engram_rows=None) -> tuple[jax.Array, dict]:
  """`model(tokens, engram_ids, positions, segment_ids, engram_rows)` on a batch dict:
  (logits [B, T, V], aux); a layer's `engram_rows` {layer: [B, T, H*d_h]} take precedence
  over its `engram_ids`."""
  return model(
    batch["tokens"],
    engram_ids,
    positions=batch.get("positions"),
    segment_ids=batch.get("segment_ids"),
    engram_rows=engram_rows,
  )


def batch_loss(model, batch: dict, engram_ids=None, engram_rows=None) -> tuple[jax.Array, tuple]:
  """The train objective on a batch: (lm loss + MoE balance loss, (lm_loss, sums, aux)),
  `sums` from `masked_lm_loss`, `aux` the model's."""
  logits, aux = batch_forward(model, batch, engram_ids, engram_rows)
  lm_loss, sums = masked_lm_loss(logits, batch["targets"], batch["loss_mask"])
  return lm_loss + aux["balance_loss"], (lm_loss, sums, aux)


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
  """loss, perplexity, bits per byte and accuracy from summed eval statistics."""
  tokens = max(float(sums["tokens"]), 1.0)
  loss = float(sums["loss_sum"]) / tokens
  out = {
    "val_loss": loss,
    "val_perplexity": math.exp(min(loss, 50.0)),
    "val_accuracy": float(sums["correct"]) / tokens,
    "val_tokens": tokens,
  }
  if float(sums.get("bytes", 0.0)) > 0:
    out["val_bits_per_byte"] = float(sums["loss_sum"]) / (math.log(2) * float(sums["bytes"]))
  return out
