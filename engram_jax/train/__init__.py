"""Training: optimizer groups, jitted steps, orbax checkpoints and the loop."""

from engram_jax.train.checkpoint import Checkpointer, CheckpointMismatchError, CorruptCheckpointError, compare_meta
from engram_jax.train.config import TrainConfig
from engram_jax.train.optimizer import learning_rate_schedule, make_optimizer, parameter_labels
from engram_jax.train.run_lock import RunLock, WorkdirLockedError

# The loop (`engram_jax.train.trainer`: Trainer, RunResult, TrainingDivergedError) is not
# re-exported here: it needs the grain input pipeline, and the steps, state, optimizer and
# checkpoints must import where grain is not installed (the GPU image: experiments.gpu_check).

__all__ = [
  "CheckpointMismatchError",
  "Checkpointer",
  "CorruptCheckpointError",
  "RunLock",
  "TrainConfig",
  "WorkdirLockedError",
  "compare_meta",
  "learning_rate_schedule",
  "make_optimizer",
  "parameter_labels",
]
