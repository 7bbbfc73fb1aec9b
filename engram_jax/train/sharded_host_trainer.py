"""Training with host-placed Engram tables split over the processes of a multi-process run.

    trainer = ShardedHostTableTrainer(model, cfg, mesh, bias_update_rate=rate)
    history = trainer.train(local_batches)      # this process's rows of every global batch

`Trainer` / `python -m experiments.train` use it for `TrainConfig.table_placement="host"`
in a multi-process run (`trainer._ShardedHostEngine`: metrics, evaluation, verified
checkpoints with each process's shards in the item "host_shards", exact resume).

Every process runs the same loop (after `jax.distributed.initialize`) on a data-parallel
global mesh and feeds its rows of the global batch (`DataConfig.batch_size` per process).
Each host-placed table lives as a `ShardedHostTable`: process p keeps rows [lo_p, hi_p)
and their row-sparse Adam state only (`engram_jax.distributed.host_shards` gives the
protocol). Per step t:
  - (one step ahead) the ids of step t+1 are routed to their owners (`dispatch_route`,
    dispatched before step t, resolved after its update): they come from the data
    pipeline, not from the step;
  - after step t's host update, each process gathers the rows of step t+1 asked of it
    (`serve`: rows read after the update, so never stale);
  - the jitted step moves the rows to their users (`receive_rows`), computes loss and
    grads w.r.t. the dense params and the rows, sends the row grads back to their owners
    (`return_grads`), clips dense + sparse grads by the global norm (the same norm as the
    one-process host step's) and updates the dense params;
  - each process applies `SparseRowAdam` to its rows (the one-process host path's lr, b1,
    b2, eps, no weight decay).
The losses equal the one-process host run's on the same global batch up to float
summation order (tested with 2 `experiments.train` processes in tests/test_host_shards.py).

Limits: every Engram layer must be host-placed here ("host"; "cached", disk and mixed
placements are the one-process `HostTableTrainer`'s); the mesh may split the batch only
(data / fsdp). Built from a `build` callable the tables are initialised shard by shard (each
process draws its rows); given a built model, each process copies its rows out of the whole table.
Checkpoints: `savable_state` (orbax, collective) beside `tables` (`Checkpointer(...,
host_shards=)`); `load_state` takes them back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax.distributed import host_shards
from engram_jax.distributed.host_shards import HostShardPlan, RowRequests, ShardedHostTable
from engram_jax.layers.table_init import LazyTableRows
from engram_jax.models import engram_table_filter
from engram_jax.models.host_init import block_rows, compile_device_init, table_inits
from engram_jax.models.offloaded import resolve_placements, row_indexes, split_tables
from engram_jax.models.transformer import Transformer, updated_router_biases
from engram_jax.offload.sparse_adam import SparseRowAdam
from engram_jax.train import evaluation, multihost
from engram_jax.train.config import TrainConfig
from engram_jax.train.host_trainer import dense_optimizer, split_params
from engram_jax.train.loss import batch_forward, batch_loss
from engram_jax.train.state import TrainState, tree_shardings
from engram_jax.train.steps import batch_shardings, clip_with_row_grads, step_metrics

Batch = dict[str, Any]


def put_global(tree: Any, shardings: Any) -> Any:
  """A tree every process holds in full (same values) -> global arrays on `shardings`."""

  def put(x, s):
    if isinstance(x, optax.MaskedNode):  # an empty optimizer slot (its sharding is unused)
      return x
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(put, tree, shardings, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def local_value(x: jax.Array) -> np.ndarray:
  """A replicated global array's value (any process)."""
  return np.asarray(x.addressable_data(0))


class ShardedHostTableTrainer:
  """Dense state on a data-parallel global mesh, host tables split over the processes.

  Args:
    model: a `Transformer` with Engram layers, identical on every process (same seed); its
      tables are split off in place (`split_tables`) and each process keeps its rows. Or
      `build` () -> Transformer (e.g. `lambda: build_model(config, seed)`): the tables are
      then never whole anywhere, each process draws its rows (see `_build_sharded`).
    cfg: the run's TrainConfig.
    mesh: the global mesh, devices ordered by process, only batch axes (data, fsdp) > 1.
    bias_update_rate: MoE router bias step.
    capacity_factor: request buckets (see `HostShardPlan`); None: exact buckets.
  """

  def __init__(
    self,
    model: Transformer | Callable[[], Transformer],
    cfg: TrainConfig,
    mesh: Mesh,
    *,
    bias_update_rate: float = 0.0,
    capacity_factor: float | None = 1.25,
  ):
    self.mesh = mesh
    axes = multihost.batch_axes(mesh) or ("data",)
    if isinstance(model, Transformer):
      model, offloaded = split_tables(model, "host")
      self.host_layers = offloaded.host_layers
      self.row_index = {l: offloaded.stores[l].index for l in self.host_layers}
      self.plans = {l: HostShardPlan(mesh, axes, self.row_index[l].num_rows, capacity_factor) for l in self.host_layers}
      self.tables = {
        l: ShardedHostTable.from_full(self.plans[l], offloaded.tables[l].numpy()) for l in self.host_layers
      }
      del offloaded  # the full tables go with it: each process keeps its rows only
    else:
      model = self._build_sharded(model, axes, capacity_factor)
    self.graphdef, params, rest = split_params(model, self.host_layers)
    self.tx, self.lr_schedule = dense_optimizer(cfg, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=self.tx.init(params))
    self.state_shardings = tree_shardings(state, mesh)
    self.state = put_global(state, self.state_shardings)
    del state, params, rest, model
    self.adam = SparseRowAdam(
      lr=cfg.learning_rate * cfg.engram_lr_multiplier, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.0
    )
    self.multiplier = cfg.engram_lr_multiplier
    self.bias_update_rate = bias_update_rate
    self.grad_clip_norm = cfg.grad_clip_norm
    self._steps = {}  # (shapes) -> jitted step
    self._eval = None

  def _build_sharded(self, build: Callable[[], Transformer], axes: tuple[str, ...], capacity_factor) -> Transformer:
    """The model from `build` without its tables (`device_state_init`), and this process's
    rows [lo, hi) of each table drawn on their own (`engram_jax.layers.table_init`: bit for
    bit `build()`'s rows; tested), so no process ever holds a whole table."""
    abstract = nnx.eval_shape(build)
    placements = resolve_placements(abstract, "host")
    self.host_layers = tuple(sorted(l for l, p in placements.items() if p.on_host))
    indexes = row_indexes(abstract)
    self.row_index = {l: indexes[l] for l in self.host_layers}
    model = nnx.merge(nnx.graphdef(abstract), compile_device_init(build, self.host_layers, jax.local_devices()[0])())
    inits = table_inits(build, self.host_layers)
    self.plans, self.tables = {}, {}
    for l in self.host_layers:
      plan = self.plans[l] = HostShardPlan(self.mesh, axes, inits[l].shape[0], capacity_factor)
      lo, hi = plan.process_range(jax.process_index())
      rows = LazyTableRows(inits[l], block_rows(inits[l]))
      self.tables[l] = ShardedHostTable(plan, rows[lo:hi])
    return model

  # -- the host side of a step ------------------------------------------------------------------
  def flat_ids(self, batch: Batch) -> dict[int, np.ndarray]:
    """This process's flat host-table ids {layer: np.int64 [b_p, T, H]} (`RowIndex.flat_np`:
    ids checked per head, fold, offsets)."""
    missing = [l for l in self.host_layers if l not in batch["engram_ids"]]
    if missing:
      raise ValueError(f"batch['engram_ids'] lacks host-placed Engram layers {missing}")
    return {l: self.row_index[l].flat_np(batch["engram_ids"][l], f"Engram layer {l}") for l in self.host_layers}

  def request(self, batch: Batch) -> dict[int, RowRequests]:
    """Routes a local batch's ids to their owners (a collective; one step ahead in `train`)."""
    return {l: host_shards.route_requests(self.plans[l], ids) for l, ids in self.flat_ids(batch).items()}

  def lr(self, step: int) -> float:
    """The tables' lr at `step` (float32, as the one-process host optimizer computes it)."""
    return float(jnp.float32(self.multiplier) * self.lr_schedule(jnp.int32(step)))

  def step(self, batch: Batch, requests: Mapping[int, RowRequests] | None = None) -> dict:
    """One step on this process's rows of the global batch; returns its metrics (host values)."""
    if requests is None:
      requests = self.request(batch)
    return self._apply_step(batch, requests, {l: self.tables[l].serve(r) for l, r in requests.items()})

  def _apply_step(self, batch: Batch, requests: Mapping[int, RowRequests], answers: dict) -> dict:
    """The jitted step on the served rows, then each owner's row-sparse update; host metrics."""
    step = int(local_value(self.state.step))
    self.state, metrics, sparse = self._compiled(requests)(
      self.state, self._device_batch(batch), answers, dict(requests)
    )
    lr = self.lr(step)
    for l, (unique, summed, count) in sparse.items():
      self.tables[l].apply_update(self.adam, unique, summed, count, lr)
    return {k: local_value(v) for k, v in metrics.items()}

  def iterate(self, batches: Iterable[Batch]) -> Iterator[dict]:
    """Steps over this process's batches, one step ahead: the routing of step t+1's ids is
    dispatched before step t (the device runs it first, without a host sync) and resolved
    after step t's table update; the rows of t+1 are then read from the updated shards.
    Yields each step's metrics (host values) once its tables are updated; the batch of
    step t+1 has been pulled from `batches` by then."""
    it = iter(batches)
    batch = next(it, None)
    requests = None if batch is None else self.request(batch)
    while batch is not None:
      answers = {l: self.tables[l].serve(r) for l, r in requests.items()}
      following = next(it, None)
      pending = None if following is None else self._dispatch(following)
      metrics = self._apply_step(batch, requests, answers)
      batch = following
      if pending is not None:
        requests = {l: p.resolve() for l, p in pending.items()}
      yield metrics

  def train(self, batches: Iterable[Batch]) -> list[dict]:
    """Runs `iterate` to the end; the metrics of every step."""
    return list(self.iterate(batches))

  def local_rows(self, batch: Batch) -> Batch:
    """This process's rows of a global batch that every process holds in full (e.g. a
    validation batch): those of its devices' shard positions."""
    pos = next(iter(self.plans.values())).process_positions(jax.process_index())
    n, rows = next(iter(self.plans.values())).num_devices, np.shape(batch["tokens"])[0]
    if rows % n:
      raise ValueError(f"a global batch of {rows} rows does not split over the mesh's {n} batch shards")
    take = slice(pos[0] * rows // n, (pos[-1] + 1) * rows // n)
    return {k: ({l: v[take] for l, v in x.items()} if k == "engram_ids" else x[take]) for k, x in batch.items()}

  def _dispatch(self, batch: Batch) -> dict[int, host_shards.PendingRoute]:
    return {l: host_shards.dispatch_route(self.plans[l], ids) for l, ids in self.flat_ids(batch).items()}

  def _device_batch(self, batch: Batch) -> Batch:
    device = {k: v for k, v in batch.items() if k != "engram_ids"}
    local_rows = np.shape(batch["tokens"])[0]
    k = len(self.plans[self.host_layers[0]].process_positions(jax.process_index()))
    global_rows = local_rows * next(iter(self.plans.values())).num_devices // k
    return multihost.put_process_batch(device, batch_shardings(device, self.mesh), global_rows)

  # -- the device step ---------------------------------------------------------------------------
  def _compiled(self, requests: Mapping[int, RowRequests]):
    key = tuple((l, r.capacity, r.ids_shape) for l, r in sorted(requests.items()))
    if key not in self._steps:
      replicated = NamedSharding(self.mesh, PartitionSpec())
      sparse_sh = {l: (p.sharding,) * 3 for l, p in self.plans.items()}
      self._steps[key] = jax.jit(
        self._step_fn(),
        donate_argnums=(0,),
        out_shardings=(self.state_shardings, replicated, sparse_sh),
      )
    return self._steps[key]

  def _step_fn(self):
    graphdef, plans, rate, clip = self.graphdef, self.plans, self.bias_update_rate, self.grad_clip_norm
    lr_schedule, tx = self.lr_schedule, self.tx

    def step(state: TrainState, batch: Batch, answers: Mapping[int, jax.Array], reqs: Mapping[int, RowRequests]):
      rows = {l: host_shards.receive_rows(plans[l], answers[l], reqs[l]) for l in plans}

      loss_fn = lambda params, rows: batch_loss(nnx.merge(graphdef, params, state.rest), batch, None, rows)  # noqa: E731
      (total, (lm_loss, sums, aux)), (grads, row_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, rows
      )
      sparse = {l: host_shards.return_grads(plans[l], row_grads[l], reqs[l]) for l in plans}
      grads, sparse, grad_norm = clip_with_row_grads(grads, sparse, clip)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      rest = updated_router_biases(state.rest, aux["router"], rate) if aux["router"] else state.rest
      metrics = step_metrics(lm_loss, total, sums, aux, grad_norm, lr_schedule(state.step))
      metrics.update({f"engram_rows_touched_{l}": jnp.sum(s[2]) for l, s in sparse.items()})
      return TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state), metrics, sparse

    return step

  def evaluate_rows(self, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
    """Per-sequence sums (`evaluation.row_sums`, rows in global batch order) of the model on
    this process's rows of each global eval batch (no update; every process calls it and
    gets the sums of every row). `evaluation.summarize_rows` gives val_loss with its SE."""
    if self._eval is None:
      graphdef, plans = self.graphdef, self.plans

      def eval_step(state: TrainState, batch: Batch, answers, reqs):
        rows = {l: host_shards.receive_rows(plans[l], answers[l], reqs[l]) for l in plans}
        logits, _ = batch_forward(nnx.merge(graphdef, state.params, state.rest), batch, None, rows)
        return evaluation.row_sums(logits, batch)

      self._eval = jax.jit(eval_step, out_shardings=NamedSharding(self.mesh, PartitionSpec()))
    parts = []
    for batch in batches:
      requests = self.request(batch)
      answers = {l: self.tables[l].serve(r) for l, r in requests.items()}
      sums = self._eval(self.state, self._device_batch(batch), answers, dict(requests))
      parts.append({k: local_value(v) for k, v in sums.items()})
    return evaluation.concat_rows(parts)

  # -- state ----------------------------------------------------------------------------------------
  def host_bytes(self) -> int:
    """Host bytes of this process's table shards and their optimizer state."""
    return sum(t.nbytes() for t in self.tables.values())

  def nonfinite(self) -> list[str]:
    """Names of this process's non-finite arrays: dense state leaves (`nonfinite_leaves`
    of the replicated flags) and table shards / their Adam state (NumPy)."""
    named = [
      (jax.tree_util.keystr(p), x)
      for p, x in jax.tree_util.tree_flatten_with_path(self.savable_state())[0]
      if jnp.issubdtype(x.dtype, jnp.inexact) and x.size
    ]
    flags = jax.jit(
      lambda xs: [jnp.isfinite(x).all() for x in xs], out_shardings=NamedSharding(self.mesh, PartitionSpec())
    )([x for _, x in named])
    bad = [n for (n, _), f in zip(named, flags) if not bool(local_value(f))]
    for l, t in sorted(self.tables.items()):
      for name, a in zip(host_shards.ARRAYS, (t.table, *t.state)):
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
          bad.append(f"host table shard of layer {l} (rows [{t.lo}, {t.hi})): {name}")
    return bad

  def savable_state(self) -> TrainState:
    """The state without the size-0 table placeholders (orbax cannot write them; they carry
    nothing): what a checkpoint's `state` item holds, beside the table shards."""
    _, rest = nnx.split_state(self.state.rest, engram_table_filter(self.host_layers), ...)
    return self.state.replace(rest=rest)

  def load_state(self, restored: TrainState, tables: Mapping[int, ShardedHostTable]) -> None:
    """Takes a restored `savable_state` and this process's table shards (from a checkpoint:
    `Checkpointer.restore_host_shards`); their step must agree."""
    if sorted(tables) != sorted(self.host_layers):
      raise ValueError(f"table shards of layers {sorted(tables)}, the trainer has host layers {list(self.host_layers)}")
    placeholders, _ = nnx.split_state(self.state.rest, engram_table_filter(self.host_layers), ...)
    self.state = restored.replace(rest=nnx.merge_state(restored.rest, placeholders))
    self.tables = dict(tables)
