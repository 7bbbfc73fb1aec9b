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

from engram_jax.models.tables import engram_table
from engram_jax.models.transformer import Transformer
from engram_jax.offload.disk_table import make_host_table
from engram_jax.offload.host_table import HostTable
from engram_jax.offload.placement import TablePlacement, layer_placements
from engram_jax.offload.prefetch import RowPrefetcher, engram_row_ids
from engram_jax.offload.row_store import HostRowStore, RowPlacement, RowStore, as_stores, row_stores


@dataclasses.dataclass
class OffloadedEngram:
  """The row stores of a model's Engram layers: {layer: store} for every layer
  (`engram_jax.offload.row_store`; device layers get a `DeviceRowStore`).

  Attributes:
    stores: {layer: DeviceRowStore | HostRowStore | CachedRowStore}.
  """

  stores: dict[int, RowStore]

  @property
  def host_layers(self) -> tuple[int, ...]:
    """The layers whose rows live off the device (host, cached, disk), ascending."""
    return tuple(sorted(l for l, s in self.stores.items() if s.on_host))

  @property
  def host_stores(self) -> dict[int, HostRowStore]:
    """{layer: store} of the host and cached layers only."""
    return {l: self.stores[l] for l in self.host_layers}

  @property
  def tables(self) -> dict[int, HostTable]:
    """{layer: HostTable}, the master copy [R, d_h] of each host / cached layer."""
    return {l: s.table for l, s in self.host_stores.items()}

  def flat_ids(self, engram_ids: Mapping[int, Any]) -> dict[int, np.ndarray]:
    """Hashed per-head ids {layer: [..., H]} -> flat host-table ids {layer: np.int64 [..., H]}."""
    self._check_layers(engram_ids)
    return {l: s.flat_ids(engram_ids[l]) for l, s in self.host_stores.items()}

  def gather(self, engram_ids: Mapping[int, Any], *, sharding: RowPlacement | None = None) -> dict[int, jax.Array]:
    """Synchronous gather: hashed per-head ids {layer: [B, T, H]} -> device rows [B, T, H*d_h]
    (placed by `sharding` when given, else on the table's device)."""
    out = {}
    for layer, ids in self.flat_ids(engram_ids).items():
      rows = self.stores[layer].gather(ids, sharding)
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

    `sources` overrides the gathers ({layer: callable(flat ids) -> rows}, e.g. instrumented
    ones in a benchmark); `sharding` places the rows (as for `gather`).
    """
    stores = self.host_stores
    sources = dict(sources or {l: functools.partial(s.gather, sharding=sharding) for l, s in stores.items()})
    return RowPrefetcher(
      batches,
      {l: _per_head(stores[l], sources[l]) for l in sources},
      row_ids=row_ids,
      depth=depth,
      merge_heads=True,
    )

  def restore_into(self, model: Transformer) -> Transformer:
    """Puts the current host tables back into `model` as device arrays (in place)."""
    for layer, table in self.tables.items():
      engram_table(model, layer).set_value(jnp.asarray(table.numpy()))
    return model

  def _check_layers(self, engram_ids: Mapping[int, Any]) -> None:
    missing = [l for l in self.host_layers if l not in engram_ids]
    if missing:
      raise ValueError(f"row ids for host-placed Engram layers {missing} are missing; got layers {sorted(engram_ids)}")


def _per_head(store: HostRowStore, gather: Callable) -> Callable:
  """A gather of flat ids as one of hashed per-head ids (`store`'s row index)."""
  return lambda engram_ids: gather(store.flat_ids(engram_ids))


def _engram(model: Transformer, layer: int):
  engram_table(model, layer)  # raises for a block without an Engram layer
  return model.blocks[layer].engram


def resolve_placements(model: Transformer, placements: str | Mapping[int, TablePlacement]) -> dict[int, TablePlacement]:
  """{layer: TablePlacement} for every Engram layer of `model` (unnamed layers: device)."""
  if not model.config.engram_layer_ids:
    raise ValueError("host placement needs a model with Engram layers (config.engram is None)")
  return layer_placements(placements, model.config.engram_layer_ids)


def row_indexes(model: Transformer) -> dict[int, Any]:
  """{layer: RowIndex} of every Engram layer of `model` (abstract models too)."""
  return {l: _engram(model, l).row_index for l in model.config.engram_layer_ids}


def model_stores(model: Transformer, tables: Mapping[int, Any] | None = None) -> dict[int, RowStore]:
  """{layer: row store} of every Engram layer of `model`: a host store over each table of
  `tables` ({layer: HostTable (or its interface) | HotRowCache | store}), a device store
  for the others (`row_store.as_stores` with the model's row indexes)."""
  return as_stores(dict(tables or {}), row_indexes(model))


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

  def host_table(layer: int, placement: TablePlacement) -> HostTable:
    var = _engram(model, layer).table
    value = var.get_value()
    if value.shape[0] == 0:
      raise ValueError(f"Engram layer {layer}'s table was already split off (shape {value.shape})")
    table = make_host_table(np.asarray(jax.device_get(value)), placement, device=device, layer=layer)
    # Same dtype and metadata (logical axes), no rows: the device buffer can be freed.
    var.set_value(jnp.zeros((0,) + tuple(value.shape[1:]), value.dtype))
    return table

  return model, OffloadedEngram(row_stores(placements, row_indexes(model), host_table, frequencies))


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
    engram_ids: {layer: [B, T, H]} hashed ids (or None); a layer's `engram_rows` take
      precedence over its ids.
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
    batch.get("engram_ids"),
    dict(engram_rows),
    positions=batch.get("positions"),
    segment_ids=batch.get("segment_ids"),
    cache=cache,
  )
