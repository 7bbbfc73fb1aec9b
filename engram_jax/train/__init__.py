"""Training: optimizer groups, jitted steps, orbax checkpoints and the loop."""

from engram_jax.train.checkpoint import Checkpointer, CheckpointMismatchError, compare_meta
from engram_jax.train.config import TrainConfig
from engram_jax.train.optimizer import learning_rate_schedule, make_optimizer, parameter_labels

# The loop (trainer.py) needs the grain input pipeline; the steps, state and optimizer do
# not. Resolving the loop's names on first access keeps `engram_jax.train.steps` & co.
# importable where grain is not installed (the GPU image: experiments/gpu_check.py).
_LAZY = {"RunResult": "engram_jax.train.trainer", "Trainer": "engram_jax.train.trainer",
         "TrainingDivergedError": "engram_jax.train.trainer"}


def __getattr__(name):
  if name in _LAZY:
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'engram_jax.train' has no attribute {name!r}")


__all__ = ["CheckpointMismatchError", "Checkpointer", "RunResult", "TrainConfig", "Trainer",
           "TrainingDivergedError", "compare_meta", "learning_rate_schedule", "make_optimizer",
           "parameter_labels"]
