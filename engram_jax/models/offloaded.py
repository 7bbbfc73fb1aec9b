"""Model-level host placement: take Engram tables out of a `Transformer`, feed it host rows.

    model, offloaded = split_tables(model, "host")            # or {1: TablePlacement(...)}
    logits, aux = forward_with_host_tables(model, batch, offloaded)
    with offloaded.prefetcher(batches) as it:                 # rows of t+1 gathered during t
      for batch, rows in it:
        logits, aux = forward_with_host_tables(model, batch, offloaded, rows)

What `split_tables` does to the model (in place): for every layer placed "host" or
"cached", the `table` Param's value is copied to host memory (a NumPy `HostTable`) and
replaced in the model by a size-0 placeholder [0, d_h] of the same dtype and logical axes.
The model's graph (modules, Variables, metadata) is unchanged, so `nnx.split` / `merge`,
sharding rules and checkpoints of the other parameters work as before, and the device
copy of the table is released as soon as no other reference to it exists (the model held
the only one unless the caller kept one, e.g. an `nnx.state` taken earlier). The layer
never reads the placeholder: the forward passes the gathered rows as `engram_rows`,
which take precedence over its own gather. (Calling the layer with row ids instead would
read NaN through the empty table: `Engram.lookup` gathers with mode 'fill'.)

"cached" keeps a `HotRowCache` (top rows by frequency on the device, misses from the
host table) in front of the same `HostTable`; the rows it returns equal the table's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.models.config import ModelConfig
from engram_jax.models.tables import engram_table
from engram_jax.models.transformer import Transformer
from engram_jax.offload.disk_table import DiskTable, make_host_table
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.hot_cache import HotRowCache, load_frequencies
from engram_jax.offload.indexing import flat_rows_np
from engram_jax.offload.placement import TablePlacement, parse_placements
from engram_jax.offload.prefetch import RowPrefetcher, engram_row_ids

RowSource = HostTable | HotRowCache
# rows' shape [..., H, d_h] -> where the gathered rows go (e.g. split over the batch on a
# data-parallel mesh); None: the table's device
RowPlacement = Callable[[tuple[int, ...]], jax.sharding.Sharding]


@dataclasses.dataclass
class OffloadedEngram:
  """The host-resident tables of a model's host-placed Engram layers.

  Attributes:
    placements: {layer: TablePlacement} for every Engram layer (device ones included).
    tables: {layer: HostTable}, the master copy [R, d_h] of each host / cached layer.
    sources: {layer: HostTable | HotRowCache}: what a forward gathers from (the cache for
      "cached", else the table).
    offsets: {layer: np.int64 [H]} first flat row of every head.
  """

  placements: dict[int, TablePlacement]
  tables: dict[int, HostTable]
  sources: dict[int, RowSource]
  offsets: dict[int, np.ndarray]

  @property
  def host_layers(self) -> tuple[int, ...]:
    return tuple(sorted(self.tables))

  def num_rows(self, layer: int) -> int:
    return self.tables[layer].num_rows

  def flat_ids(self, engram_ids: Mapping[int, Any]) -> dict[int, np.ndarray]:
    """Hashed per-head ids {layer: [..., H]} -> flat host-table ids {layer: np.int64 [..., H]}."""
    self._check_layers(engram_ids)
    return {l: flat_rows_np(np.asarray(engram_ids[l]), self.offsets[l]) for l in self.host_layers}

  def gather(self, engram_ids: Mapping[int, Any], *, sharding: RowPlacement | None = None) -> dict[int, jax.Array]:
    """Synchronous gather: hashed per-head ids {layer: [B, T, H]} -> device rows [B, T, H*d_h]
    (placed by `sharding` when given, else on the table's device)."""
    out = {}
    for layer, ids in self.flat_ids(engram_ids).items():
      rows = _gather(self.sources[layer], ids, sharding)
      out[layer] = rows.reshape(rows.shape[:-2] + (-1,))
    return out

  def prefetcher(
    self,
    batches: Iterable,
    *,
    depth: int = 1,
    row_ids: Callable[[Any], Mapping[int, Any]] = engram_row_ids,
    sources: Mapping[int, Any] | None = None,
    sharding: RowPlacement | None = None,
  ) -> RowPrefetcher:
    """A `RowPrefetcher` over `batches` yielding (batch, {layer: rows [B, T, H*d_h]}).

    `sources` overrides the gather callables (e.g. instrumented ones in a benchmark);
    `sharding` places the rows (as for `gather`).
    """
    if sources is None and sharding is not None:
      sources = {l: functools.partial(_gather, s, sharding=sharding) for l, s in self.sources.items()}
    return RowPrefetcher(
      batches, dict(sources or self.sources), offsets=self.offsets, row_ids=row_ids, depth=depth, merge_heads=True
    )

  def restore_into(self, model: Transformer) -> Transformer:
    """Puts the current host tables back into `model` as device arrays (in place)."""
    for layer in self.host_layers:
      var = engram_table(model, layer)
      var.set_value(jnp.asarray(self.tables[layer].numpy()))
    return model

  def _check_layers(self, engram_ids: Mapping[int, Any]) -> None:
    missing = [l for l in self.host_layers if l not in engram_ids]
    if missing:
      raise ValueError(f"row ids for host-placed Engram layers {missing} are missing; got layers {sorted(engram_ids)}")


def _gather(source: RowSource, flat_ids: np.ndarray, sharding: RowPlacement | None = None) -> jax.Array:
  if sharding is None:
    return source.lookup(flat_ids) if isinstance(source, HotRowCache) else source.gather(flat_ids)
  table = source.table if isinstance(source, HotRowCache) else source
  target = sharding(tuple(np.shape(flat_ids)) + (table.dim,))
  if isinstance(source, HostTable) and source.method == "numpy":
    return jax.device_put(source.host_rows(flat_ids), target)  # each device takes its part
  # the cache's combine (or the compute_on gather) runs on the table's device; then moved
  return jax.device_put(_gather(source, flat_ids), target)


def _engram(model: Transformer, layer: int):
  engram_table(model, layer)  # raises for a block without an Engram layer
  return model.blocks[layer].engram


def check_host_placement(config: ModelConfig, host_layers: Iterable[int], where: str) -> None:
  """Refuses model settings that host / cached tables do not support (`where` names the
  placement field in the message): `engram_fold_rows` (the host gather, the prefetcher and
  the host decoder index the table with unfolded hashed ids, so they would read other rows)."""
  host_layers = sorted(int(l) for l in host_layers)
  if host_layers and config.engram_fold_rows is not None:
    raise ValueError(
      f"{where} places Engram layers {host_layers} in host memory, which does not support "
      f"ModelConfig.engram_fold_rows={config.engram_fold_rows} (host gathers do not fold "
      "the hashed ids): keep those tables on the device"
    )


def resolve_placements(model: Transformer, placements: str | Mapping[int, TablePlacement]) -> dict[int, TablePlacement]:
  """{layer: TablePlacement} for every Engram layer of `model` (unnamed layers: device)."""
  layer_ids = model.config.engram_layer_ids
  if not layer_ids:
    raise ValueError("host placement needs a model with Engram layers (config.engram is None)")
  spec = placements
  if isinstance(placements, str):
    placements = parse_placements(placements, layer_ids)
  placements = {int(l): p for l, p in placements.items()}
  unknown = sorted(set(placements) - set(layer_ids))
  if unknown:
    raise ValueError(f"placements name layers {unknown} that are not Engram layers {layer_ids}")
  check_host_placement(model.config, [l for l, p in placements.items() if p.on_host], f"placements {spec!r}")
  return {l: placements.get(l, TablePlacement()) for l in layer_ids}


def row_source(
  table: HostTable, layer: int, placement: TablePlacement, frequencies: Mapping[int, np.ndarray]
) -> RowSource:
  """What a forward gathers layer `layer`'s rows from: a `HotRowCache` for "cached"."""
  if placement.kind != "cached":
    return table
  if layer in frequencies:
    counts = np.asarray(frequencies[layer], np.int64)
  elif placement.frequency_file:
    counts = load_frequencies(placement.frequency_file, table.num_rows)
  else:
    raise ValueError(
      f"Engram layer {layer} is placed 'cached' but has no row frequencies: "
      "pass frequencies={layer: counts} or set the placement's frequency_file"
    )
  cache = HotRowCache.from_frequencies(table, counts, fraction=placement.cache_fraction)
  if isinstance(table, DiskTable):  # device-hot rows stay out of the DRAM tier
    table.exclude_from_cache(cache.hot_rows)
  return cache


def split_tables(
  model: Transformer,
  placements: str | Mapping[int, TablePlacement],
  *,
  frequencies: Mapping[int, np.ndarray] | None = None,
  device: jax.Device | None = None,
) -> tuple[Transformer, OffloadedEngram]:
  """Moves the tables of host / cached Engram layers out of `model` (in place).

  The tables are on the device until then; to never put them there, build the model
  with `engram_jax.models.host_init.build_offloaded` instead.

  Args:
    model: a `Transformer` with Engram layers.
    placements: a spec for `parse_placements` ("host", "cached@0.1", "1:host,15:cached@0.05")
      or {layer: TablePlacement}; layers not named stay on the device.
    frequencies: {layer: np.int64 [R]} row counts for "cached" layers (else each
      placement's `frequency_file`; one of the two is required).
    device: receives the gathered rows (default: the first device).
  Returns:
    (model, OffloadedEngram): the same model object, its host-placed tables replaced by
    size-0 placeholders (see the module docstring), and the host tables.
  """
  placements = resolve_placements(model, placements)
  frequencies = dict(frequencies or {})

  tables, sources, offsets = {}, {}, {}
  for layer, placement in placements.items():
    if not placement.on_host:
      continue
    engram = _engram(model, layer)
    var = engram.table
    value = var.get_value()
    if value.shape[0] == 0:
      raise ValueError(f"Engram layer {layer}'s table was already split off (shape {value.shape})")
    table = make_host_table(np.asarray(jax.device_get(value)), placement, device=device, layer=layer)
    tables[layer] = table
    offsets[layer] = np.asarray(engram.offsets, np.int64)
    sources[layer] = row_source(table, layer, placement, frequencies)
    # Same dtype and metadata (logical axes), no rows: the device buffer can be freed.
    var.set_value(jnp.zeros((0,) + tuple(value.shape[1:]), value.dtype))
    del value
  return model, OffloadedEngram(placements, tables, sources, offsets)


def _device_row_ids(engram_ids, host_layers) -> dict[int, Any] | None:
  ids = {l: v for l, v in (engram_ids or {}).items() if l not in host_layers}
  return ids or None


def apply_offloaded(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  tokens,
  engram_ids,
  engram_rows,
  *,
  positions=None,
  segment_ids=None,
  cache=None,
):
  """Pure forward: `Transformer` from (graphdef, state), host rows as `engram_rows`.

  Args:
    engram_ids: {layer: [B, T, H]} hashed ids of the DEVICE-placed layers only (or None).
    engram_rows: {layer: [B, T, H*d_h]} gathered rows of the host-placed layers.
  Returns:
    (logits [B, T, V], aux) as `Transformer.__call__`.
  """
  model = nnx.merge(graphdef, state)
  return model(tokens, engram_ids, positions=positions, segment_ids=segment_ids, engram_rows=engram_rows, cache=cache)


_apply_jit = jax.jit(apply_offloaded, static_argnums=(0,))


def forward_with_host_tables(
  model: Transformer,
  batch: Mapping[str, Any],
  tables: OffloadedEngram,
  engram_rows: Mapping[int, jax.Array] | None = None,
  *,
  cache=None,
):
  """Jitted forward of a split model on one batch.

  Args:
    model: the model returned by `split_tables`.
    batch: {"tokens" [B, T], "engram_ids" {layer: [B, T, H]}, optional "positions",
      "segment_ids"}.
    tables: the `OffloadedEngram` of `split_tables`.
    engram_rows: gathered rows {layer: [B, T, H*d_h]} from `tables.prefetcher` (or `tables.gather`);
      None gathers them now.
    cache: a `DecodeCache` (decoding) or None.
  Returns:
    (logits, aux), equal to the device-table model's.
  """
  if engram_rows is None:
    engram_rows = tables.gather(batch["engram_ids"])
  missing = [l for l in tables.host_layers if l not in engram_rows]
  if missing:
    raise ValueError(f"engram_rows lacks host-placed Engram layers {missing}")
  graphdef, state = nnx.split(model)
  return _apply_jit(
    graphdef,
    state,
    batch["tokens"],
    _device_row_ids(batch.get("engram_ids"), tables.host_layers),
    dict(engram_rows),
    positions=batch.get("positions"),
    segment_ids=batch.get("segment_ids"),
    cache=cache,
  )
