"""Loading a trained run back: model, tokenizer, compression table and hasher."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from engram_jax import sharding as sharding_lib
from engram_jax.data import DataConfig, EngramRowHasher, special_ids
from engram_jax.distributed import host_shards
from engram_jax.hashing import NgramHasher, TokenizerCompressor, tokenizer_fingerprint
from engram_jax.models import engram_table, engram_table_filter, engram_table_value
from engram_jax.models.config import ModelConfig
from engram_jax.models.offloaded import row_indexes, split_tables
from engram_jax.models.transformer import Transformer
from engram_jax.offload import HostTable, parse_placements
from engram_jax.offload.disk_table import DiskTable, as_dtype, cache_size, open_npy
from engram_jax.offload.placement import DEFAULT_DRAM_FRACTION, TablePlacement
from engram_jax.offload.row_store import RowStore, as_stores
from engram_jax.train import disk_checkpoint, evaluation, shard_checkpoint
from engram_jax.train.checkpoint import Checkpointer, CheckpointMismatchError, CorruptCheckpointError
from engram_jax.train.config import TrainConfig
from engram_jax.train.host_trainer import dense_optimizer, split_params
from engram_jax.train.optimizer import SparseTableOptimizer, make_table_optimizer
from engram_jax.train.state import TrainState, abstract_like, build_model, create_train_state


@dataclasses.dataclass
class LoadedRun:
  """A trained model with everything needed to feed it."""

  model: Transformer
  model_config: ModelConfig
  data_config: DataConfig
  tokenizer: Tokenizer
  compressor: TokenizerCompressor
  hasher: NgramHasher | None
  meta: dict[str, Any]
  step: int
  # Engram layers trained with their tables in host memory. With load_run(tables="device")
  # `model` holds their tables; with tables="host" the model keeps size-0 placeholders
  # for them and `stores` holds them as host row stores.
  host_table_layers: tuple[int, ...] = ()
  # {layer: row store} of every Engram layer (`engram_jax.offload.row_store`): what
  # `evaluate_run`, `Decoder(stores=)` and `Generator(stores=)` take
  stores: dict[int, RowStore] = dataclasses.field(default_factory=dict)

  @property
  def row_hasher(self) -> EngramRowHasher:
    return EngramRowHasher(self.hasher, self.compressor if self.hasher is not None else None)

  @property
  def host_tables(self) -> dict[int, Any] | None:
    """{layer: HostTable} of the host row stores (None with every table on the device)."""
    return {l: s.table for l, s in self.stores.items() if s.on_host} or None


def _checkpoint_dir(path: str | Path) -> Path:
  path = Path(path)
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


TABLE_LOCATIONS = ("device", "host")

log = logging.getLogger(__name__)


def load_run(
  path: str | Path,
  *,
  step: int | None = None,
  mesh=None,
  tables: str | Mapping[int, TablePlacement] = "device",
  frequencies: Mapping[int, np.ndarray] | None = None,
) -> LoadedRun:
  """Loads a run directory (or its checkpoints/ folder); checks the stored constants.

  A run trained with host-placed tables (`TrainConfig.table_placement`; `host_table_layers`
  names them; tables split over the processes of a multi-process run are joined here, in
  one process) comes back, on the first device of `mesh`:
    tables="device": as one model holding all its tables on the device, like a device run.
    tables="host": with those layers' tables read from the checkpoint straight into host
      memory (`run.host_tables`, {layer: HostTable}, NumPy gather), never as device arrays;
      the model keeps size-0 placeholders for them, as the trainer's does. For tables
      larger than device memory. `evaluate_run` and `Generator(..., stores=run.stores)`
      take such a run.
  tables="host" is refused (ValueError) for a run trained with every table on the device:
  its checkpoint holds the tables inside the device state. Load it with tables="device"
  and move them with `engram_jax.models.offloaded.split_tables(run.model, "host")`.
  Any other `tables`, a placement spec ("disk@dram=0.01", "1:cached@0.05", ...) or a parsed
  {layer: TablePlacement} mapping, places every table as it says whatever the run trained
  with: the run is loaded as with "device" and `split_tables` moves the tables out of the
  model into `run.stores` ("cached" layers need `frequencies`, as for `split_tables`); the
  tables pass through device memory once on the way.

  step=None loads the newest intact checkpoint: an unreadable one (truncated array file,
  missing item) is reported with its path (a logged warning) and the next older one is
  tried. A chosen `step` that is unreadable raises `CorruptCheckpointError`.
  """
  if not (isinstance(tables, str) and tables in TABLE_LOCATIONS):  # a placement spec / mapping
    run = load_run(path, step=step, mesh=mesh, tables="device")
    model, offloaded = split_tables(run.model, tables, frequencies=frequencies)
    return dataclasses.replace(run, model=model, stores=offloaded.stores)
  ckpt = Checkpointer(_checkpoint_dir(path))
  try:
    if step is not None:
      if step not in ckpt.all_steps():
        raise FileNotFoundError(
          f"load_run: no checkpoint of step {step} under {ckpt.directory} (it holds steps {sorted(ckpt.all_steps())})"
        )
      return _load_step(ckpt, path, step, mesh, tables)
    candidates = sorted(ckpt.all_steps(), reverse=True)
    if not candidates:
      raise FileNotFoundError(f"load_run: no checkpoint under {ckpt.directory}")
    for i, candidate in enumerate(candidates):
      try:
        return _load_step(ckpt, path, candidate, mesh, tables)
      except CorruptCheckpointError as e:
        if i + 1 == len(candidates):
          raise CorruptCheckpointError(
            f"load_run: no intact checkpoint under {ckpt.directory}; the oldest: {e}", e.step, e.path
          ) from e
        log.warning("%s; falling back to the checkpoint of step %d", e, candidates[i + 1])
    raise AssertionError("unreachable")
  finally:
    ckpt.close()


def _load_step(ckpt: Checkpointer, path: str | Path, step: int, mesh, tables: str) -> LoadedRun:
  """load_run of one checkpoint step."""
  meta, vocab = ckpt.read_meta(step)
  tokenizer = Tokenizer.from_str(vocab["tokenizer_json"])
  if tokenizer_fingerprint(tokenizer) != meta["tokenizer_fingerprint"]:
    raise CheckpointMismatchError("stored tokenizer does not match its recorded fingerprint")
  compressor = TokenizerCompressor(
    np.asarray(vocab["compression_table"], np.int64),
    vocab["num_compressed"],
    tokenizer_fingerprint(tokenizer) if meta.get("compressed", True) else None,
  )
  model_config = ModelConfig.from_dict(meta["model"])
  hasher = None
  if meta.get("hash_constants"):
    hasher = NgramHasher.from_constants(meta["hash_constants"])  # re-derives and checks them
    if hasher.config != model_config.engram:
      raise CheckpointMismatchError(
        f"stored hash constants are for {hasher.config}, the stored model's Engram config is {model_config.engram}"
      )
  # runs saved before TrainConfig.table_optimizer existed trained their tables with dense Adam
  train_config = TrainConfig.from_dict({"table_optimizer": "dense_adam", **meta["train"]})
  mesh = mesh or sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])
  host_layers = tuple(int(l) for l in meta.get("host_table_layers") or ())
  if tables == "host" and not host_layers:
    raise ValueError(
      f"load_run(tables='host'): the run at {path} was trained with every Engram table on "
      "the device (its checkpoint names no host_table_layers); load it with "
      "tables='device' and move the tables with engram_jax.models.offloaded.split_tables(run.model, "
      "'host')"
    )
  host_tables = None
  if host_layers:
    model, loaded_step, host_tables = _load_host_placed(
      ckpt, meta, model_config, train_config, step, mesh.devices.flat[0], host_layers, keep_on_host=tables == "host"
    )
  else:
    graphdef, state, shardings, (tx, _) = create_train_state(
      model_config, lambda p: make_table_optimizer(train_config, p), meta.get("seed", 0), mesh
    )
    state, _ = ckpt.restore(abstract_like(state), current_meta=meta, step=step)
    params = state.params
    if isinstance(tx, SparseTableOptimizer):  # catchup_adam: every row brought up to date
      params = jax.jit(tx.flushed_params)(params, state.opt_state)
    model = nnx.merge(graphdef, params, state.rest)
    loaded_step = int(state.step)
  stores = as_stores(host_tables or {}, row_indexes(model)) if model_config.engram is not None else {}
  return LoadedRun(
    model,
    model_config,
    DataConfig.from_dict(meta["data"]),
    tokenizer,
    compressor,
    hasher,
    meta,
    loaded_step,
    host_layers,
    stores,
  )


def _load_host_placed(
  ckpt: Checkpointer,
  meta: dict[str, Any],
  model_config: ModelConfig,
  train_config: TrainConfig,
  step: int | None,
  device: jax.Device,
  host_layers: tuple[int, ...],
  *,
  keep_on_host: bool = False,
):
  """A run trained with host-placed tables (`trainer._Engine` with host row stores): its `state` item is the
  TrainState without the host tables, which are in the `host_tables` item. Nothing is
  initialised on the way.

  Returns (model, step, host tables): keep_on_host=False puts the tables into the model
  as device arrays (host tables None); keep_on_host=True reads them into NumPy
  `HostTable`s and leaves size-0 [0, d_h] placeholders in the model.
  """
  abstract = nnx.eval_shape(lambda: build_model(model_config, meta.get("seed", 0)))
  graphdef, params, rest = split_params(abstract, host_layers)
  tables, rest = nnx.split_state(rest, engram_table_filter(host_layers), ...)
  tx, _ = dense_optimizer(train_config, params)
  target = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32), params=params, rest=rest, opt_state=jax.eval_shape(tx.init, params)
  )
  sharding = jax.sharding.SingleDeviceSharding(device)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target)
  state, _ = ckpt.restore(target, current_meta=meta, step=step)
  wanted = {l: engram_table_value(tables, l).get_value() for l in host_layers}
  saved = _restore_tables(
    ckpt,
    step,
    {l: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding) for l, t in wanted.items()},
    as_numpy=keep_on_host,
  )
  model = nnx.merge(graphdef, state.params, state.rest, tables)  # tables still abstract
  if not keep_on_host:
    for layer in host_layers:  # as `OffloadedEngram.restore_into`
      engram_table(model, layer).set_value(saved[layer])
    return model, int(state.step), None
  host_tables = {}
  for layer in host_layers:  # as `split_tables` / `build_offloaded` leave the model
    if isinstance(saved[layer], np.memmap):  # a disk-placed table: read in place, through a DRAM cache
      host_tables[layer] = DiskTable(
        Path(saved[layer].filename).parent,
        saved[layer],
        cache_rows=cache_size(saved[layer].shape[0], None, _dram_fraction(train_config, model_config, layer)),
        device=device,
      )
    else:
      host_tables[layer] = HostTable(saved[layer], method="numpy", device=device, copy=False)
    t = wanted[layer]
    engram_table(model, layer).set_value(jax.device_put(np.zeros((0,) + tuple(t.shape[1:]), t.dtype), sharding))
  return model, int(state.step), host_tables


def _restore_tables(
  ckpt: Checkpointer, step: int | None, targets: dict[int, jax.ShapeDtypeStruct], *, as_numpy: bool = False
) -> dict[int, jax.Array | np.ndarray]:
  """The tables of the `host_tables` item read straight into `targets`' shardings (or,
  as_numpy, into host NumPy arrays: no device buffer of a table's size); their row-sparse
  Adam m, v and counts (twice the table) are not read."""
  import orbax.checkpoint as ocp

  step = ckpt.latest_step() if step is None else step
  out = {}
  disk_dir = ckpt.directory / str(step) / disk_checkpoint.ITEM
  on_disk = {l: t for l, t in targets.items() if (disk_dir / str(l)).is_dir()}
  if on_disk:  # the checkpoint's own .npy files, mapped read-only (checked: shape, dtype, length)
    with ckpt.reading(step, disk_checkpoint.ITEM):
      mapped = {l: as_dtype(open_npy(disk_dir / str(l) / "table.npy"), on_disk[l].dtype) for l in on_disk}
    problems = [
      f"disk table of Engram layer {l}: checkpoint has {(m.shape, str(m.dtype))}, the model needs "
      f"{(on_disk[l].shape, str(on_disk[l].dtype))}"
      for l, m in mapped.items()
      if tuple(m.shape) != tuple(on_disk[l].shape) or m.dtype != on_disk[l].dtype
    ]
    if problems:
      raise CheckpointMismatchError(
        f"checkpoint {ckpt.directory}/{step} does not match its model config:\n  " + "\n  ".join(problems)
      )
    sharding = lambda t: t.sharding  # noqa: E731
    out = {l: m if as_numpy else jax.device_put(np.asarray(m), sharding(on_disk[l])) for l, m in mapped.items()}
    targets = {l: t for l, t in targets.items() if l not in on_disk}
    if not targets:
      return out
  shards = ckpt.directory / str(step) / shard_checkpoint.ITEM
  if shards.is_dir():  # saved by a multi-process run: each process's rows, joined here
    with ckpt.reading(step, shard_checkpoint.ITEM):
      joined = {l: a[0] for l, a in host_shards.assemble_tables(shards).items()}
    problems = [
      f"host table of Engram layer {l}: checkpoint has "
      f"{None if l not in joined else (joined[l].shape, str(joined[l].dtype))}, the model needs {(t.shape, str(t.dtype))}"
      for l, t in targets.items()
      if l not in joined or tuple(joined[l].shape) != tuple(t.shape) or joined[l].dtype != t.dtype
    ]
    if problems:
      raise CheckpointMismatchError(
        f"checkpoint {ckpt.directory}/{step} does not match its model config:\n  " + "\n  ".join(problems)
      )
    return out | {l: joined[l] if as_numpy else jax.device_put(joined[l], t.sharding) for l, t in targets.items()}
  path = ckpt.directory / str(step) / "host_tables"
  if not path.is_dir():
    raise CorruptCheckpointError(
      f"checkpoint {ckpt.directory}/{step} is incomplete: it holds no "
      "host_tables item, but its meta names host_table_layers",
      step,
      path.parent,
    )
  with ckpt.reading(step, "host_tables metadata"):
    saved = ckpt.manager.item_metadata(step)["host_tables"]
  problems = []
  for layer, target in targets.items():
    item = (saved or {}).get(str(layer), {}).get("table")
    if item is None or tuple(item.shape) != target.shape or item.dtype != target.dtype:
      got = None if item is None else (tuple(item.shape), str(item.dtype))
      problems.append(
        f"host table of Engram layer {layer}: checkpoint has {got}, the model needs {(target.shape, str(target.dtype))}"
      )
  if problems:
    raise CheckpointMismatchError(
      f"checkpoint {ckpt.directory}/{step} does not match its model config:\n  " + "\n  ".join(problems)
    )
  item = {str(l): {"table": t} for l, t in targets.items()}
  if as_numpy:
    restore_args = {
      str(l): {"table": ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype)} for l, t in targets.items()
    }
  else:
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with ckpt.reading(step, "host_tables"), ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(
      path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )
  return out | {int(l): v["table"] for l, v in restored.items()}


def _dram_fraction(train_config: TrainConfig, model_config: ModelConfig, layer: int) -> float:
  """The DRAM cache of a disk-placed layer as the run was trained with it (else the default)."""
  placement = parse_placements(train_config.table_placement, model_config.engram_layer_ids).get(layer)
  return placement.dram_fraction if placement is not None and placement.on_disk else DEFAULT_DRAM_FRACTION


def evaluate_run(run: LoadedRun, data_config: DataConfig | None = None) -> dict[str, float]:
  """Validation loss with its SE (clustered by sequence), perplexity, accuracy and bits per
  byte of a loaded run on its validation set (or `data_config`'s): the trainer's evaluation
  (`engram_jax.train.evaluation`). With host row stores (load_run(tables="host")) the host
  layers' rows are gathered from them each batch, as the trainer evaluates."""
  return evaluation.summarize_rows(evaluation.evaluate_run_rows(run, data_config)[0])


__all__ = ["TABLE_LOCATIONS", "LoadedRun", "evaluate_run", "load_run", "special_ids"]
