"""The `disk_tables` item of a checkpoint: disk-placed Engram tables (`DiskTable`) and their
row-sparse Adam state, as .npy files inside the checkpoint step.

Layout: <checkpoints>/<step>/disk_tables/<layer>/{table,m,v,count}.npy (plain .npy: `np.load`
reads them, `np.load(mmap_mode="r")` maps them).

Save: each working memmap is flushed (msync), copied in chunks of at most
`disk_table.COPY_CHUNK_BYTES` into the item folder and fsynced, then the folders are fsynced.
The item folder is inside orbax's temporary step folder, which orbax renames to <step> only
after every item is written: a kill during the copy leaves no step <step> at all, and the
resume starts from the previous one. Cost: one more copy of every disk table and its state
per kept checkpoint (`disk_table.disk_bytes`), written while the step waits.

Restore: the files are mapped read-only, checked (shape, dtype, length) and handed to
`DiskTable.load_state`, which copies them into fresh working files. The working files of
the killed run are never read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from engram_jax.offload.disk_table import fsync_path, open_npy, write_npy_durable

ITEM = "disk_tables"
KEYS = ("table", "m", "v", "count")


def is_disk_state(arrays: Mapping[str, Any]) -> bool:
  """True for a host layer's {"table", ...} whose table is a memmap (a `DiskTable`)."""
  return isinstance(arrays.get("table"), np.memmap)


class DiskTablesHandler(ocp.CheckpointHandler):
  """Writes / maps the .npy files of the disk tables (see the module docstring)."""

  def save(self, directory, args: DiskTablesSave) -> None:
    root = Path(str(directory))
    root.mkdir(parents=True, exist_ok=True)
    for layer, arrays in args.item.items():
      folder = root / str(int(layer))
      folder.mkdir(exist_ok=True)
      for key in KEYS:
        array = arrays[key]
        if isinstance(array, np.memmap):
          array.flush()
        write_npy_durable(folder / f"{key}.npy", array)
      fsync_path(folder)
    fsync_path(root)

  def restore(self, directory, args: DiskTablesRestore | None = None) -> dict[int, dict[str, np.memmap]]:
    """{layer: {"table", "m", "v", "count"}} read-only memmaps (ValueError / FileNotFoundError
    for a missing, short or unreadable file)."""
    root = Path(str(directory))
    layers = (
      args.layers if args is not None and args.layers is not None else sorted(int(p.name) for p in root.iterdir())
    )
    return {int(l): {k: open_npy(root / str(int(l)) / f"{k}.npy") for k in KEYS} for l in layers}


@ocp.args.register_with_handler(DiskTablesHandler, for_save=True)
@dataclasses.dataclass
class DiskTablesSave(ocp.args.CheckpointArgs):
  item: Mapping[int, Mapping[str, np.ndarray]]


@ocp.args.register_with_handler(DiskTablesHandler, for_restore=True)
@dataclasses.dataclass
class DiskTablesRestore(ocp.args.CheckpointArgs):
  layers: list[int] | None = None


def check_like(saved: Mapping[int, Mapping[str, np.ndarray]], like: Mapping[int, Mapping[str, Any]]) -> list[str]:
  """Differences of shape / dtype between saved disk tables and the run's arrays."""
  problems = []
  for l, want in like.items():
    for k in KEYS:
      got = saved[l][k]
      if tuple(got.shape) != tuple(np.shape(want[k])) or got.dtype != np.dtype(want[k].dtype):
        problems.append(
          f"disk table {l}/{k}: checkpoint {tuple(got.shape)} {got.dtype}, run {tuple(np.shape(want[k]))} "
          f"{np.dtype(want[k].dtype)}"
        )
  return problems


__all__ = ["ITEM", "DiskTablesHandler", "DiskTablesRestore", "DiskTablesSave", "check_like", "is_disk_state"]
