"""Where an Engram layer's table lives, and the memory kinds that hold it.

Placements (one per Engram layer):
  device  the table is a device array (default; the layer gathers itself).
  host    the whole table in host memory (`pinned_host` when the backend has it); the
          rows a step needs are gathered on the host and copied to the device.
  cached  the most frequent rows on the device (`HotRowCache`), the rest on the host.

On the CPU backend "host" and "device" memory are the same RAM: the host paths run and
are tested there, but moving rows costs only a memcpy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax

log = logging.getLogger(__name__)

PLACEMENTS = ("device", "host", "cached")
HOST_GATHER_METHODS = ("numpy", "compute_on")


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
  """

  kind: str = "device"
  cache_fraction: float = 0.0
  frequency_file: str | None = None
  host_gather: str = "numpy"

  def __post_init__(self):
    if self.kind not in PLACEMENTS:
      raise ValueError(f"table placement must be one of {PLACEMENTS}, got {self.kind!r}")
    if self.host_gather not in HOST_GATHER_METHODS:
      raise ValueError(f"host_gather must be one of {HOST_GATHER_METHODS}, got {self.host_gather!r}")
    if self.kind == "cached" and not 0.0 < self.cache_fraction < 1.0:
      raise ValueError(f"placement 'cached' needs 0 < cache_fraction < 1, got {self.cache_fraction}")
    if self.kind != "cached" and (self.cache_fraction or self.frequency_file):
      raise ValueError(f"cache_fraction / frequency_file only apply to 'cached', not {self.kind!r}")

  @property
  def on_host(self) -> bool:
    return self.kind != "device"


def parse_placements(spec: str, layer_ids: Sequence[int]) -> dict[int, TablePlacement]:
  """Parses a flag value into one placement per Engram layer.

  "host" applies to every layer; "1:host,15:cached@0.05" names layers (unnamed layers stay
  on the device); "cached@0.1" = cached with 10% of the rows on the device.
  """
  layer_ids = tuple(int(l) for l in layer_ids)

  def one(text: str) -> TablePlacement:
    kind, _, frac = text.strip().partition("@")
    try:
      return TablePlacement(kind=kind, cache_fraction=float(frac) if frac else 0.0)
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
