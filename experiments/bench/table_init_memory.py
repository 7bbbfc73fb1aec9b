r"""Host memory to create a disk-placed Engram table: drawn block by block (`build_offloaded`,
`engram_jax.layers.table_init`) against the whole table drawn by one program and copied into
the file (the way before block init), measured in the same run, each in its own process.

Prints, per way: the table's size on disk, wall time, and the peak anonymous memory of the
process (RssAnon sampled every 20 ms: the file's pages, which RSS also counts, are the
kernel's to evict and are excluded), with its ratio to the table's size.

  JAX_PLATFORMS=cpu python -m experiments.bench.table_init_memory --rows_per_head=8000000   # 1.9 GiB
  JAX_PLATFORMS=cpu python -m experiments.bench.table_init_memory --rows_per_head=32000000 --ways=blocks
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from absl import app, flags

_ROWS = flags.DEFINE_integer("rows_per_head", 8_000_000, "Hashed rows per head (2 heads, 32 float32 values a row).")
_WAYS = flags.DEFINE_list("ways", ["blocks", "whole"], "blocks: build_offloaded; whole: one program, then copied.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one way in this process.")


def _peak_anon_sampler() -> list[int]:
  peak = [0]

  def watch():
    while True:
      with open("/proc/self/status") as f:
        for line in f:
          if line.startswith("RssAnon:"):
            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
      time.sleep(0.02)

  threading.Thread(target=watch, daemon=True).start()
  return peak


def _child(way: str, rows: int) -> None:
  import jax
  import numpy as np

  from engram_jax import EngramConfig
  from engram_jax.models import host_init
  from engram_jax.models.config import ModelConfig
  from engram_jax.offload.disk_table import DiskTable
  from engram_jax.train.state import build_model

  engram = EngramConfig(vocab_sizes=(rows, rows), n_embed_per_ngram=32, n_head_per_ngram=1, layer_ids=(1,), pad_id=0)
  config = ModelConfig.tiny("engram_dense", num_layers=2, engram=engram)
  build = lambda: build_model(config, 0)  # noqa: E731
  peak = _peak_anon_sampler()
  start = time.perf_counter()
  if way == "blocks":
    _, offloaded = host_init.build_offloaded(build, "disk@dram=0.001")
    table = offloaded.stores[1].table
  else:
    value = jax.jit(host_init.host_table_init(build, 1))()
    array = np.array(value)
    value.delete()
    table = DiskTable.create(None, array, cache_fraction=0.001)
    del array
  seconds = time.perf_counter() - start
  nbytes = table.num_rows * table.dim * np.dtype(table.dtype).itemsize
  print(
    f"{way:>6}: table {nbytes / 2**30:.2f} GiB on disk, {seconds:.1f} s, peak anonymous memory {peak[0] / 2**30:.2f} GiB ({peak[0] / nbytes:.2f}x the table)"
  )


def main(argv):
  del argv
  if _CHILD.value:
    return _child(_CHILD.value, _ROWS.value)
  for way in _WAYS.value:  # one process per way: each peak is its own
    out = subprocess.run(
      [sys.executable, "-m", "experiments.bench.table_init_memory", f"--child={way}", f"--rows_per_head={_ROWS.value}"],
      capture_output=True,
      text=True,
    )
    lines = [l for l in out.stdout.splitlines() if "peak anonymous" in l]
    print(lines[-1] if lines else f"{way}: failed (exit {out.returncode})\n{out.stderr[-2000:]}")


if __name__ == "__main__":
  app.run(main)
