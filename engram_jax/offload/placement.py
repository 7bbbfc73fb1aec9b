"""Where an Engram layer's table lives, and the memory kinds that hold it.

Placements (one per Engram layer):
  device  the table is a device array (default; the layer gathers itself).
  host    the whole table in host memory (`pinned_host` when the backend has it); the
          rows a step needs are gathered on the host and copied to the device.
  cached  the most frequent rows on the device (`HotRowCache`), the rest on the host.
  disk    "host" with the table and its optimizer state in memory-mapped files on local
          disk and a bounded DRAM cache of warm rows (`engram_jax.offload.disk_table`):
          "disk" (DRAM cache of 1% of the rows), "disk@dram=0.05"; "cached@0.01+disk" or
          "cached@0.01+disk@dram=0.05" puts the hottest rows on the device in front of it.

On the CPU backend "host" and "device" memory are the same RAM: the host paths run and
are tested there, but moving rows costs only a memcpy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import jax

log = logging.getLogger(__name__)

#: The kinds of placement a table can have (`TablePlacement.kind`).
PLACEMENTS = ("device", "host", "cached")
HOST_GATHER_METHODS = ("numpy", "compute_on")
STORAGES = ("dram", "disk")
DEFAULT_DRAM_FRACTION = 0.01  # "disk" without "@dram=": 1% of the rows cached in DRAM


def memory_kinds(device: jax.Device | None = None) -> tuple[str, ...]:
  device = device or jax.devices()[0]
  return tuple(m.kind for m in device.addressable_memories())


def host_memory_kind(device: jax.Device | None = None) -> str:
  """`pinned_host` if the device offers it, else `unpinned_host` (logged); ValueError if neither."""
  device = device or jax.devices()[0]
  kinds = memory_kinds(device)
  if "pinned_host" in kinds:
    return "pinned_host"
  if "unpinned_host" in kinds:
    log.warning(
      "device %s has no pinned_host memory (kinds %s): host tables use unpinned_host, "
      "host-to-device copies will be slower",
      device,
      kinds,
    )
    return "unpinned_host"
  raise ValueError(f"device {device} exposes no host memory kind (has {kinds}); use placement='device'")


def sharding_for(kind: str, device: jax.Device | None = None) -> jax.sharding.SingleDeviceSharding:
  device = device or jax.devices()[0]
  return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def to_host(x, device: jax.Device | None = None) -> jax.Array:
  """Copies `x` into the host memory kind of `device` (see `host_memory_kind`)."""
  return jax.device_put(x, sharding_for(host_memory_kind(device), device))


def to_device(x, device: jax.Device | None = None) -> jax.Array:
  """Copies `x` into the device memory of `device` (default: the first device)."""
  return jax.device_put(x, sharding_for("device", device))


@dataclasses.dataclass(frozen=True)
class TablePlacement:
  """Placement of one Engram layer's table.

  Attributes:
    kind: "device", "host" or "cached".
    cache_fraction: for "cached", the fraction of the layer's rows kept on the device.
    frequency_file: for "cached", an .npy of row frequencies (see `load_frequencies`);
      None = count them on the data stream.
    host_gather: "numpy" (gather with NumPy on the host, then device_put; measured
      fastest, see experiments/bench/offload_lookup.py) or "compute_on" (gather inside
      jit under compute_on('device_host'), table in pinned_host memory).
    storage: where the host master of a "host" / "cached" table lives: "dram" (a NumPy
      array) or "disk" (memory-mapped files, `DiskTable`; host_gather "numpy" only).
    dram_fraction: for storage "disk", the DRAM cache of warm rows as a fraction of the
      layer's rows, in (0, 1] (None: DEFAULT_DRAM_FRACTION).
    disk_dir: for storage "disk", the folder of the working files (None: the trainer's
      workdir/disk_tables, else a temporary folder).
  """

  kind: str = "device"
  cache_fraction: float = 0.0
  frequency_file: str | None = None
  host_gather: str = "numpy"
  storage: str = "dram"
  dram_fraction: float | None = None
  disk_dir: str | None = None

  def __post_init__(self):
    if self.kind not in PLACEMENTS:
      raise ValueError(f"table placement must be one of {PLACEMENTS}, got {self.kind!r}")
    if self.host_gather not in HOST_GATHER_METHODS:
      raise ValueError(f"host_gather must be one of {HOST_GATHER_METHODS}, got {self.host_gather!r}")
    if self.kind == "cached" and not 0.0 < self.cache_fraction < 1.0:
      raise ValueError(f"placement 'cached' needs 0 < cache_fraction < 1, got {self.cache_fraction}")
    if self.kind != "cached" and (self.cache_fraction or self.frequency_file):
      raise ValueError(f"cache_fraction / frequency_file only apply to 'cached', not {self.kind!r}")
    if self.storage not in STORAGES:
      raise ValueError(f"table storage must be one of {STORAGES}, got {self.storage!r}")
    if self.storage == "dram":
      if self.dram_fraction is not None or self.disk_dir is not None:
        raise ValueError("dram_fraction / disk_dir only apply to storage='disk' (placements 'disk', 'cached@f+disk')")
      return
    if self.kind == "device":
      raise ValueError("storage='disk' needs a host placement ('host' or 'cached'), not 'device'")
    if self.host_gather != "numpy":
      raise ValueError(f"storage='disk' gathers with NumPy: host_gather must be 'numpy', got {self.host_gather!r}")
    if self.dram_fraction is None:
      object.__setattr__(self, "dram_fraction", DEFAULT_DRAM_FRACTION)
    frac = self.dram_fraction
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < frac <= 1.0:
      raise ValueError(f"the DRAM cache of a disk table (dram=) must be a fraction of its rows in (0, 1], got {frac!r}")

  @property
  def on_host(self) -> bool:
    """Whether the table lives off the device (host, cached or disk)."""
    return self.kind != "device"

  @property
  def on_disk(self) -> bool:
    """True when the host master is a `DiskTable` (storage "disk")."""
    return self.storage == "disk"

  @property
  def spec(self) -> str:
    """The placement as `parse_placements` reads it (without frequency_file / disk_dir)."""
    text = self.kind if self.kind != "cached" else f"cached@{self.cache_fraction:g}"
    if not self.on_disk:
      return text
    disk = f"disk@dram={self.dram_fraction:g}"
    return disk if self.kind == "host" else f"{text}+{disk}"


def _parse_disk(text: str) -> float | None:
  """ "disk" -> None (default DRAM cache), "disk@dram=F" -> F; anything else: ValueError."""
  kind, _, opts = text.partition("@")
  if kind.strip() != "disk":
    raise ValueError(f"expected 'disk' or 'disk@dram=F' after '+', got {text!r}")
  if not opts:
    return None
  key, eq, value = opts.partition("=")
  if key.strip() != "dram" or not eq:
    raise ValueError(f"disk options are 'dram=F' (DRAM cache, fraction of the rows), got {opts!r}")
  try:
    return float(value)
  except ValueError:
    raise ValueError(f"dram= needs a number (fraction of the rows in (0, 1]), got {value!r}") from None


def parse_one(text: str) -> TablePlacement:
  """One layer's placement: "device", "host", "cached@F", "disk[@dram=F]",
  "cached@F+disk[@dram=F]"; ValueError naming the bad part."""
  text = text.strip()
  head, plus, tail = text.partition("+")
  if plus:
    kind, _, frac = head.strip().partition("@")
    if kind != "cached":
      raise ValueError(f"'+disk' follows 'cached@F' only, got {head!r}")
    return TablePlacement(
      kind="cached", cache_fraction=float(frac) if frac else 0.0, storage="disk", dram_fraction=_parse_disk(tail)
    )
  if text.partition("@")[0].strip() == "disk":
    return TablePlacement(kind="host", storage="disk", dram_fraction=_parse_disk(text))
  kind, _, frac = text.partition("@")
  return TablePlacement(kind=kind, cache_fraction=float(frac) if frac else 0.0)


def parse_placements(spec: str, layer_ids: Sequence[int]) -> dict[int, TablePlacement]:
  """Parses a flag value into one placement per Engram layer.

  "host" applies to every layer; "1:host,15:cached@0.05" names layers (unnamed layers stay
  on the device); "cached@0.1" = cached with 10% of the rows on the device; "disk@dram=0.01"
  = on disk with 1% of the rows cached in DRAM; "cached@0.01+disk" = both.
  """
  layer_ids = tuple(int(l) for l in layer_ids)

  def one(text: str) -> TablePlacement:
    try:
      return parse_one(text)
    except ValueError as e:
      raise ValueError(f"bad table placement {text!r} in {spec!r}: {e}") from None

  spec = spec.strip()
  if ":" not in spec:
    p = one(spec or "device")
    return {l: p for l in layer_ids}
  out = {l: TablePlacement() for l in layer_ids}
  for item in spec.split(","):
    layer, _, text = item.partition(":")
    try:
      lid = int(layer)
    except ValueError:
      raise ValueError(f"bad layer id {layer!r} in table placement {spec!r}") from None
    if lid not in out:
      raise ValueError(f"table placement names layer {lid}, not an Engram layer {layer_ids}")
    out[lid] = one(text)
  return out


def layer_placements(
  placements: str | Mapping[int, TablePlacement], layer_ids: Sequence[int]
) -> dict[int, TablePlacement]:
  """{layer: TablePlacement} for every layer of `layer_ids`: a spec parsed
  (`parse_placements`), or a mapping checked (layers it does not name stay on the device;
  a key that is not one of `layer_ids` is a ValueError, a value that is not a
  `TablePlacement` a TypeError)."""
  layer_ids = tuple(int(l) for l in layer_ids)
  if isinstance(placements, str):
    return parse_placements(placements, layer_ids)
  placements = {int(l): p for l, p in placements.items()}
  unknown = sorted(set(placements) - set(layer_ids))
  if unknown:
    raise ValueError(f"placements name layers {unknown} that are not Engram layers {list(layer_ids)}")
  for l, p in placements.items():
    if not isinstance(p, TablePlacement):
      raise TypeError(f"placements[{l}] must be a TablePlacement, got {type(p).__name__}")
  return {l: placements.get(l, TablePlacement()) for l in layer_ids}


def format_placements(placements: Mapping[int, TablePlacement]) -> str:
  """The spec `parse_placements` reads back into `placements` (kind, cache and DRAM
  fractions, storage; a spec does not carry frequency_file, host_gather or disk_dir): one
  placement for every layer when they agree ("host"), else the layers not on the device
  ("1:host,15:cached@0.05")."""
  specs = {int(l): p.spec for l, p in sorted(placements.items())}
  if len(set(specs.values())) <= 1:
    return next(iter(specs.values()), "device")
  return ",".join(f"{l}:{s}" for l, s in specs.items() if s != "device")
