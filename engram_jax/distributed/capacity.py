"""Per-device memory of row-sharded Engram tables: it falls as 1/devices.

Each Engram layer holds one table [R, d_h] (all heads stacked, R = heads * rows per head)
split by rows over S devices (padded to a multiple of S, `padded_num_rows`), so a device
holds ceil(R / S) * d_h entries per layer. Only the table itself is counted; Adam's two
float32 moments add 8 bytes per entry on top, sharded the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from engram_jax.distributed.sharded_lookup import padded_num_rows


@dataclasses.dataclass(frozen=True)
class TableConfig:
  """The Engram tables of one model: `layers` tables of heads * rows_per_head rows."""

  name: str
  layers: int
  heads: int  # H = (N-1) * K
  rows_per_head: int
  head_dim: int  # d_h

  @property
  def rows_per_layer(self) -> int:
    """Rows of one layer's table: heads * rows_per_head."""
    return self.heads * self.rows_per_head

  @property
  def num_params(self) -> int:
    """Table entries over all layers: layers * rows_per_layer * head_dim."""
    return self.layers * self.rows_per_layer * self.head_dim


#: The paper's tables. ENGRAM_SPEC.md §5: Engram-27B has orders {2, 3} x 8 heads, d_mem 1280
#: (d_h = 80), 2,262,400 nominal rows per head, Engram at 2 layers: 5.79e9 entries (paper:
#: "5.7B"). §7: the 100B-parameter table of the host-offload experiment; its layout is not
#: given, so it uses the 27B layout with more rows per head (100e9 / (2 * 16 * 80)).
PAPER_TABLES: tuple[TableConfig, ...] = (
  TableConfig("Engram-27B", layers=2, heads=16, rows_per_head=2_262_400, head_dim=80),
  TableConfig("Engram-100B", layers=2, heads=16, rows_per_head=39_062_500, head_dim=80),
)


ADAM_BYTES_PER_PARAM = 8  # two float32 moments


def per_device_bytes(config: TableConfig, num_devices: int, dtype, adam: bool = False) -> int:
  """Bytes of table (plus Adam's moments if `adam`) one device holds when every layer's
  table is split over num_devices."""
  rows = padded_num_rows(config.rows_per_layer, num_devices) // num_devices
  per_param = np.dtype(dtype).itemsize + (ADAM_BYTES_PER_PARAM if adam else 0)
  return config.layers * rows * config.head_dim * per_param


def capacity_rows(
  configs: Sequence[TableConfig] = PAPER_TABLES,
  devices: Sequence[int] = (1, 2, 4, 8, 16, 64),
  dtypes: Sequence[str] = ("bfloat16", "float32"),
  adam: bool = False,
) -> list[dict]:
  """One record per (config, dtype): name, params, dtype, adam, and bytes per device count."""
  import jax.numpy as jnp  # bfloat16 as a NumPy dtype

  out = []
  for config in configs:
    for dtype in dtypes:
      dt = jnp.dtype(dtype)
      out.append(
        {
          "name": config.name,
          "params": config.num_params,
          "dtype": dtype,
          "adam": adam,
          "bytes": {n: per_device_bytes(config, n, dt, adam) for n in devices},
        }
      )
  return out


def _gib(nbytes: int) -> str:
  return f"{nbytes / 2**30:.2f}"


def capacity_table_markdown(
  configs: Sequence[TableConfig] = PAPER_TABLES,
  devices: Sequence[int] = (1, 2, 4, 8, 16, 64),
  dtypes: Sequence[str] = ("bfloat16", "float32"),
  with_adam: bool = True,
) -> str:
  """Markdown table of per-device memory (GiB) for each config, dtype and device count:
  the table alone, and (with_adam) the table plus Adam's two float32 moments."""
  head = "| table | params | stored | " + " | ".join(f"{n} dev" for n in devices) + " |"
  rule = "|---|---:|---|" + "---:|" * len(devices)
  lines = [head, rule]
  records = capacity_rows(configs, devices, dtypes)
  if with_adam:
    records += capacity_rows(configs, devices, dtypes, adam=True)
  for rec in records:
    cells = " | ".join(_gib(rec["bytes"][n]) for n in devices)
    stored = rec["dtype"] + (" + Adam m, v (f32)" if rec["adam"] else "")
    lines.append(f"| {rec['name']} | {rec['params'] / 1e9:.2f}B | {stored} | {cells} |")
  lines.append("")
  lines.append("GiB per device; every layer's table split evenly by rows over the devices.")
  return "\n".join(lines)
