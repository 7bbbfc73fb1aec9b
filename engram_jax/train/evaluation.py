"""Validation with uncertainty: per-sequence sums, the mean loss with its SE, paired files.

The eval steps here return per-row sums (one row = one validation sequence) instead of
batch totals, so the mean loss gets a standard error clustered by sequence
(`engram_jax.train.stats`), and two models evaluated on the same rows can be compared
pairwise. `save_rows` / `load_rows` keep those per-row sums beside a run
(`<workdir>/val_rows.npz`) with a fingerprint of the tokens they scored, so a paired
difference is refused between runs that were not scored on the same tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.data import make_eval_batches
from engram_jax.models.offloaded import OffloadedEngram
from engram_jax.train import stats
from engram_jax.train.loss import batch_forward, token_losses
from engram_jax.train.state import TrainState

ROWS_FILE = "val_rows.npz"
ROW_KEYS = ("loss_sum", "tokens", "correct", "bytes")


def row_sums(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
  """float32 [B] per row: summed loss, scored tokens, correct argmaxes, target bytes."""
  mask = batch["loss_mask"].astype(jnp.float32)
  targets = batch["targets"]
  out = {
    "loss_sum": jnp.sum(token_losses(logits, targets) * mask, axis=-1),
    "tokens": jnp.sum(mask, axis=-1),
    "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * mask, axis=-1),
  }
  tb = batch.get("target_bytes")
  out["bytes"] = jnp.zeros_like(out["tokens"]) if tb is None else jnp.sum(tb * mask, axis=-1).astype(jnp.float32)
  return out


def make_row_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, dict, dict | None], dict]:
  """(state, batch, engram_rows=None) -> `row_sums` of the model's logits; `engram_rows`
  {layer: [B, T, H*d_h]} holds the rows gathered from host / cached row stores (they take
  precedence over the batch's ids of those layers)."""

  def step(state: TrainState, batch: dict, engram_rows: dict | None = None):
    model = nnx.merge(graphdef, state.params, state.rest)
    logits, _ = batch_forward(model, batch, batch.get("engram_ids") or None, engram_rows or None)
    return row_sums(logits, batch)

  return step


def concat_rows(parts: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Per-batch row sums -> {key: float64 [num_rows]}."""
  return {k: np.concatenate([np.asarray(p[k], np.float64).reshape(-1) for p in parts]) for k in ROW_KEYS}


def summarize_rows(rows: dict[str, np.ndarray]) -> dict[str, float]:
  """val_loss with val_loss_se (clustered by sequence), perplexity, accuracy, bits/byte."""
  loss, se = stats.clustered_mean_se(rows["loss_sum"], rows["tokens"])
  tokens = float(np.sum(rows["tokens"]))
  out = {
    "val_loss": loss,
    "val_loss_se": se,
    "val_perplexity": math.exp(min(loss, 50.0)),
    "val_accuracy": float(np.sum(rows["correct"])) / tokens,
    "val_tokens": tokens,
    "val_sequences": float(np.sum(rows["tokens"] > 0)),
  }
  if float(np.sum(rows["bytes"])) > 0:
    out["val_bits_per_byte"] = float(np.sum(rows["loss_sum"])) / (math.log(2) * float(np.sum(rows["bytes"])))
  return out


def tokens_fingerprint(batches: Sequence[dict]) -> str:
  """sha256 (16 hex) of the scored tokens and targets of an eval set: equal iff two runs
  were scored on the same tokens in the same rows."""
  h = hashlib.sha256()
  for b in batches:
    for key in ("tokens", "targets", "loss_mask"):
      h.update(np.ascontiguousarray(np.asarray(b[key])).tobytes())
  return h.hexdigest()[:16]


def save_rows(path: str | Path, rows: dict[str, np.ndarray], *, step: int, fingerprint: str) -> Path:
  path = Path(path)
  np.savez(
    path,
    step=np.int64(step),
    fingerprint=np.asarray(fingerprint),
    **{k: np.asarray(rows[k], np.float64) for k in ROW_KEYS},
  )
  return path


def load_rows(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(rows, {"step", "fingerprint"}) of a `save_rows` file (a run directory also works)."""
  path = Path(path)
  if path.is_dir():
    path = path / ROWS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no per-sequence validation sums at {path}: evaluate the run first")
  with np.load(path) as f:
    rows = {k: f[k] for k in ROW_KEYS}
    info = {"step": int(f["step"]), "fingerprint": str(f["fingerprint"])}
  return rows, info


def paired(
  rows_a: dict[str, np.ndarray], info_a: dict, rows_b: dict[str, np.ndarray], info_b: dict
) -> tuple[float, float]:
  """(mean, SE) of loss(a) - loss(b), per token, clustered by sequence; both scored on the
  same tokens (checked by fingerprint)."""
  if info_a["fingerprint"] != info_b["fingerprint"]:
    raise ValueError(
      f"the two runs were evaluated on different tokens (fingerprints "
      f"{info_a['fingerprint']} vs {info_b['fingerprint']}): no paired difference"
    )
  if not np.array_equal(rows_a["tokens"], rows_b["tokens"]):
    raise ValueError("the two runs scored different token counts per sequence")
  return stats.paired_difference(rows_a["loss_sum"], rows_b["loss_sum"], rows_a["tokens"])


def evaluate_run_rows(run: Any, data_config: Any = None) -> tuple[dict[str, np.ndarray], str]:
  """(per-sequence sums, tokens fingerprint) of a loaded run (`train.restore.LoadedRun`) on
  its validation set (or `data_config`'s); the rows of its host row stores
  (load_run(tables="host")) are gathered on the host (`restore.evaluate_run` summarizes these)."""
  data_config = data_config or run.data_config
  batches = make_eval_batches(data_config, run.tokenizer, row_hasher=run.row_hasher)
  graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
  state = TrainState(step=np.int32(run.step), params=params, rest=rest, opt_state=None)
  offloaded = OffloadedEngram(dict(run.stores))
  step = jax.jit(make_row_eval_step(graphdef))
  parts = [jax.device_get(step(state, b, offloaded.gather(b.get("engram_ids") or {}) or None)) for b in batches]
  return concat_rows(parts), tokens_fingerprint(batches)
