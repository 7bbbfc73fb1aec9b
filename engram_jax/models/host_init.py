"""Building a model whose host-placed Engram tables are never held by the device.

    model, offloaded = build_offloaded(lambda: build_model(config, seed), "host")

`split_tables` moves the tables out of a model that already holds them on the device; a
table larger than device memory must never get there. `build_offloaded` traces the
model's constructor (`build`, no arguments, deterministic) and runs it twice, jitted:

  device half  on `device`: every variable except the host tables, which become the
               size-0 placeholders of `split_tables`. XLA drops the unused table
               initialisers (dead code), so the device never allocates them.
  host half    one traced program returns only the host tables' RNG keys
               (`table_inits`); each table is then drawn block by block
               (`engram_jax.layers.table_init`, 64 MiB at a time on the CPU backend)
               straight into its NumPy `HostTable`, or into the memory-mapped file of a
               disk placement, so a disk table may be larger than host RAM and no table
               needs more than one block of temporaries.

Both halves use the constructor's own RNG keys, so the values equal `build()`'s: bit for
bit when the device is a CPU (tested); on an accelerator the random bits are the same and
the float transform of the normal init may round differently in the last bit. Without a
CPU backend (JAX_PLATFORMS without "cpu") the blocks are drawn on `device` and copied to
host memory one at a time (logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.layers.table_init import LazyTableRows, TableInit, record_table_inits
from engram_jax.models.offloaded import OffloadedEngram, resolve_placements, row_indexes
from engram_jax.models.tables import engram_table, engram_table_filter
from engram_jax.models.transformer import Transformer
from engram_jax.offload.disk_table import COPY_CHUNK_BYTES, copy_rows, make_host_table
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.placement import TablePlacement
from engram_jax.offload.row_store import row_stores

log = logging.getLogger(__name__)


def host_compute_device(device: jax.Device) -> jax.Device | None:
  """Where host tables are initialised: `device` itself if it is a CPU, else the first CPU
  device (host RAM); None when JAX has no CPU backend."""
  if device.platform == "cpu":
    return device
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


def device_state_init(build: Callable[[], Transformer], host_layers) -> Callable[[], nnx.State]:
  """() -> the model's state with size-0 [0, d_h] placeholders for the host layers' tables
  (jit it: the tables' initialisers are then dead code)."""
  is_table = engram_table_filter(host_layers)

  def init() -> nnx.State:
    tables, rest = nnx.split_state(nnx.state(build()), is_table, ...)
    placeholders = jax.tree.map(lambda x: jnp.zeros((0,) + x.shape[1:], x.dtype), tables)
    return nnx.merge_state(rest, placeholders)

  return init


def compile_device_init(build: Callable[[], Transformer], host_layers, device: jax.Device) -> jax.stages.Compiled:
  """`device_state_init` compiled for `device` (its `memory_analysis()` shows what the
  device allocates: no host table)."""
  return (
    jax.jit(device_state_init(build, host_layers), out_shardings=jax.sharding.SingleDeviceSharding(device))
    .lower()
    .compile()
  )


def host_table_init(build: Callable[[], Transformer], layer: int) -> Callable[[], jax.Array]:
  """() -> Engram layer `layer`'s table [R, d_h] (jit it: the rest is dead code)."""
  return lambda: engram_table(build(), layer)[...]


def table_inits(build: Callable[[], Transformer], layers) -> dict[int, TableInit]:
  """{layer: `TableInit`} of the Engram tables of `build()` (one jitted trace whose only
  outputs are the tables' RNG keys: nothing else is computed)."""
  layers = tuple(layers)
  if not layers:
    return {}
  recorded: dict[int, TableInit] = {}

  def keys():
    with record_table_inits(recorded):
      build()
    return {l: recorded[l].key_data for l in layers}

  key_data = jax.jit(keys)()
  return {l: dataclasses.replace(recorded[l], key_data=key_data[l]) for l in layers}


def block_rows(init: TableInit) -> int:
  """Rows per init block: `COPY_CHUNK_BYTES` of table (the copy's own chunk, so each copied
  chunk is one drawn block)."""
  return max(1, COPY_CHUNK_BYTES // (init.shape[1] * np.dtype(init.dtype).itemsize))


def build_offloaded(
  build: Callable[[], Transformer],
  placements: str | Mapping[int, TablePlacement],
  *,
  frequencies: Mapping[int, np.ndarray] | None = None,
  device: jax.Device | None = None,
  host_device: jax.Device | None = None,
) -> tuple[Transformer, OffloadedEngram]:
  """Builds `build()` with its host / cached tables created in host memory only.

  Args:
    build: () -> Transformer, e.g. `lambda: build_model(config, seed)`.
    placements, frequencies: as for `split_tables`.
    device: holds the model's other variables and receives gathered rows (default: the
      first device).
    host_device: runs the host tables' initialisers (default: `host_compute_device`).
  Returns:
    (model, OffloadedEngram) as `split_tables(build(), placements)` would give, without
    the tables ever being on `device`. The model's arrays are committed to `device`.
  """
  device = device or jax.devices()[0]
  abstract = nnx.eval_shape(build)
  placements = resolve_placements(abstract, placements)
  host_layers = tuple(l for l, p in placements.items() if p.on_host)
  graphdef = nnx.graphdef(abstract)
  state = compile_device_init(build, host_layers, device)()
  model = nnx.merge(graphdef, state)

  host_device = host_device or host_compute_device(device)
  if host_device is None:
    log.warning("no CPU backend: host tables are drawn on %s block by block and copied to host memory", device)
  inits = table_inits(build, host_layers)

  def host_table(layer: int, placement: TablePlacement) -> HostTable:
    rows = LazyTableRows(inits[layer], block_rows(inits[layer]), device=host_device or device)
    if placement.on_disk:  # memory-mapped files, filled block by block (never whole in DRAM)
      return make_host_table(rows, placement, device=device, layer=layer)
    array = np.empty(rows.shape, rows.dtype)  # owned, writable NumPy master (SparseRowAdam updates in place)
    copy_rows(rows, array)
    # the device-memory spy test patches HostTable here: DRAM placements build it directly
    return HostTable(array, method=placement.host_gather, device=device, copy=False)

  return model, OffloadedEngram(row_stores(placements, row_indexes(abstract), host_table, frequencies))
