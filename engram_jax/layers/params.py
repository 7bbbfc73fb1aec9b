"""Parameter creation with logical axis names that works with and without a mesh."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx


def mesh_is_active() -> bool:
  """True inside `jax.set_mesh(...)` (or a sharding-in-types mesh context)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh is not None and not mesh.empty


def annotated(value: jax.Array, names: Sequence[str | None], *, kind: type = nnx.Param, **metadata) -> nnx.Variable:
  """Wraps `value` in `kind` with logical axis `names` as `out_sharding` metadata.

  Outside a mesh the names are only metadata (`engram_jax.sharding` maps them to a mesh
  later); inside `jax.set_mesh` with logical rules active, NNX shards eagerly.
  """
  names = tuple(names)
  if len(names) != value.ndim:
    raise ValueError(f"{len(names)} axis names {names} for a parameter of shape {value.shape}")
  eager = nnx.using_eager_sharding() and mesh_is_active()
  return kind(value, out_sharding=names, eager_sharding=eager, **metadata)
