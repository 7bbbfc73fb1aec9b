"""The train state pytree and its creation, sharded on a mesh from the logical rules."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax import sharding as sharding_lib
from engram_jax.models.config import ModelConfig
from engram_jax.models.transformer import Transformer


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `rest` holds non-trainable model variables (MoE router biases)."""

  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: Any


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else) of a model."""
  return nnx.split(model, nnx.Param, ...)


def build_model(config: ModelConfig, seed: int) -> Transformer:
  with nnx.use_eager_sharding(False):
    return Transformer(config, rngs=nnx.Rngs(seed))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of annotated variables (and replicated plain arrays)."""
  with_vars = sharding_lib.state_shardings(tree, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: x if isinstance(x, NamedSharding) else replicated, with_vars)


def create_train_state(
  config: ModelConfig, tx_factory, seed: int, mesh: Mesh
) -> tuple[nnx.GraphDef, TrainState, Any, Any]:
  """Builds model and optimizer state directly in their sharded layout.

  Args:
    tx_factory: params -> (optax transformation, lr schedule) (see `make_optimizer`).
  Returns:
    (graphdef, state, state shardings, (tx, lr_schedule)).
  """
  abstract_model = nnx.eval_shape(lambda: build_model(config, seed))
  graphdef, abstract_params, _ = split_model(abstract_model)
  tx, lr = tx_factory(abstract_params)

  def init() -> TrainState:
    model = build_model(config, seed)
    _, params, rest = split_model(model)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init)
  shardings = tree_shardings(abstract_state, mesh)
  if hasattr(tx, "state_shardings"):  # a SparseTableOptimizer: per-row state split like its tables
    shardings = shardings.replace(opt_state=tx.state_shardings(shardings.params, shardings.opt_state))
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings, (tx, lr)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs carrying each array's sharding (targets for checkpoint restore)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def num_params(state: TrainState) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state.params))
