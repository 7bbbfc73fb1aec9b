"""`DiskTable`: an Engram table [R, d] and its row-sparse Adam state in memory-mapped files on
local disk, read through a bounded DRAM cache of warm rows.

The memory hierarchy of placement "cached@f+disk" (paper §6: hot rows in HBM, warm in DRAM,
the Zipf tail on NVMe):
  device  `HotRowCache`: the top rows by frequency, on the accelerator (as for "cached").
  DRAM    `WarmRowCache`: at most `capacity` rows [C, d] in one preallocated NumPy buffer,
          kept by recency of use (batch LRU: the rows a gather read from disk replace the
          least recently used ones). Bounded by construction: C * d * itemsize bytes plus
          32 bytes of index per slot, whatever R is. An explicit cache, not the OS page
          cache (which also holds recently touched file pages; on a machine whose RAM is
          smaller than the files it is evicted by the kernel).
  disk    `table.npy` (the master), `m.npy`, `v.npy`, `count.npy` (`SparseRowState`) in
          `directory`: .npy files opened with `np.lib.format.open_memmap`.

`DiskTable` is a `HostTable` (same interface: shape / num_rows / dim / dtype / numpy /
flat_rows / gather_heads / host_rows / gather / apply_update / to_device), so the host
training step, the row prefetcher (which calls `gather` in its thread: the disk reads of step
t+1 overlap step t), `HotRowCache` and the NumPy decode path take it unchanged. Its
optimizer state comes from `init_state` (memmaps beside the table, not DRAM) and a
checkpoint is restored with `load_state` (copied into the working files in chunks).

Every read and write holds one lock: the prefetch thread's gathers and the main thread's
updates never interleave inside a row. `apply_update` writes the new rows to the memmap and
to the DRAM copies of the cached ones (write-through), so a gather after an update returns
the updated rows; rows gathered ahead of an update are patched by the trainer
(`patch_updated_rows`, via `host_rows`), as for a NumPy `HostTable`.

Crash safety: the working files are scratch. A run that resumes builds them anew from its
checkpoint (`engram_jax.train.disk_checkpoint` copies them into the checkpoint step, fsynced,
inside orbax's atomic step commit), so a kill during an update or a save never leaves torn
state behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from engram_jax.offload.host_table import HostTable
from engram_jax.offload.sparse_adam import SparseRowAdam, SparseRowState

log = logging.getLogger(__name__)

TABLE_FILE = "table.npy"
STATE_FILES = {"m": "m.npy", "v": "v.npy", "count": "count.npy"}
COPY_CHUNK_BYTES = 64 << 20  # chunked copies hold at most this much in DRAM


def state_dtype(table_dtype) -> np.dtype:
  """The dtype of m and v for a table dtype (as `SparseRowAdam.init`: float32 for < 4 bytes)."""
  dt = np.dtype(table_dtype)
  return np.dtype(np.float32) if dt.itemsize < 4 else dt


def open_npy(
  path: str | os.PathLike, shape: tuple[int, ...] | None = None, dtype=None, *, mode: str = "r"
) -> np.memmap:
  """Memory-maps an .npy file, checked: missing file, unreadable header, short file, shape /
  dtype other than the given ones and a Fortran-order array each raise an error naming the
  file and the values."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"disk table file {path} does not exist")
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      header = read(f)
      data_offset = f.tell()
  except (ValueError, OSError, SyntaxError) as e:
    raise ValueError(f"disk table file {path} is not a readable .npy file: {e}") from None
  got_shape, fortran, got_dtype = header
  got_dtype = np.dtype(got_dtype)
  if dtype is not None and got_dtype.kind == "V" and got_dtype.itemsize == np.dtype(dtype).itemsize:
    got_dtype = np.dtype(dtype)  # .npy stores ml_dtypes (bfloat16, ...) as raw bytes: '<V2'
  if fortran:
    raise ValueError(f"disk table file {path} is in Fortran order; C order is needed")
  if shape is not None and tuple(got_shape) != tuple(shape):
    raise ValueError(f"disk table file {path} has shape {tuple(got_shape)}, expected {tuple(shape)}")
  if dtype is not None and np.dtype(got_dtype) != np.dtype(dtype):
    raise ValueError(f"disk table file {path} has dtype {np.dtype(got_dtype)}, expected {np.dtype(dtype)}")
  need = data_offset + int(np.prod(got_shape, dtype=np.int64)) * np.dtype(got_dtype).itemsize
  size = path.stat().st_size
  if size < need:
    raise ValueError(f"disk table file {path} is short: {size} bytes, its header {tuple(got_shape)} needs {need}")
  return as_dtype(np.lib.format.open_memmap(path, mode=mode), got_dtype)


def as_dtype(array: np.ndarray, dtype) -> np.ndarray:
  """`array` viewed as `dtype` when it is the raw-bytes ('V') form of it, as .npy files store
  ml_dtypes such as bfloat16; otherwise `array` unchanged."""
  dtype = np.dtype(dtype)
  if array.dtype != dtype and array.dtype.kind == "V" and array.dtype.itemsize == dtype.itemsize:
    return array.view(dtype)
  return array


def create_npy(path: str | os.PathLike, shape: tuple[int, ...], dtype, values=None) -> np.memmap:
  """A new .npy memmap (zeros, or `values` copied in chunks); an existing file at `path` is
  unlinked first (a mapping of it elsewhere keeps its own data)."""
  Path(path).unlink(missing_ok=True)
  out = np.lib.format.open_memmap(Path(path), mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
  if values is not None:
    copy_rows(values, out)
  return out


def copy_rows(src, dst: np.ndarray) -> None:
  """dst[...] = src in row chunks of at most COPY_CHUNK_BYTES (no full copy in DRAM)."""
  if tuple(np.shape(src)) != tuple(dst.shape):
    raise ValueError(f"copy_rows: source shape {tuple(np.shape(src))} != destination {tuple(dst.shape)}")
  n = dst.shape[0]
  row_bytes = max(1, int(np.prod(dst.shape[1:], dtype=np.int64)) * dst.dtype.itemsize)
  step = max(1, COPY_CHUNK_BYTES // row_bytes)
  for lo in range(0, n, step):
    dst[lo : lo + step] = np.asarray(src[lo : lo + step], dtype=dst.dtype)


def fsync_path(path: str | os.PathLike) -> None:
  """fsync a file or a folder (a folder: its entries, e.g. after a rename)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_npy_durable(path: str | os.PathLike, values) -> None:
  """Writes `values` to a new .npy at `path` in chunks, then fsyncs it."""
  out = create_npy(path, np.shape(values), np.asarray(values[:0]).dtype, values)
  out.flush()
  del out
  fsync_path(path)


class WarmRowCache:
  """At most `capacity` rows [C, d] of a table in DRAM, replaced least recently used first.

  Attributes:
    rows: the preallocated buffer [C, d]; `slot_row` [C] the row each slot holds (-1: free).
    hits, misses: distinct rows served from the buffer / read from disk by `lookup`.
  """

  def __init__(self, capacity: int, dim: int, dtype):
    self.capacity = int(capacity)
    self.rows = np.zeros((self.capacity, dim), dtype)
    self.slot_row = np.full(self.capacity, -1, np.int64)
    self._stamp = np.zeros(self.capacity, np.int64)  # last use (tick) of each slot
    self._ids = np.empty(0, np.int64)  # resident row ids, ascending ...
    self._slots = np.empty(0, np.int64)  # ... and their slots
    self._tick = 0
    self.hits = self.misses = 0

  @property
  def resident_rows(self) -> int:
    """Rows held now (<= capacity)."""
    return int(self._ids.size)

  @property
  def nbytes(self) -> int:
    """DRAM the cache holds: the row buffer plus its index (fixed at construction)."""
    return int(self.rows.nbytes + 32 * self.capacity)  # + slot_row, stamp, ids, slots: int64 each

  def reset_stats(self) -> None:
    """Zeroes the hit / miss counters."""
    self.hits = self.misses = 0

  def clear(self) -> None:
    """Drops every cached row (the buffer stays allocated)."""
    self.slot_row[:] = -1
    self._stamp[:] = 0
    self._ids, self._slots = np.empty(0, np.int64), np.empty(0, np.int64)

  def find(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct rows [U] -> (hit bool [U], slot int64 [U], valid where hit)."""
    if self._ids.size == 0:
      return np.zeros(rows.shape, bool), np.zeros(rows.shape, np.int64)
    pos = np.minimum(np.searchsorted(self._ids, rows), self._ids.size - 1)
    hit = self._ids[pos] == rows
    return hit, np.where(hit, self._slots[pos], 0)

  def lookup(self, rows: np.ndarray, read) -> np.ndarray:
    """Sorted distinct rows [U] -> their values [U, d]: hits from the buffer, the rest from
    `read(missing rows)` (then cached, replacing the least recently used slots)."""
    self._tick += 1
    hit, slot = self.find(rows)
    out = np.empty((rows.size, self.rows.shape[1]), self.rows.dtype)
    out[hit] = self.rows[slot[hit]]
    self._stamp[slot[hit]] = self._tick
    missing = rows[~hit]
    if missing.size:
      out[~hit] = read(missing)
      self._insert(missing, out[~hit])
    self.hits += int(hit.sum())
    self.misses += int(missing.size)
    return out

  def _insert(self, rows: np.ndarray, values: np.ndarray) -> None:
    n = min(rows.size, self.capacity)
    rows, values = rows[:n], values[:n]
    # free slots first (stamp -1), then the least recently used; this lookup's hits were
    # stamped with the current tick, so they go last
    key = np.where(self.slot_row < 0, -1, self._stamp)
    victims = np.argpartition(key, n - 1)[:n] if n < self.capacity else np.arange(self.capacity)
    # the sorted index, updated in O(C + n) (no sort of the C resident ids): the evicted
    # rows out, the new ones (distinct, none resident: they missed) in
    old = np.sort(self.slot_row[victims][self.slot_row[victims] >= 0])
    if old.size:
      gone = np.searchsorted(self._ids, old)
      self._ids, self._slots = np.delete(self._ids, gone), np.delete(self._slots, gone)
    self.slot_row[victims] = rows
    self.rows[victims] = values
    self._stamp[victims] = self._tick
    order = np.argsort(rows, kind="stable")
    at = np.searchsorted(self._ids, rows[order])
    self._ids = np.insert(self._ids, at, rows[order])
    self._slots = np.insert(self._slots, at, victims[order].astype(np.int64))

  def write_through(self, rows: np.ndarray, values: np.ndarray) -> None:
    """New values [n, d] of distinct `rows` [n]: the cached ones among them are overwritten."""
    if rows.size == 0 or self._ids.size == 0:
      return
    order = np.argsort(rows, kind="stable")
    hit, slot = self.find(rows[order])
    self.rows[slot[hit]] = values[order][hit]


class DiskTable(HostTable):
  """A flat Engram table [R, d] in `directory`/table.npy, served through a `WarmRowCache`.

  Build one with `DiskTable.create` (new files) or `DiskTable.open` (existing ones).

  Attributes:
    directory: the folder of table.npy (and m.npy, v.npy, count.npy after `init_state`).
    cache: the `WarmRowCache` (capacity `cache_rows`).
    bypassed: rows read from disk without the DRAM cache (the device-hot rows of a
      `HotRowCache` in front, see `exclude_from_cache`).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    memmap: np.memmap,
    *,
    cache_rows: int,
    device: jax.Device | None = None,
    check_ids: bool = True,
    owns_directory: bool = False,
  ):
    if memmap.ndim != 2:
      raise ValueError(f"DiskTable needs a flat table [R, d], got shape {memmap.shape}")
    cache_rows = cache_size(int(memmap.shape[0]), cache_rows, None)
    self.directory = Path(directory)
    self._memmap = memmap
    self._view = np.asarray(memmap)  # the same mapping as a plain ndarray (fast indexing)
    self.device = device or jax.devices()[0]
    self.method = "numpy"
    self.memory_kind = "disk"
    self.check_ids = check_ids
    self.cache = WarmRowCache(int(cache_rows), memmap.shape[1], memmap.dtype)
    self._excluded = np.empty(0, np.int64)
    self.bypassed = 0
    self._lock = threading.RLock()
    self._state: SparseRowState | None = None
    if owns_directory:
      weakref.finalize(self, shutil.rmtree, str(self.directory), True)

  # ------------------------------------------------------------------ construction
  @classmethod
  def create(
    cls,
    directory: str | os.PathLike | None,
    values,
    *,
    cache_rows: int | None = None,
    cache_fraction: float | None = None,
    device: jax.Device | None = None,
    check_ids: bool = True,
  ) -> DiskTable:
    """New working files in `directory` (None: a temporary folder, removed with the table)
    holding `values` [R, d] (copied in chunks); the DRAM cache holds `cache_rows` rows or
    `cache_fraction` of R (rounded, at least 1)."""
    shape = tuple(np.shape(values))
    if len(shape) != 2:
      raise ValueError(f"DiskTable needs a flat table [R, d], got shape {shape}")
    cache_rows = cache_size(shape[0], cache_rows, cache_fraction)
    owns = directory is None
    directory = Path(tempfile.mkdtemp(prefix="engram_disk_")) if owns else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (TABLE_FILE, *STATE_FILES.values()):  # stale files of an earlier run are not ours
      (directory / name).unlink(missing_ok=True)
    dtype = np.asarray(values[:0]).dtype
    memmap = create_npy(directory / TABLE_FILE, shape, dtype, values)
    log.info("DiskTable %s: %s %s in %s, DRAM cache %d rows", shape, dtype, "created", directory, cache_rows)
    return cls(directory, memmap, cache_rows=cache_rows, device=device, check_ids=check_ids, owns_directory=owns)

  @classmethod
  def open(
    cls,
    directory: str | os.PathLike,
    *,
    cache_rows: int | None = None,
    cache_fraction: float | None = None,
    shape: tuple[int, int] | None = None,
    dtype=None,
    writable: bool = False,
    device: jax.Device | None = None,
    check_ids: bool = True,
  ) -> DiskTable:
    """Opens `directory`/table.npy (checked against `shape` / `dtype` when given); read-only
    unless `writable` (inference needs no writes)."""
    memmap = open_npy(Path(directory) / TABLE_FILE, shape, dtype, mode="r+" if writable else "r")
    cache_rows = cache_size(memmap.shape[0], cache_rows, cache_fraction)
    return cls(directory, memmap, cache_rows=cache_rows, device=device, check_ids=check_ids)

  # ------------------------------------------------------------ HostTable interface
  @property
  def array(self) -> np.memmap:
    """The memory-mapped master [R, d] (reading it all goes through the OS page cache)."""
    return self._memmap

  @array.setter
  def array(self, value) -> None:
    raise TypeError("a DiskTable's master is its file: restore it with load_state, not by assigning .array")

  def numpy(self) -> np.memmap:
    """The table as its memmap [R, d] (no copy; a full read goes through the page cache)."""
    return self._memmap

  def exclude_from_cache(self, rows) -> None:
    """Rows never admitted to the DRAM cache (the device-hot rows of a `HotRowCache` in front
    of this table: its fills and refreshes read them from disk and are counted in
    `bypassed`); empties the cache and its counters."""
    with self._lock:
      self._excluded = np.unique(np.asarray(rows, np.int64).reshape(-1))
      self.cache.clear()
      self.reset_stats()

  def reset_stats(self) -> None:
    """Zeroes the DRAM cache's hit / miss counters and `bypassed`."""
    self.cache.reset_stats()
    self.bypassed = 0

  @property
  def hit_rate(self) -> float:
    """Distinct rows served from DRAM / distinct rows looked up (bypassed rows excluded)."""
    n = self.cache.hits + self.cache.misses
    return self.cache.hits / n if n else float("nan")

  def _read(self, rows: np.ndarray) -> np.ndarray:
    return self._view[rows]  # ascending distinct rows: file pages in order

  def host_rows(self, flat_row_ids) -> np.ndarray:
    """ids [...] -> rows np [..., d]: each distinct row from the DRAM cache or the file."""
    ids = np.asarray(flat_row_ids)
    if self.check_ids:
      self._validate(ids)
    uniq, inverse = np.unique(ids.reshape(-1).astype(np.int64), return_inverse=True)
    with self._lock:
      if self._excluded.size:
        pos = np.minimum(np.searchsorted(self._excluded, uniq), self._excluded.size - 1)
        skip = self._excluded[pos] == uniq
      else:
        skip = np.zeros(uniq.shape, bool)
      values = np.empty((uniq.size, self.dim), self.dtype)
      if skip.any():
        values[skip] = self._read(uniq[skip])
        self.bypassed += int(skip.sum())
      if (~skip).any():
        values[~skip] = self.cache.lookup(uniq[~skip], self._read)
    return values[inverse.reshape(-1)].reshape(ids.shape + (self.dim,))

  def init_state(self, optimizer: SparseRowAdam) -> SparseRowState:
    """Zero m, v [R, d] and count [R] in memmaps beside the table (new files)."""
    del optimizer  # the state's layout does not depend on the hyper-parameters
    r, d = self.shape
    dt = state_dtype(self.dtype)
    with self._lock:
      self._state = SparseRowState(
        create_npy(self.directory / STATE_FILES["m"], (r, d), dt),
        create_npy(self.directory / STATE_FILES["v"], (r, d), dt),
        create_npy(self.directory / STATE_FILES["count"], (r,), np.int32),
      )
    return self._state

  def load_state(self, saved: Mapping[str, np.ndarray]) -> SparseRowState:
    """Copies a checkpoint's {"table", "m", "v", "count"} (arrays or read-only memmaps of the
    checkpoint's files) into the working files, in chunks; empties the DRAM cache."""
    state = self._state
    if state is None:
      raise ValueError("DiskTable.load_state before init_state: the optimizer state files do not exist yet")
    want = {"table": self._memmap, "m": state.m, "v": state.v, "count": state.count}
    for key, dst in want.items():
      if key not in saved:
        raise ValueError(f"disk table state lacks {key!r} (has {sorted(saved)})")
      src = saved[key]
      if tuple(np.shape(src)) != dst.shape or np.dtype(src.dtype) != dst.dtype:
        raise ValueError(
          f"disk table {self.directory}: saved {key} is {tuple(np.shape(src))} {np.dtype(src.dtype)}, "
          f"the run's is {dst.shape} {dst.dtype}"
        )
    with self._lock:
      for key, dst in want.items():
        copy_rows(saved[key], dst)
        dst.flush()
      self.cache.clear()
    return state

  def apply_update(self, optimizer, state, unique_rows, summed_grads, count=None, **kwargs):
    """One `SparseRowAdam` step on the memmapped table and state (in place); the DRAM copies
    of updated cached rows are rewritten (write-through)."""
    with self._lock:
      # plain ndarray views of the mappings (np.memmap's subclass hooks cost ~8x on every op)
      views = SparseRowState(*(np.asarray(a) for a in state))
      optimizer.apply(self._view, views, unique_rows, summed_grads, count, **kwargs)
      rows = np.asarray(unique_rows).reshape(-1).astype(np.int64)
      rows = rows[: rows.size if count is None else int(count)]
      rows = rows[rows < self.num_rows]
      self.cache.write_through(rows, self._view[rows])
    return state

  def flush(self) -> None:
    """Writes dirty pages of the table and state memmaps to the files (msync)."""
    with self._lock:
      self._memmap.flush()
      for a in self._state or ():
        a.flush()


def cache_size(num_rows: int, cache_rows: int | None, cache_fraction: float | None) -> int:
  """The DRAM cache's rows from exactly one of `cache_rows` or `cache_fraction` (of num_rows,
  rounded, at least 1); ValueError for 0, negative or more than the table."""
  if (cache_rows is None) == (cache_fraction is None):
    raise ValueError("give exactly one of cache_rows or cache_fraction for a DiskTable's DRAM cache")
  if cache_fraction is not None:
    if isinstance(cache_fraction, bool) or not isinstance(cache_fraction, (int, float)):
      raise ValueError(f"DiskTable cache_fraction must be a number in (0, 1], got {cache_fraction!r}")
    if not 0.0 < cache_fraction <= 1.0:
      raise ValueError(f"DiskTable cache_fraction must lie in (0, 1] (of {num_rows} rows), got {cache_fraction}")
    return max(1, round(cache_fraction * num_rows))
  if isinstance(cache_rows, bool) or not isinstance(cache_rows, (int, np.integer)) or not 1 <= cache_rows <= num_rows:
    raise ValueError(
      f"DiskTable cache_rows (the DRAM cache) must be an integer in [1, {num_rows}] (the table's rows), "
      f"got {cache_rows!r}"
    )
  return int(cache_rows)


def make_host_table(
  values: np.ndarray,
  placement,
  *,
  device: jax.Device | None = None,
  layer: int | None = None,
  copy: bool = True,
) -> HostTable:
  """The host master of a host-placed layer: a `DiskTable` in placement.disk_dir/layer_<l>
  (a temporary folder without disk_dir) for storage "disk", else a NumPy `HostTable`."""
  if not placement.on_disk:
    return HostTable(values, method=placement.host_gather, device=device, copy=copy)
  directory = None
  if placement.disk_dir is not None:
    directory = Path(placement.disk_dir) / (f"layer_{layer}" if layer is not None else "table")
  return DiskTable.create(directory, values, cache_fraction=placement.dram_fraction, device=device)


def with_disk_dir(placements: Mapping[int, object], disk_dir: str | os.PathLike) -> dict[int, object]:
  """`placements` with disk_dir set to `disk_dir` where a disk placement has none."""
  import dataclasses

  return {
    l: dataclasses.replace(p, disk_dir=str(disk_dir)) if p.on_disk and p.disk_dir is None else p
    for l, p in placements.items()
  }


def disk_bytes(num_rows: int, dim: int, dtype) -> dict[str, int]:
  """Bytes on disk of one disk table: {"table", "state" (m, v, count), "total"} (one copy:
  the working files, and again for each kept checkpoint)."""
  dt = np.dtype(dtype)
  table = num_rows * dim * dt.itemsize
  state = 2 * num_rows * dim * state_dtype(dt).itemsize + 4 * num_rows
  return {"table": table, "state": state, "total": table + state}


__all__ = [
  "DiskTable",
  "WarmRowCache",
  "as_dtype",
  "cache_size",
  "copy_rows",
  "disk_bytes",
  "make_host_table",
  "open_npy",
  "with_disk_dir",
  "write_npy_durable",
]
