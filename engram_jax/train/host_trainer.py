"""Training with host-placed Engram tables: the one train step with row stores outside it.

Per step:
  1. (host, overlapped) the rows of the batch are gathered from the layers' row stores
     (`OffloadedEngram.prefetcher`); they enter the model as `engram_rows`.
  2. (device, jit) `steps.make_train_step(store_rows=...)`: loss and grads w.r.t. the dense
     params AND the gathered rows; each host layer's row grads are reduced by `sparse_grad`
     to (unique flat rows, summed grads, count); the global-norm clip covers dense + sparse
     grads together (the same norm as the dense table gradient's); the dense optimizer
     (`make_optimizer` without the host tables and without its own clip) updates the rest.
  3. (host) each store applies its row grads (`HostRowStore.apply`: `SparseRowAdam` on the
     table and its m, v, count, NumPy, in place) at lr = engram_lr_multiplier *
     schedule(step), with the TrainConfig's b1, b2, eps and no weight decay; cached rows
     are refreshed.

Data parallelism (`HostTableTrainer(..., mesh=)`, one process, a mesh with only the data /
fsdp axes > 1): the dense state is placed on the mesh by the logical rules, each batch and
its gathered rows [B, T, H*d_h] are split over the batch axes (the host copies each device
its part), `sparse_grad` reduces the row grads over the whole batch inside the step and
returns them replicated, so the host fetches them once. Losses equal the one-device run's
up to float summation order (tested). Several processes: `sharded_host_trainer` (each
process holds its rows of every table), which the `Trainer` uses there.

Equivalence: when every row of a host table is touched at every step this equals
device-placement training with dense Adam on the table (tested). Rows not touched at a
step differ: sparse Adam leaves them and their m, v exactly unchanged, dense Adam decays
m, v and keeps moving a row by lr * m_hat / (sqrt(v_hat) + eps) while its m != 0 (see
sparse_adam.py). Never-touched rows are unchanged under both.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax import sharding as sharding_lib
from engram_jax.models import engram_table, engram_table_filter
from engram_jax.models.offloaded import OffloadedEngram, split_tables
from engram_jax.models.transformer import Transformer
from engram_jax.offload.placement import TablePlacement
from engram_jax.offload.prefetch import patch_updated_rows
from engram_jax.offload.sparse_adam import SparseRowAdam
from engram_jax.train import multihost
from engram_jax.train.config import TrainConfig
from engram_jax.train.optimizer import make_table_optimizer
from engram_jax.train.state import TrainState, tree_shardings
from engram_jax.train.steps import batch_shardings, make_train_step

Batch = dict[str, Any]


def split_params(model: Transformer, host_layers: Iterable[int]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params without host tables, rest incl. the size-0 placeholders)."""
  dense = nnx.All(nnx.Param, nnx.Not(engram_table_filter(host_layers)))
  return nnx.split(model, dense, ...)


def dense_optimizer(cfg: TrainConfig, params: nnx.State) -> tuple[Any, Callable]:
  """(optimizer, lr schedule) of the params without host tables: `make_table_optimizer`
  (so device tables beside host ones get `cfg.table_optimizer` too) without its global-norm
  clip, which the step applies over dense + row grads together."""
  return make_table_optimizer(cfg.replace(grad_clip_norm=0.0), params)


def table_lr(cfg: TrainConfig, lr_schedule: Callable, step: int) -> float:
  """The host tables' learning rate at `step`: float32 like the dense group's
  `engram_lr_multiplier * lr(count)` inside optax."""
  return float(jnp.float32(cfg.engram_lr_multiplier) * lr_schedule(jnp.int32(step)))


def table_adam(cfg: TrainConfig) -> SparseRowAdam:
  """The host tables' `SparseRowAdam`: b1, b2, eps of `cfg`, no weight decay."""
  return SparseRowAdam(lr=cfg.learning_rate * cfg.engram_lr_multiplier, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


class HostTableTrainer:
  """Training state, jitted step and host optimizer of a model with host-placed tables.

      trainer = HostTableTrainer(model, "host", train_config, bias_update_rate=rate)
      history = trainer.train(batches)          # prefetches the rows of step t+1
      params = trainer.full_params()            # dense params + host tables, for export

  Args:
    model: a `Transformer` (split in place by `split_tables`; the trainer copies its
      dense params, so `model` stays usable but is not updated by training).
    placements, frequencies: see `split_tables`. Or, for a model already split (e.g. by
      `build_offloaded`, which never puts the tables on the device), its
      `OffloadedEngram` (frequencies are then unused).
    cfg: the run's TrainConfig (dense groups and the table lr / b1 / b2 / eps).
    bias_update_rate: MoE router bias step, as for `make_train_step`.
    sparse_size: see `make_train_step`.
    mesh: a single-process data-parallel mesh (axes other than data / fsdp of size 1) to
      train on (see the module docstring); None: the tables' device alone.
    reuse_step_of: another trainer of the same model config, host layers, TrainConfig,
      rate, sparse_size and mesh (placements may differ: "host" vs "cached" run the same
      device step): reuse its optimizer and compiled step instead of compiling again.
  """

  def __init__(
    self,
    model: Transformer,
    placements: str | Mapping[int, TablePlacement] | OffloadedEngram,
    cfg: TrainConfig,
    *,
    frequencies: Mapping[int, np.ndarray] | None = None,
    bias_update_rate: float = 0.0,
    sparse_size: int | None = None,
    mesh: Mesh | None = None,
    reuse_step_of: HostTableTrainer | None = None,
  ):
    check_data_parallel_mesh(mesh)
    self.mesh = mesh
    if isinstance(placements, OffloadedEngram):
      self.model, self.offloaded = model, placements
      _check_split(model, placements)
    else:
      self.model, self.offloaded = split_tables(model, placements, frequencies=frequencies)
    if not self.offloaded.host_layers:
      raise ValueError("HostTableTrainer needs at least one 'host' or 'cached' Engram layer")
    self.cfg = cfg
    adam = table_adam(cfg)
    for store in self.offloaded.host_stores.values():
      store.init_optimizer(adam)
    self.graphdef, params, rest = split_params(self.model, self.offloaded.host_layers)
    # The step donates its state: own copies, so the arrays `model` (or a clone of it)
    # shares are not deleted under the caller. Drop `model` to free the originals.
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    self._step_key = (model.config, self.offloaded.host_layers, cfg, bias_update_rate, sparse_size, mesh)
    if reuse_step_of is not None:
      if reuse_step_of._step_key != self._step_key:
        raise ValueError(
          "reuse_step_of: the other trainer differs in model config, host layers, "
          "TrainConfig, bias_update_rate, sparse_size or mesh"
        )
      self.tx, self.lr_schedule = reuse_step_of.tx, reuse_step_of.lr_schedule
    else:
      self.tx, self.lr_schedule = dense_optimizer(cfg, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=self.tx.init(params))
    if mesh is None:
      # Committed to the rows' device like the step's outputs (else step 2 compiles again).
      self.state = jax.device_put(state, next(iter(self.offloaded.tables.values())).device)
      out_shardings = None
    else:
      state_sh = tree_shardings(state, mesh)
      self.state = jax.device_put(state, state_sh)
      # metrics and sparse grads replicated: the host reads one copy
      replicated = NamedSharding(mesh, PartitionSpec())
      out_shardings = (state_sh, replicated, replicated)
    del state
    if reuse_step_of is not None:
      self.train_step = reuse_step_of.train_step
    else:
      step_fn = make_train_step(
        self.graphdef,
        self.tx,
        self.lr_schedule,
        bias_update_rate=bias_update_rate,
        store_rows={l: s.index for l, s in self.offloaded.host_stores.items()},
        grad_clip_norm=cfg.grad_clip_norm,
        sparse_size=sparse_size,
      )
      jit_kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
      self.train_step = jax.jit(step_fn, donate_argnums=(0,), **jit_kwargs)

  def context(self):
    """`jax.set_mesh(mesh)` (activation sharding constraints) or nothing without a mesh."""
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def row_sharding(self, shape: tuple[int, ...]) -> jax.sharding.Sharding | None:
    """Where rows [B, ...] go: split over the mesh's batch axes (None without a mesh)."""
    if self.mesh is None:
      return None
    names = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(self.mesh, sharding_lib.logical_to_spec(names, self.mesh, shape))

  def put_batch(self, batch: Batch) -> Batch:
    """A host batch as the step takes it: split over the mesh's batch axes (with a mesh)."""
    if self.mesh is None:
      return batch
    return jax.device_put(batch, batch_shardings(batch, self.mesh))

  def gather(self, engram_ids: Mapping[int, Any]) -> dict[int, jax.Array]:
    """The host layers' rows {layer: [B, T, H*d_h]}, placed as the step takes them."""
    return self.offloaded.gather(engram_ids, sharding=self._row_placement())

  def _row_placement(self):
    return None if self.mesh is None else self.row_sharding

  def step(self, batch: Batch, rows: Mapping[int, jax.Array] | None = None) -> tuple[dict, dict[int, np.ndarray]]:
    """One full step (device, then host update); returns (metrics, {layer: updated ids})."""
    if rows is None:
      rows = self.gather(batch["engram_ids"])
    step = int(self.state.step)
    with self.context():
      self.state, metrics, sparse = self.train_step(self.state, self.put_batch(batch), rows)
    lr = table_lr(self.cfg, self.lr_schedule, step)
    stores = self.offloaded.stores
    return metrics, {l: stores[l].apply(*g, lr) for l, g in jax.device_get(sparse).items()}

  def iterate(self, batches: Iterable[Batch], *, depth: int = 1) -> Iterator[dict]:
    """Steps over `batches`, the host gather of the next batch overlapping this step.

    Rows gathered ahead miss the updates of the steps still running at that time (at most
    `depth`); those rows are re-read (`patch_updated_rows`), so the result equals
    gathering after each update. Yields each step's metrics (device arrays).
    """
    recent = collections.deque(maxlen=depth)
    with self.offloaded.prefetcher(batches, depth=depth, sharding=self._row_placement()) as it:
      for batch, rows in it:
        if recent:
          flat = self.offloaded.flat_ids(batch["engram_ids"])
          rows = dict(rows)
          for l in self.offloaded.host_layers:
            stale = np.concatenate([u[l] for u in recent])
            rows[l] = patch_updated_rows(rows[l], flat[l], stale, self.offloaded.tables[l])
        metrics, updated = self.step(batch, rows)
        recent.append(updated)
        yield metrics

  def train(self, batches: Iterable[Batch], *, depth: int = 1) -> list[dict]:
    """Runs `iterate` to the end; returns the metrics of every step (as host values)."""
    return [jax.device_get(m) for m in self.iterate(batches, depth=depth)]

  def full_params(self) -> nnx.State:
    """All trainable params of the device-placement model (host tables included, as copies)."""
    model = nnx.merge(self.graphdef, self.state.params, self.state.rest)
    self.offloaded.restore_into(model)
    # copies: the step donates the state's buffers
    return jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(model, nnx.Param))

  def host_state(self) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {"table", "m", "v", "count"}} NumPy views for checkpointing the host half."""
    return {l: s.state_dict() for l, s in self.offloaded.host_stores.items()}

  def load_host_state(self, saved: Mapping[int, Mapping[str, np.ndarray]]) -> None:
    """Restores what `host_state` returned (e.g. from a checkpoint); refreshes caches."""
    if sorted(saved) != list(self.offloaded.host_layers):
      raise ValueError(
        f"host state for layers {sorted(saved)}, trainer has host layers {list(self.offloaded.host_layers)}"
      )
    for l, item in saved.items():
      self.offloaded.stores[l].load_state_dict(item)


def check_data_parallel_mesh(mesh: Mesh | None) -> None:
  """`HostTableTrainer` trains on one process; on a mesh, data parallelism only."""
  if mesh is None:
    return
  if jax.process_count() != 1:
    raise NotImplementedError(
      f"HostTableTrainer runs in a single process; got {jax.process_count()} processes. "
      "Several processes split the host tables with ShardedHostTableTrainer (what Trainer "
      "does for table_placement='host'), or use table placement 'device'"
    )
  model_axes = multihost.model_parallel_axes(mesh)
  if model_axes:
    raise NotImplementedError(
      f"training with host-placed Engram tables supports data-parallel meshes (data, fsdp) "
      f"only; the mesh {dict(mesh.shape)} has model-parallel axes {model_axes}. Use a mesh "
      "with tensor=expert=1, or table placement 'device'"
    )


def _check_split(model: Transformer, offloaded: OffloadedEngram) -> None:
  for l in offloaded.host_layers:
    shape = tuple(engram_table(model, l).get_value().shape)
    if shape[0] != 0:
      raise ValueError(
        f"Engram layer {l} is host-placed in the OffloadedEngram but the model "
        f"still holds its table {shape}: pass a model split by split_tables or "
        "build_offloaded"
      )
