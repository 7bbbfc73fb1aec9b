"""Orbax checkpoints that carry the meaning of the Engram rows.

A checkpoint step holds four items (five with host-placed Engram tables):
  state   model parameters, MoE router biases, optimizer state and step (sharded arrays)
  data    the grain iterator position (one JSON file per process)
  meta    model / train / data configs, the hash constants, the tokenizer fingerprint,
          the Engram layers whose tables live in host memory ("host_table_layers")
  vocab   the tokenizer JSON and the compression table
  host_tables  (TrainConfig.table_placement != "device" only) per host-placed layer
          {"table", "m", "v", "count"} NumPy arrays: the table and its row-sparse Adam
          state. Disk-placed layers ("disk", "cached@f+disk") are in the item
          `disk_tables` instead, as .npy files (engram_jax.train.disk_checkpoint). `state` then holds the rest of the model (without the tables' size-0
          placeholders, which orbax cannot save) and the dense optimizer's state.
  host_shards  (host placement in a multi-process run) each process's rows of every host
          table and their row-sparse Adam state, one file per process and array
          (engram_jax.train.shard_checkpoint); `state` as with host_tables.
Multi-process: every process calls `save` / `restore` (orbax coordinates them: the state is
written shard by shard, JSON items by the primary process; each process writes its own data
item), so `directory` must be a filesystem all processes share.
Loading into a model whose hash constants, tokenizer, table placement or shapes differ
fails and says what differs; nothing is overwritten.

A checkpoint that cannot be read (a truncated array file, a missing item) raises
`CorruptCheckpointError` naming its path; `newest_readable` / the trainer / `load_run` fall
back to the newest intact one. Retention always keeps the newest checkpoint (`keep` >= 1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from engram_jax.distributed import host_shards as host_shards_lib
from engram_jax.distributed.host_shards import HostShardPlan, ShardedHostTable
from engram_jax.offload.disk_table import as_dtype
from engram_jax.train import disk_checkpoint, shard_checkpoint

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """The checkpoint does not belong to the model / tokenizer / hash constants at hand."""


class CorruptCheckpointError(ValueError):
  """A checkpoint step cannot be read: truncated or missing files. `.step`, `.path` name it."""

  def __init__(self, message: str, step: int, path: Path):
    super().__init__(message)
    self.step, self.path = step, path


# The data fields that define the training stream: a resume with other values would read
# other batches (or fail deep inside the iterator restore with a shape error).
DATA_RESUME_FIELDS = ("sources", "seq_len", "batch_size", "seed", "max_documents", "max_bytes", "validation_fraction")


def compare_data(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Differences of the data configuration that make a checkpoint's data position meaningless."""
  a, b = saved.get("data") or {}, current.get("data") or {}
  norm = lambda v: list(v) if isinstance(v, tuple | list) else v  # noqa: E731  JSON has lists
  return [
    f"data config: {k}: checkpoint has {a.get(k, '<absent>')!r}, current run has {b.get(k, '<absent>')!r}"
    for k in DATA_RESUME_FIELDS
    if k in a and norm(a.get(k)) != norm(b.get(k))
  ]


def nonfinite_leaves(tree: Any, limit: int = 5) -> list[str]:
  """Paths of the floating-point leaves of `tree` (jax or NumPy arrays) holding NaN or inf.

  The jax leaves are checked in one jitted call (a few reductions, no copy to the host).
  """
  named = [
    (_path_name(p) or "<root>", x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if np.issubdtype(getattr(x, "dtype", np.int32), np.inexact) and getattr(x, "size", 1)
  ]
  on_device = [(n, x) for n, x in named if isinstance(x, jax.Array)]
  flags = dict(zip([n for n, _ in on_device], _finite_flags([x for _, x in on_device]), strict=True))
  bad = [n for n, x in named if not bool(flags[n] if n in flags else np.isfinite(x).all())]
  return bad[:limit]


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
  return [jax.numpy.isfinite(x).all() for x in leaves]


def _diff_dicts(saved: dict, current: dict, prefix: str) -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current), key=str):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff_dicts(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: checkpoint has {a!r}, current run has {b!r}")
  return out


def compare_meta(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Differences that make a checkpoint unusable: hash constants, tokenizer, model shape."""
  problems = []
  if saved.get("tokenizer_fingerprint") != current.get("tokenizer_fingerprint"):
    problems.append(
      f"tokenizer differs: checkpoint {saved.get('tokenizer_fingerprint')!r}, "
      f"current {current.get('tokenizer_fingerprint')!r}"
    )
  problems += _diff_dicts(saved.get("hash_constants") or {}, current.get("hash_constants") or {}, "hash constants: ")
  problems += _diff_dicts(saved.get("model") or {}, current.get("model") or {}, "model config: ")
  # Host and device tables keep different optimizer states (row-sparse vs dense Adam), so a
  # run resumes with the same layers in host memory; "host" <-> "cached" keeps the same state.
  saved_host = list(saved.get("host_table_layers") or [])
  current_host = list(current.get("host_table_layers") or [])
  if saved_host != current_host:
    spec = lambda m: (m.get("train") or {}).get("table_placement", "device")
    problems.append(
      f"Engram table placement differs: the checkpoint keeps the tables of layers {saved_host} "
      f"in host memory (train.table_placement={spec(saved)!r}), the current run those of "
      f"layers {current_host} ({spec(current)!r}); resume with the checkpoint's placement"
    )
  # device tables keep dense Adam m, v or row-sparse m, v, count; runs saved before the
  # field existed used dense Adam
  table_opt = lambda m: (m.get("train") or {}).get("table_optimizer", "dense_adam")  # noqa: E731
  if table_opt(saved) != table_opt(current):
    problems.append(
      f"train.table_optimizer differs: checkpoint {table_opt(saved)!r}, current "
      f"{table_opt(current)!r}; resume with the checkpoint's table_optimizer"
    )
  return problems


def _path_name(path: tuple) -> str:
  # saved metadata and live pytrees spell keys differently (dict key '0' vs index 0, 'value')
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(p for p in parts if p != "value")


def _shape_tree(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(p): tuple(getattr(x, "shape", ())) for p, x in flat}


class Checkpointer:
  """Saves and restores training runs under `directory` (keep-last-k or best-by-val-loss)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2, best_by: str | None = None):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      # orbax's max_to_keep=0 deletes every checkpoint, the one just written included
      raise ValueError(f"Checkpointer: keep must be an integer >= 1, got {keep!r}")
    self.directory = Path(directory).absolute()
    # The newest checkpoint (what a resume starts from) is always kept; best_by keeps the
    # `keep` best by that metric besides it.
    policies = [ocp_managers.LatestN(n=1 if best_by else keep)]
    if best_by:
      policies.append(
        ocp_managers.BestN(
          get_metric_fn=lambda m: m[best_by], reverse=True, n=keep, keep_checkpoints_without_metrics=False
        )
      )
    options = ocp.CheckpointManagerOptions(
      create=True, preservation_policy=ocp_managers.AnyPreservationPolicy(policies), enable_async_checkpointing=False
    )
    import grain.checkpoint as grain_checkpoint

    # Registered handlers make item metadata (saved shapes) readable before a restore.
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
      "vocab": ocp.JsonCheckpointHandler(),
      "data": grain_checkpoint.CheckpointHandler(),
      "host_tables": ocp.StandardCheckpointHandler(),
      disk_checkpoint.ITEM: disk_checkpoint.DiskTablesHandler(),
      shard_checkpoint.ITEM: shard_checkpoint.HostShardsHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    """The newest saved step, or None when the directory holds no checkpoint."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step (in the manager's order)."""
    return list(self.manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    *,
    meta: dict[str, Any],
    vocab: dict[str, Any],
    data_iterator: Any = None,
    metrics: dict[str, float] | None = None,
    host_tables: dict[int, dict[str, np.ndarray]] | None = None,
    host_shards: Mapping[int, ShardedHostTable] | None = None,
  ) -> None:
    """`host_tables`: {layer: {"table", "m", "v", "count"}} NumPy arrays (host placement).
    `host_shards`: {layer: this process's `ShardedHostTable`} (host placement over several
    processes; every process calls `save`)."""
    from engram_jax.data.pipeline import checkpoint_args  # data sits beside training

    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta), "vocab": ocp.args.JsonSave(vocab)}
    if data_iterator is not None:
      items["data"] = checkpoint_args(data_iterator)
    if host_tables:
      # disk tables (memmaps) as .npy files in their own item, the others through orbax
      on_disk = {l: d for l, d in host_tables.items() if disk_checkpoint.is_disk_state(d)}
      in_dram = {l: d for l, d in host_tables.items() if l not in on_disk}
      if in_dram:
        items["host_tables"] = ocp.args.StandardSave(_host_tree(in_dram))
      if on_disk:
        items[disk_checkpoint.ITEM] = disk_checkpoint.DiskTablesSave(on_disk)
    if host_shards:
      items[shard_checkpoint.ITEM] = shard_checkpoint.HostShardsSave(host_shards, step)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, vocab) of checkpoint `step` (default: the newest); CorruptCheckpointError names an unreadable one."""
    step = self._step(step)
    with self.reading(step, "meta / vocab"):
      for item in ("meta", "vocab"):
        if not (self.directory / str(step) / item).is_dir():
          raise FileNotFoundError(f"item {item!r} is missing")
      restored = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), vocab=ocp.args.JsonRestore())
      )
      meta, vocab = restored["meta"], restored["vocab"]
      if not isinstance(meta, dict) or not isinstance(vocab, dict):
        raise ValueError("meta / vocab is not a JSON object")
    return meta, vocab

  @contextlib.contextmanager
  def reading(self, step: int, what: str) -> Iterator[None]:
    """Turns a failure to read checkpoint `step` (not a mismatch) into CorruptCheckpointError."""
    try:
      yield
    except (CheckpointMismatchError, CorruptCheckpointError):
      raise
    except Exception as e:  # noqa: BLE001  orbax / TensorStore / JSON errors of a damaged step
      path = self.directory / str(step)
      raise CorruptCheckpointError(f"checkpoint {path} is unreadable ({what}): {_error_text(e)}", step, path) from e

  def steps_newest_first(self) -> list[int]:
    """Every saved step, newest first (the order in which restores try them)."""
    return sorted(self.all_steps(), reverse=True)

  def move_aside(self, step: int, to: str | os.PathLike, reason: str) -> Path:
    """Moves checkpoint `step` out of the managed directory into `to` (never deletes it)."""
    src = self.directory / str(step)
    dest_dir = Path(to)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / str(step)
    if dest.exists():
      dest = dest_dir / f"{step}-{int(time.time())}"
    shutil.move(str(src), str(dest))
    self.manager.reload()
    log.warning("checkpoint %s moved to %s (%s)", src, dest, reason)
    return dest

  def restore(
    self, abstract_state: Any, *, current_meta: dict[str, Any], step: int | None = None, data_iterator: Any = None
  ) -> tuple[Any, dict[str, Any]]:
    """Checks compatibility, then restores the state (and the data iterator, in place)."""
    from engram_jax.data.pipeline import checkpoint_args

    step = self._step(step)
    meta, _ = self.read_meta(step)
    problems = compare_meta(meta, current_meta)
    saved_shapes = self._saved_shapes(step)
    if saved_shapes is not None:
      wanted = _shape_tree(abstract_state)
      for path in sorted(set(saved_shapes) | set(wanted)):
        if saved_shapes.get(path) != wanted.get(path):
          problems.append(
            f"parameter {path}: checkpoint shape {saved_shapes.get(path)}, model shape {wanted.get(path)}"
          )
          if len(problems) > 20:
            break
    if problems:
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} does not match this run:\n  " + "\n  ".join(problems)
      )
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      self._check_data_state(step)
      items["data"] = checkpoint_args(data_iterator, restore=True)
    with self.reading(step, "state" + (" / data" if data_iterator is not None else "")):
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], meta

  def restore_host_tables(
    self, like: dict[int, dict[str, np.ndarray]], step: int | None = None
  ) -> dict[int, dict[str, np.ndarray]]:
    """The host-placed tables and their sparse Adam state, as NumPy arrays shaped like `like`.

    `like`: {layer: {"table", "m", "v", "count"}} arrays of the current run (e.g.
    `HostTableTrainer.host_state()`); shapes and dtypes must match the saved ones. Layers
    saved as disk tables come back as read-only memmaps of the checkpoint's files (for
    `DiskTable.load_state` / `HostTable.load_state` to copy), the others as NumPy arrays.
    """
    step = self._step(step)
    shards = self.directory / str(step) / shard_checkpoint.ITEM
    if shards.is_dir():
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} holds host tables split over "
        f"{self._shard_processes(step)} processes (item {shard_checkpoint.ITEM}); this run has "
        f"{jax.process_count()} process: resume it with the process count it was saved with "
        "(load_run joins the shards in one process for evaluation and decoding)"
      )
    disk_dir = self.directory / str(step) / disk_checkpoint.ITEM
    on_disk = sorted(l for l in like if (disk_dir / str(int(l))).is_dir())
    out = {}
    if on_disk:
      with self.reading(step, disk_checkpoint.ITEM):
        out = self.manager.restore(
          step, args=ocp.args.Composite(**{disk_checkpoint.ITEM: disk_checkpoint.DiskTablesRestore(on_disk)})
        )[disk_checkpoint.ITEM]
      out = {l: {k: as_dtype(v, like[l][k].dtype) for k, v in d.items()} for l, d in out.items()}  # bfloat16
      problems = disk_checkpoint.check_like(out, {l: like[l] for l in on_disk})
      if problems:
        raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not match this run:\n  " + "\n  ".join(problems)
        )
      like = {l: d for l, d in like.items() if l not in on_disk}
      if not like:
        return out
    target = _host_tree(like)
    saved = self._saved_shapes(step, "host_tables")
    if saved is None and not (self.directory / str(step) / "host_tables").is_dir():
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} holds no host_tables item: it was not saved with host-placed Engram tables"
      )
    if saved is not None:
      wanted = _shape_tree(target)
      problems = [
        f"host table {p}: checkpoint shape {saved.get(p)}, run shape {wanted.get(p)}"
        for p in sorted(set(saved) | set(wanted))
        if saved.get(p) != wanted.get(p)
      ]
      if problems:
        raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not match this run:\n  " + "\n  ".join(problems)
        )
    with self.reading(step, "host_tables"):
      restored = self.manager.restore(step, args=ocp.args.Composite(host_tables=ocp.args.StandardRestore(target)))[
        "host_tables"
      ]
    return out | {int(l): {k: np.asarray(v) for k, v in d.items()} for l, d in restored.items()}

  def restore_host_shards(
    self, plans: Mapping[int, HostShardPlan], step: int | None = None
  ) -> dict[int, ShardedHostTable]:
    """This process's `ShardedHostTable` of every host layer of checkpoint `step`, laid out
    by `plans` {layer: HostShardPlan} (a multi-process host-placement run). Refuses
    (CheckpointMismatchError) a checkpoint saved by another process count or without the
    item (a one-process run keeps its host tables whole in `host_tables`)."""
    step = self._step(step)
    path = self.directory / str(step) / shard_checkpoint.ITEM
    if not path.is_dir():
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} holds no {shard_checkpoint.ITEM} item: its host tables were "
        f"not saved split over processes (a one-process run); this run has {jax.process_count()} processes. "
        "Resume it with one process"
      )
    saved = self._shard_processes(step)
    if saved != jax.process_count():
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step}: its host tables were split over {saved} processes, this "
        f"run has {jax.process_count()}; resume with {saved} processes (load_run joins the shards "
        "in one process for evaluation and decoding)"
      )
    with self.reading(step, shard_checkpoint.ITEM):
      restored = self.manager.restore(
        step, args=ocp.args.Composite(**{shard_checkpoint.ITEM: shard_checkpoint.HostShardsRestore(plans)})
      )
    return restored[shard_checkpoint.ITEM]

  def _shard_processes(self, step: int) -> int:
    with self.reading(step, shard_checkpoint.ITEM):
      return int(host_shards_lib.read_manifest(self.directory / str(step) / shard_checkpoint.ITEM)["process_count"])

  def _check_data_state(self, step: int) -> None:
    # grain keeps one iterator file per process: a run resumes with the same process count.
    data_dir = self.directory / str(step) / "data"
    mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if data_dir.is_dir() and not mine.exists():
      saved = sorted(p.name for p in data_dir.glob("process_*.json"))
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} holds data iterator states {saved}, none for process "
        f"{jax.process_index()} of {jax.process_count()}: resume with the process count it was "
        "saved with"
      )

  def _saved_shapes(self, step: int, item: str = "state") -> dict[str, tuple] | None:
    try:
      tree = self.manager.item_metadata(step)[item]
    except Exception:  # noqa: BLE001  older orbax layouts: fall back to orbax's own shape check
      return None
    if tree is None:
      return None
    return _shape_tree(tree)

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    return step

  def close(self) -> None:
    """Waits for pending saves and releases the orbax manager."""
    self.manager.close()


def _error_text(e: BaseException) -> str:
  """A short description of a read failure: TensorStore appends a whole spec dump."""
  text = str(e).split(" See full TensorStore details")[0].strip()
  out = f"{type(e).__name__}: {text[:300]}"
  cause = e.__cause__ or e.__context__
  if cause is not None and str(cause):
    out += f" ({type(cause).__name__}: {str(cause).split(' See full TensorStore details')[0][:300]})"
  return out


def _host_tree(host_tables: dict[int, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
  # string keys: orbax stores dict keys as path names
  return {str(l): {k: np.asarray(v) for k, v in d.items()} for l, d in host_tables.items()}


def vocab_item(tokenizer: Any, compressor: Any) -> dict[str, Any]:
  """The tokenizer JSON and the compression table, stored with every checkpoint."""
  return {
    "tokenizer_json": tokenizer.to_str(),
    "compression_table": np.asarray(compressor.lookup_table).tolist(),
    "num_compressed": int(compressor.num_compressed),
  }
