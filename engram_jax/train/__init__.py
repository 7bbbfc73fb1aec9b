"""Training: optimizer groups, jitted steps, orbax checkpoints and the loop."""

from engram_jax.train.checkpoint import Checkpointer, CheckpointMismatchError, CorruptCheckpointError, compare_meta
from engram_jax.train.config import TrainConfig
from engram_jax.train.optimizer import learning_rate_schedule, make_optimizer, parameter_labels
from engram_jax.train.run_lock import RunLock, WorkdirLockedError
from engram_jax.train.trainer import RunResult, Trainer, TrainingDivergedError

__all__ = ["CheckpointMismatchError", "Checkpointer", "CorruptCheckpointError", "RunLock", "RunResult",
           "TrainConfig", "Trainer", "TrainingDivergedError", "WorkdirLockedError", "compare_meta", "learning_rate_schedule", "make_optimizer",
           "parameter_labels"]
