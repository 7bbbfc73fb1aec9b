"""Logical axis rules and mesh helpers: the one place where logical names meet mesh axes.

Every parameter in engram-jax is annotated with logical axis names (``nnx.with_partitioning``
or ``nnx.Param(..., out_sharding=names)``); activations are constrained with :func:`constrain`.
:data:`LOGICAL_AXIS_RULES` maps each logical name to zero, one or several of the four mesh axes

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters sharded along their ``embed`` dimension
    tensor  model parallelism (heads, FFN width, vocabulary, Engram table rows)
    expert  expert parallelism (routed experts)

Mapping policy (applied by :func:`logical_to_spec`):
  * a mesh axis is used at most once per array: a later dimension asking for an axis that an
    earlier dimension already took is replicated instead (so ``("batch", "sequence", "embed")``
    activations are sharded over batch only);
  * mesh axes of size 1 are dropped, and a mesh axis that does not divide the dimension is
    dropped for that dimension (the dimension is replicated over it) when the shape is known,
    so tiny test models run on any mesh; the chosen specs are visible via ``.sharding.spec``;
  * an unknown logical name is an error (add it to the rules instead of guessing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: The four mesh axes, in mesh order: data parallel, fully sharded data parallel, tensor
#: (model) parallel and expert parallel.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

MeshAxes = str | tuple[str, ...] | None

#: The one set of logical-axis rules: logical name -> mesh axis, axes (tried in order) or None
#: (replicated). Every parameter and activation annotation of the library uses these names.
LOGICAL_AXIS_RULES: dict[str, MeshAxes] = {
  # activations
  "batch": ("data", "fsdp"),
  "sequence": None,
  "activation_embed": None,
  # embeddings and dense weights
  "vocab": "tensor",
  "embed": "fsdp",
  "norm": None,
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "qkv": None,
  "mlp": "tensor",
  # mixture of experts
  "experts": "expert",
  "expert_mlp": "tensor",
  "router": None,
  # hyper-connections (tiny mixing matrices, replicated)
  "hc_streams": None,
  "hc_embed": None,
  "hc_mix": None,
  # Engram: tables sharded by rows over the model-parallel axis, or (the paper's layout,
  # `ModelConfig.engram_table_sharding="all"`) over every device of the mesh
  "engram_rows": "tensor",
  "engram_rows_all": ("data", "fsdp", "tensor", "expert"),
  "engram_dim": None,
  "engram_mem": None,
  "hc": None,
  "conv_taps": None,
  # stacked layers (scan)
  "layers": None,
}


def make_mesh(
  data: int = 1,
  fsdp: int = 1,
  tensor: int = 1,
  expert: int = 1,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A 4-axis ``("data", "fsdp", "tensor", "expert")`` mesh with Auto axis types.

  Uses the first ``data*fsdp*tensor*expert`` devices when ``devices`` is None.
  """
  sizes = (data, fsdp, tensor, expert)
  for name, size in zip(MESH_AXES, sizes):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"mesh axis {name!r} must be a positive int, got {size!r}")
  n = math.prod(sizes)
  if devices is None:
    available = jax.devices()
    if n > len(available):
      raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices, only {len(available)} "
        "available (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)"
      )
    devices = available[:n]
  elif len(devices) != n:
    raise ValueError(f"mesh of {n} devices {sizes} given {len(devices)} devices")
  return jax.make_mesh(
    sizes,
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=list(devices),
  )


def axis_tuple(axes: MeshAxes) -> tuple[str, ...]:
  """One ``PartitionSpec`` entry (None, an axis name or a tuple of them) as a tuple."""
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def logical_to_spec(
  logical_axes: Sequence[str | None] | None,
  mesh: Mesh,
  shape: Sequence[int] | None = None,
  rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
  """Map logical axis names (one per dimension) to a ``PartitionSpec`` on ``mesh``."""
  if not logical_axes:
    return PartitionSpec()
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec: list[Any] = []
  for dim, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(
        f"unknown logical axis name {name!r}; known: {sorted(rules)} (add it to engram_jax.sharding.LOGICAL_AXIS_RULES)"
      )
    chosen: list[str] = []
    extent = 1
    for axis in axis_tuple(rules[name]):
      if axis not in mesh.shape:
        raise ValueError(f"rule {name!r} -> {axis!r}: no such mesh axis in {mesh.axis_names}")
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if shape is not None and shape[dim] % (extent * size) != 0:
        continue
      chosen.append(axis)
      extent *= size
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def named_sharding(
  logical_axes: Sequence[str | None],
  mesh: Mesh,
  shape: Sequence[int] | None = None,
  rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
) -> NamedSharding:
  """``NamedSharding`` for an input or activation, e.g. tokens ``("batch", "sequence")``."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape, rules))


def variable_sharding(
  variable: nnx.Variable, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES
) -> NamedSharding:
  """The ``NamedSharding`` a variable's ``out_sharding`` annotation asks for (replicated
  if it has none)."""
  metadata = variable.get_metadata()
  names = metadata.get("out_sharding") or metadata.get("sharding_names")
  shape = getattr(variable.get_value(), "shape", None)
  return NamedSharding(mesh, logical_to_spec(names, mesh, shape, rules))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings[A](state: A, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> A:
  """Same tree as ``state`` (an ``nnx.State`` or module), each variable's value replaced by
  its ``NamedSharding``."""
  return jax.tree.map(
    lambda v: v.replace(variable_sharding(v, mesh, rules)) if _is_variable(v) else v,
    state,
    is_leaf=_is_variable,
  )


def shard_state[A](state: A, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> A:
  """Place every variable of ``state`` as its annotation says. Inside ``jit`` this is a
  sharding constraint, outside a ``device_put``."""

  def place(v):
    if not _is_variable(v):
      return v
    value = v.get_value()
    sharding = variable_sharding(v, mesh, rules)
    if isinstance(value, jax.core.Tracer):
      return v.replace(jax.lax.with_sharding_constraint(value, sharding))
    return v.replace(jax.device_put(value, sharding))

  return jax.tree.map(place, state, is_leaf=_is_variable)


def create_sharded[A](
  constructor: Callable[[], A], mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES
) -> A:
  """Build an NNX module with every parameter created directly in its sharded layout.

  ``constructor`` is traced once under ``jit``; parameters are initialised on the devices
  that own them (never materialised whole on one device).
  """

  @nnx.jit
  def build():
    with nnx.use_eager_sharding(False):
      module = constructor()
    nnx.update(module, shard_state(nnx.state(module), mesh, rules))
    return module

  with jax.set_mesh(mesh):
    return build()


def abstract_sharded(
  constructor: Callable[[], Any], mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES
) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ``ShapeDtypeStruct``s carrying their target shardings), without
  allocating anything: the target for restoring a checkpoint directly into its layout."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(constructor)
  graphdef, state = nnx.split(abstract)

  def to_struct(v):
    if not _is_variable(v):
      return v
    value = v.get_value()
    sharding = variable_sharding(v, mesh, rules)
    return v.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

  return graphdef, jax.tree.map(to_struct, state, is_leaf=_is_variable)


def shard_module[A](module: A, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> A:
  """Move an existing module's variables to their annotated shardings (in place)."""
  nnx.update(module, shard_state(nnx.state(module), mesh, rules))
  return module


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint for an activation, by logical axis names (one per dimension of x; same shape out).

  A no-op without an active mesh (``jax.set_mesh``) or on a single-device mesh, so layers
  can call it unconditionally.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  if not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  spec = logical_to_spec(logical_axes, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


def spec_of(x: jax.Array) -> PartitionSpec:
  """The ``PartitionSpec`` of a placed array (trailing ``None`` entries removed)."""
  spec = list(x.sharding.spec)
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def num_shards(x: jax.Array) -> int:
  """How many distinct pieces ``x`` is split into across devices (1 = replicated)."""
  indices = x.sharding.devices_indices_map(x.shape).values()
  return len({tuple((s.start, s.stop) for s in index) for index in indices})
