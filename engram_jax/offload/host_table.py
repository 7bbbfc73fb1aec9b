"""`HostTable`: an Engram layer's flat table [R, d] in host memory, gathered to the device.

Two host-gather methods (benchmarked in experiments/bench/offload_lookup.py):
  numpy       the table is a NumPy array; `gather` takes rows with np.take (int64 ids,
              so tables past 2^31 rows work) and `jax.device_put`s only the rows.
              Default: on CPU it is as fast as compute_on (0.7-1.5x either way across
              shapes, noisy), needs no compile per ids shape, takes int64 ids, and is
              updated in place by SparseRowAdam (which the prefetcher relies on). On GPU
              the rows are copied from pageable memory: measure with --preset=h200.
  compute_on  the table is a jax.Array in `pinned_host` memory (or `unpinned_host`);
              a jitted function moves the ids to the host, gathers under
              compute_on('device_host') and copies the rows to the device. Row ids must
              fit int32. (`jnp.take` of a host array with device ids is rejected by
              JAX: the ids must be moved to host memory first.)
Both give bit-identical rows; traffic per step is the gathered rows only, never the table.
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np
from jax.experimental.compute_on import compute_on

from engram_jax.offload import placement as placement_lib
from engram_jax.offload.indexing import check_int32_rows
from engram_jax.offload.sparse_adam import SparseRowState

log = logging.getLogger(__name__)
_logged_cpu = False


def _host_take(table: jax.Array, ids: jax.Array) -> jax.Array:
  # Ids are validated before the call; 'promise_in_bounds' skips clamping on the host.
  return table.at[ids].get(mode="promise_in_bounds")


@functools.partial(jax.jit, static_argnames=("device",))
def _compute_on_gather(table: jax.Array, ids: jax.Array, device) -> jax.Array:
  ids = jax.device_put(ids, jax.memory.Space.Host)
  rows = compute_on(_host_take, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)(table, ids)
  return jax.device_put(rows, placement_lib.sharding_for("device", device))


class HostTable:
  """A flat Engram table [R, d] kept in host memory.

  Attributes:
    array: the master copy: np.ndarray (method "numpy") or a jax.Array in host memory
      (method "compute_on"). `SparseRowAdam` updates it in place / replaces it.
    method: "numpy" or "compute_on".
    memory_kind: "numpy" (pageable host RAM) or the JAX host memory kind used.
    device: the device that receives gathered rows.
  """

  def __init__(
    self, table, *, method: str = "numpy", device: jax.Device | None = None, check_ids: bool = True, copy: bool = True
  ):
    if method not in placement_lib.HOST_GATHER_METHODS:
      raise ValueError(f"HostTable method must be one of {placement_lib.HOST_GATHER_METHODS}, got {method!r}")
    if table.ndim != 2:
      raise ValueError(f"HostTable needs a flat table [R, d], got shape {table.shape}")
    self.device = device or jax.devices()[0]
    self.method = method
    self.check_ids = check_ids
    global _logged_cpu
    if self.device.platform == "cpu" and not _logged_cpu:
      _logged_cpu = True
      log.info(
        "HostTable on a CPU device: host and device memory are the same RAM; the host "
        "path runs but moves rows with a memcpy only"
      )
    if method == "numpy":
      # an own, writable master; copy=False takes over a writable NumPy array as it is
      owned = not copy and isinstance(table, np.ndarray) and table.flags.writeable
      self.array = table if owned else np.array(table, copy=True)
      self.memory_kind = "numpy"
    else:
      check_int32_rows(table.shape[0], "HostTable(method='compute_on')")
      self.memory_kind = placement_lib.host_memory_kind(self.device)
      self.array = jax.device_put(table, placement_lib.sharding_for(self.memory_kind, self.device))

  @property
  def shape(self) -> tuple[int, int]:
    """(R, d): rows and row width."""
    return tuple(self.array.shape)

  @property
  def num_rows(self) -> int:
    """R, the number of rows."""
    return int(self.array.shape[0])

  @property
  def dim(self) -> int:
    """d, the width of a row."""
    return int(self.array.shape[1])

  @property
  def dtype(self):
    """The rows' dtype."""
    return self.array.dtype

  def numpy(self) -> np.ndarray:
    """The table as NumPy (the master itself for method "numpy", else a copy)."""
    return self.array if isinstance(self.array, np.ndarray) else np.asarray(self.array)

  def _validate(self, ids: np.ndarray) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"row ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.num_rows):
      bad = ids[(ids < 0) | (ids >= self.num_rows)].ravel()[0]
      raise ValueError(f"row id {int(bad)} outside the host table's [0, {self.num_rows})")

  def host_rows(self, flat_row_ids) -> np.ndarray:
    """NumPy gather on the host: ids [...] -> rows np [..., d] (no transfer)."""
    ids = np.asarray(flat_row_ids)
    if self.check_ids:
      self._validate(ids)
    return np.take(self.numpy(), ids, axis=0)

  def gather(self, flat_row_ids) -> jax.Array:
    """Flat row ids [...] (e.g. [B, T, H], offsets added) -> device rows [..., d].

    Ids may be NumPy (int64 allowed for method "numpy") or a JAX array.
    """
    if self.method == "numpy":
      return jax.device_put(self.host_rows(flat_row_ids), placement_lib.sharding_for("device", self.device))
    if isinstance(flat_row_ids, np.ndarray) or self.check_ids:
      ids = np.asarray(flat_row_ids)
      if self.check_ids:
        self._validate(ids)
      flat_row_ids = ids.astype(np.int32)
    return _compute_on_gather(self.array, flat_row_ids, self.device)

  def apply_update(self, optimizer, state, unique_rows, summed_grads, count=None, **kwargs):
    """One `SparseRowAdam` step on this table; returns the new optimizer state."""
    self.array, state = optimizer.apply(self.array, state, unique_rows, summed_grads, count, **kwargs)
    return state

  def init_state(self, optimizer) -> SparseRowState:
    """The optimizer state beside this table (`optimizer.init`: NumPy zeros in host RAM)."""
    return optimizer.init(self.array)

  def load_state(self, saved) -> SparseRowState:
    """Takes a checkpoint's {"table", "m", "v", "count"} as own NumPy copies; returns the
    optimizer state. (`DiskTable.load_state` copies them into its files instead.)"""
    self.array = np.array(saved["table"], dtype=self.dtype)  # NumPy master, owned
    return SparseRowState(*(np.array(saved[k]) for k in ("m", "v", "count")))

  def to_device(self) -> jax.Array:
    """The whole table as a device array (placement "device" / parity tests)."""
    return jax.device_put(self.array, placement_lib.sharding_for("device", self.device))
