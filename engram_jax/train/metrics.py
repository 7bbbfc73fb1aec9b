"""Metric sinks: JSON Lines and TensorBoard event files in the run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
  """Appends {"step", "split", "time", ...metrics} rows to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / "metrics.jsonl"
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
    row = {"step": int(step), "split": split, "time": time.time()}
    row.update({k: float(v) for k, v in metrics.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
  """Rows of a run's metrics.jsonl (optionally one split)."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]
