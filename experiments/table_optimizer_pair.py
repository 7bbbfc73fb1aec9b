r"""Dense vs row-sparse Adam on device Engram tables: a paired comparison on the same tokens.

  PYTHONPATH=. python -m experiments.table_optimizer_pair --workdir=runs/table_optimizer \
      [--config=experiments/configs/tiny.py:engram] [--steps=200] [--eval_batches=32] [--slots=30000] \
      [--optimizers=dense_adam,catchup_adam] [--seed=0]

Trains the config once per `TrainConfig.table_optimizer` in `--optimizers` from the same
init on the same batches (`--seed` sets both the init and the data order), then evaluates
every final model on the same validation sequences and prints each one's loss and the
paired difference to the first optimizer (the reference), mean over sequences +- its
standard error (sequences are the independent units; tokens within one are correlated). A
difference is claimed only beyond 2 SE.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from engram_jax.data import make_eval_batches
from engram_jax.train.restore import load_run
from experiments import sweep_lib
from experiments.runner import build_trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py:engram", "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/table_optimizer", "Where the two runs go.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps of each run.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 32, "Validation batches of the comparison.")
_SLOTS = flags.DEFINE_integer(
  "slots",
  0,
  "Engram rows per head on the config's MoE backbone (sweep_lib.engram_at_slots); 0: the config's allocated Engram.",
)
_OPTIMIZERS = flags.DEFINE_list(
  "optimizers", ["dense_adam", "catchup_adam"], "TrainConfig.table_optimizer values; the first is the reference."
)
_SEED = flags.DEFINE_integer("seed", None, "Model init and data-order seed (default: the config's).")


def sequence_losses(run, batches) -> np.ndarray:
  """Mean next-token loss of every validation sequence [N] (masked tokens only)."""

  @jax.jit
  def per_token(tokens, ids, targets, positions, segment_ids):
    logits, _ = run.model(tokens, ids, positions=positions, segment_ids=segment_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)

  out = []
  for b in batches:
    loss = np.asarray(per_token(b["tokens"], b["engram_ids"], b["targets"], b.get("positions"), b.get("segment_ids")))
    mask = np.asarray(b["loss_mask"])
    out.append((loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1))
  return np.concatenate(out)


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  workdir = Path(_WORKDIR.value)
  losses, trainers = {}, {}
  optimizers = _OPTIMIZERS.value
  for opt in optimizers:
    config = _CONFIG.value.copy_and_resolve_references()
    if _SEED.value is not None:
      config.seed = config.data.seed = _SEED.value
    config.train.table_optimizer = opt
    config.train.total_steps = _STEPS.value
    config.train.warmup_steps = min(config.train.warmup_steps, _STEPS.value // 10)
    config.train.progress_bar = False
    model = sweep_lib.engram_at_slots(config, _SLOTS.value) if _SLOTS.value else None
    trainer = build_trainer(config, str(workdir / opt), model_config=model)
    result = trainer.run()
    trainers[opt] = trainer
    print(f"{opt}: {result.step} steps, {result.tokens_per_second:,.0f} tokens/s, val {result.eval}", flush=True)
  first = trainers[optimizers[0]]
  data = first.data_config.replace(num_eval_batches=_EVAL_BATCHES.value)
  batches = make_eval_batches(data, first.tokenizer, row_hasher=first.row_hasher)
  for opt in optimizers:
    losses[opt] = sequence_losses(load_run(workdir / opt), batches)
  ref = optimizers[0]
  n = losses[ref].size
  tokens = int(sum(np.asarray(b["loss_mask"]).sum() for b in batches))
  summary = {
    "steps": _STEPS.value,
    "slots_per_head": _SLOTS.value or "allocated",
    "seed": _SEED.value,
    "sequences": n,
    "tokens": tokens,
    **{f"{o}_loss": float(losses[o].mean()) for o in optimizers},
    "devices": str(jax.devices()),
  }
  for opt in optimizers[1:]:
    diff = losses[opt] - losses[ref]
    se = float(diff.std(ddof=1) / np.sqrt(n))
    summary[f"diff_{opt}_minus_{ref}"], summary[f"diff_{opt}_se"] = float(diff.mean()), se
    verdict = "no difference beyond 2 SE" if abs(diff.mean()) <= 2 * se else "better" if diff.mean() < 0 else "worse"
    print(f"{opt} - {ref} = {diff.mean():+.4f} +- {se:.4f} (SE, {n} sequences, {tokens:,} tokens): {verdict}")
  print(json.dumps(summary, indent=1))
  (workdir / "pair.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
  app.run(main)
