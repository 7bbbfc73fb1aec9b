"""Where a `Transformer`'s Engram tables sit in its parameter tree: the one place outside
the layers that knows the path, so train / inference / experiments never spell it out.

  engram_table_path(1)              ("blocks", 1, "engram", "table")
  engram_table_filter([1, 15])      nnx filter: those layers' tables (None: every layer's)
  engram_table_layer(path)          1 for a table's path (nnx / jax key entries too), else None
  engram_table(model, 1)            the table Variable of block 1's Engram layer
  engram_table_value(state, 1)      the table Variable inside an nnx.State of the model
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flax import nnx


def engram_table_path(layer: int) -> tuple[str | int, ...]:
  """The path of block `layer`'s Engram table in `nnx.state(model)`."""
  return ("blocks", int(layer), "engram", "table")


def _key(entry: Any) -> Any:
  """A path entry as a plain str / int (nnx paths hold them; jax key paths wrap them)."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def engram_table_layer(path: Iterable[Any]) -> int | None:
  """The layer whose Engram table `path` names, or None for any other path."""
  keys = tuple(_key(k) for k in path)
  if len(keys) == 4 and keys[0] == "blocks" and keys[2:] == ("engram", "table"):
    return int(keys[1])
  return None


def engram_table_filter(layers: Iterable[int] | None = None) -> Callable[[tuple, Any], bool]:
  """nnx filter selecting blocks[l].engram.table for the Engram layers in `layers` (None: all)."""
  layers = None if layers is None else frozenset(int(l) for l in layers)

  def is_table(path, _=None) -> bool:
    layer = engram_table_layer(path)
    return layer is not None and (layers is None or layer in layers)

  return is_table


def engram_table(model: Any, layer: int) -> nnx.Variable:
  """Block `layer`'s Engram table Variable; a ValueError naming the Engram layers if the
  block has none."""
  blocks = model.blocks
  if not 0 <= layer < len(blocks) or getattr(blocks[layer], "engram", None) is None:
    raise ValueError(f"block {layer} has no Engram layer; Engram layers are {model.config.engram_layer_ids}")
  return blocks[layer].engram.table


def engram_table_value(state: Any, layer: int) -> nnx.Variable:
  """Block `layer`'s Engram table inside an nnx.State of a Transformer (or a part of one)."""
  node = state
  for key in engram_table_path(layer):
    node = node[key]
  return node
