"""Builds a `Trainer` from a run config (shared by the absl entry points; defines no flags)."""

from __future__ import annotations

import jax

from experiments.configs import common


def build_trainer(config, workdir: str, *, data_shards: int | None = None, model_config=None):
  """A `Trainer` for a run config on a mesh of all devices of all processes (see config.mesh).

  `data_shards`: document streams of the global batch (default one per data group of
  processes; see `engram_jax.train.multihost`). `model_config`: a `ModelConfig` to train
  instead of the config's own (e.g. `sweep_lib.engram_at_slots`).
  """
  from engram_jax import sharding as sharding_lib
  from engram_jax.train.trainer import Trainer

  axes = common.mesh_axes(config, jax.device_count())  # global: every process's devices
  mesh = sharding_lib.make_mesh(**axes)
  return Trainer(
    model_config or common.model_config(config),
    common.train_config(config),
    common.data_config(config),
    workdir,
    seed=config.seed,
    mesh=mesh,
    compress_tokens=common.compress_tokens(config),
    data_shards=data_shards,
  )
