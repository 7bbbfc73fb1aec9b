"""Rows [start, start + count) of an Engram table's normal init, without the rest of the table.

    keys = {}
    with record_table_inits(keys):            # while tracing the model's constructor
      build()
    rows = table_rows(keys[layer], start, count)   # == std * normal(key, (R, d))[start:start+count]

The Engram table is `std * jax.random.normal(key, (R, d), param_dtype)`. With the threefry
PRNG in its partitionable form (JAX's default), element (r, c) draws its bits from the
counter r * d + c alone, so any block of rows can be drawn on its own. `table_rows` does
that through a PRNG implementation (`jax.extend.random.define_prng_impl`) whose key also
carries a 64-bit counter offset; `jax.random.normal` then applies its own uniform and erfinv
transforms, so the rows equal the whole table's bit for bit (tested). A table larger than
host RAM (a disk placement) is created block by block; a host table never needs the 3-4x of
its size in temporaries that the whole-table program allocates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

_recording = threading.local()


@dataclasses.dataclass(frozen=True)
class TableInit:
  """How one Engram layer initialises its table: `std * normal(key, shape, dtype)`.

  Attributes:
    key_data: the threefry key's data, uint32 [2] (concrete once returned from a jit).
    shape: (R, d_h), the flat table's shape.
    std: the init's standard deviation (`table_init_std`).
    dtype: the table's dtype (`param_dtype`).
  """

  key_data: jax.Array
  shape: tuple[int, int]
  std: float
  dtype: jnp.dtype


@contextlib.contextmanager
def record_table_inits(into: dict[int, TableInit]) -> Iterator[dict[int, TableInit]]:
  """Within: every Engram layer built in this thread stores its `TableInit` in `into`
  under its layer id (trace `build()` inside a jit and return the key data from it)."""
  previous = getattr(_recording, "into", None)
  _recording.into = into
  try:
    yield into
  finally:
    _recording.into = previous


def note_table_init(layer_id: int, key: jax.Array, shape: tuple[int, int], std: float, dtype) -> None:
  """Called by `Engram.__init__`: records its table init when `record_table_inits` is on."""
  into = getattr(_recording, "into", None)
  if into is not None:
    into[int(layer_id)] = TableInit(jax.random.key_data(key), tuple(shape), float(std), jnp.dtype(dtype))


def _offset_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
  """Threefry's partitionable random bits of `shape`, element i using counter offset + i.

  key: uint32 [4] = (k1, k2, offset_hi, offset_lo)."""
  size = int(np.prod(shape))
  if size >= 2**32:
    raise ValueError(f"table_rows: a block of {size} values needs fewer than 2**32 (draw smaller blocks)")
  lo = jax.lax.iota(jnp.uint32, size).reshape(shape) + key[3]
  hi = key[2] + (lo < key[3]).astype(jnp.uint32)  # carry out of the low word
  bits1, bits2 = jex_random.threefry2x32_p.bind(key[0], key[1], hi, lo)
  if bit_width == 64:
    return (bits1.astype(jnp.uint64) << 32) | bits2.astype(jnp.uint64)
  bits = bits1 ^ bits2
  return bits if bit_width == 32 else bits.astype({8: jnp.uint8, 16: jnp.uint16}[bit_width])


def _no_split(*args, **kwargs):
  raise NotImplementedError("table_rows keys draw bits only; they cannot be split or folded")


_OFFSET_THREEFRY = jex_random.define_prng_impl(
  key_shape=(4,),
  seed=_no_split,
  split=_no_split,
  random_bits=_offset_bits,
  fold_in=_no_split,
  name="threefry_row_block",
  tag="trb",
)


@functools.partial(jax.jit, static_argnames=("std", "count", "dim", "dtype"))
def _rows(key_data: jax.Array, offset: jax.Array, *, std: float, count: int, dim: int, dtype) -> jax.Array:
  key = jax.random.wrap_key_data(jnp.concatenate([key_data.astype(jnp.uint32), offset]), impl=_OFFSET_THREEFRY)
  return std * jax.random.normal(key, (count, dim), dtype)  # the layer's expression (weakly typed std)


def table_rows(init: TableInit, start: int, count: int, device: jax.Device | None = None) -> np.ndarray:
  """Rows [start, start + count) of the table `init` describes, as NumPy [count, d_h].

  Equal bit for bit to `init.std * jax.random.normal(key, init.shape, init.dtype)[start:
  start + count]` on the same backend (requires `jax_threefry_partitionable`, JAX's default).
  Compiled once per block size `count`; `device`: where the block is drawn (default: the
  first local CPU device, else the first local device)."""
  num_rows, dim = init.shape
  if not (0 <= start and count >= 0 and start + count <= num_rows):
    raise ValueError(f"table_rows: rows [{start}, {start + count}) outside the table's [0, {num_rows})")
  if not jax.config.jax_threefry_partitionable:
    raise RuntimeError(
      "table_rows needs jax_threefry_partitionable=True (the table's bits depend on its shape otherwise)"
    )
  if device is None:  # this process's own device (in a multi-process run the first global one is process 0's)
    try:
      device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
      device = jax.local_devices()[0]
  base = int(start) * int(dim)
  offset = np.array([base >> 32, base & 0xFFFFFFFF], np.uint32)
  with jax.default_device(device):
    block = _rows(init.key_data, offset, std=init.std, count=int(count), dim=int(dim), dtype=init.dtype)
  return np.asarray(block)


class LazyTableRows:
  """An Engram table's init as a read-only array-like [R, d_h]: `rows[a:b]` draws rows a..b-1
  (`table_rows`, in blocks of `block_rows`, one compile). `DiskTable.create` and
  `copy_rows` fill files / arrays from it block by block."""

  def __init__(self, init: TableInit, block_rows: int, device: jax.Device | None = None):
    if block_rows < 1:
      raise ValueError(f"LazyTableRows: block_rows must be >= 1, got {block_rows}")
    self.init = init
    self.shape = tuple(init.shape)
    self.dtype = np.dtype(init.dtype)
    self.block_rows = int(block_rows)
    self.device = device

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError(f"LazyTableRows supports row slices [a:b] only, got {index!r}")
    start, stop, _ = index.indices(self.shape[0])
    stop = max(start, stop)
    out = np.empty((stop - start, self.shape[1]), self.dtype)
    for lo in range(start, stop, self.block_rows):
      n = min(self.block_rows, stop - lo)
      # a full block (fixed size: one compile), cut where the table ends
      first = min(lo, self.shape[0] - self.block_rows) if self.shape[0] >= self.block_rows else 0
      size = min(self.block_rows, self.shape[0])
      block = table_rows(self.init, first, size, self.device)
      out[lo - start : lo - start + n] = block[lo - first : lo - first + n]
    return out

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = self[:]
    return out if dtype is None else out.astype(dtype)


__all__ = ["LazyTableRows", "TableInit", "note_table_init", "record_table_inits", "table_rows"]
