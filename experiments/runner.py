"""Builds a `Trainer` from a run config (shared by the absl entry points; defines no flags)."""

from __future__ import annotations

import jax

from experiments.configs import common


def build_trainer(config, workdir: str):
  """A `Trainer` for a run config on a mesh of all devices (see config.mesh)."""
  from engram_jax import sharding as sharding_lib
  from engram_jax.train import Trainer

  axes = common.mesh_axes(config, jax.device_count())
  mesh = sharding_lib.make_mesh(**axes)
  return Trainer(common.model_config(config), common.train_config(config), common.data_config(config),
                 workdir, seed=config.seed, mesh=mesh, compress_tokens=common.compress_tokens(config))
