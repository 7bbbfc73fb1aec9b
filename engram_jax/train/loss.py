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
