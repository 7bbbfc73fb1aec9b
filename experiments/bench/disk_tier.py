r"""Disk tier benchmark: training step time and hit rates of a disk-placed Engram table at DRAM
cache sizes of 0.1% / 1% / 10% of its rows, with and without the device hot-row cache in
front, against the host-placed (DRAM) table measured in the same run.

Data: the built-in corpus (DataConfig's default source "stdlib": the Python standard library
shipped with the interpreter), tokenized and hashed by the library's pipeline; the same
batches for every placement. Model: the tiny Engram+MoE model with a large Engram table
(--rows_per_head per head), so the table is 10x to 1000x its DRAM cache.

Per placement it prints
  step_ms   median step time (device step + host sparse Adam; the next step's rows are
            read by the prefetch thread during the step), mean ± SE over --repeats rounds
            (each round runs every placement once); ratio: to "host" in the same round,
            mean ± SE of the paired ratios;
  device    share of the row lookups (id occurrences) served by the device hot-row cache;
  dram      share of the distinct rows the host tier looked up (the device cache's misses)
            that came from the DRAM cache;
  disk      share read from the memory-mapped file (the rest), and rows / MiB read from
            the file per step, the hot cache's refreshes included ("hot refresh": device-hot
            rows updated by the step, re-read from the file, never through DRAM);
  cache     the DRAM cache's size (rows and MiB) against the table's.
`--evict_page_cache` drops the files' pages from the OS page cache (flush + fadvise
DONTNEED) before every timed step, outside the timed region, so the file reads of that step
come from the device, as for a table larger than RAM; without it the files (smaller than
this machine's RAM) stay in the page cache after their first read.

  JAX_PLATFORMS=cpu python -m experiments.bench.disk_tier                 # ~2 min on 2 cores
  JAX_PLATFORMS=cpu python -m experiments.bench.disk_tier --evict_page_cache
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from engram_jax.config import EngramConfig
from engram_jax.data import DataConfig
from engram_jax.data.pipeline import make_train_iterator
from engram_jax.models.config import ModelConfig
from engram_jax.models.host_init import build_offloaded
from engram_jax.offload import parse_placements
from engram_jax.offload.disk_table import DiskTable, disk_bytes, with_disk_dir
from engram_jax.offload.hot_cache import HotRowCache, count_row_frequencies
from engram_jax.offload.indexing import flat_rows_np
from engram_jax.train.host_trainer import HostTableTrainer
from engram_jax.train.state import build_model
from engram_jax.train.trainer import Trainer
from experiments.bench.shared import TRAIN

_ROWS = flags.DEFINE_integer("rows_per_head", 250_000, "Nominal rows per Engram head (8 heads).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per placement.")
_WARMUP = flags.DEFINE_integer("warmup", 4, "Untimed steps per placement (compile, cache fill).")
_FRACTIONS = flags.DEFINE_list("dram", ["0.001", "0.01", "0.1"], "DRAM cache sizes (fractions of the rows).")
_HOT = flags.DEFINE_float("hot", 0.01, "Device hot-row cache of the cached@f+disk runs (fraction of the rows).")
_EVICT = flags.DEFINE_bool("evict_page_cache", False, "Drop the files' pages before each timed step.")
_RANK = flags.DEFINE_integer("rank_batches", 200, "Batches after the timed ones that rank the device-hot rows.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Rounds over all placements (mean ± SE of the paired ratios).")
_DIR = flags.DEFINE_string("disk_dir", "", "Folder of the working files (default: a temporary folder).")

LAYER = 1


@dataclasses.dataclass
class Row:
  placement: str
  step_ms: float
  device: float = float("nan")
  dram: float = float("nan")
  disk: float = float("nan")
  disk_rows: float = float("nan")
  disk_mib: float = float("nan")
  refresh_rows: float = float("nan")
  step_se: float = float("nan")
  ratio: float = float("nan")
  ratio_se: float = float("nan")
  cache_rows: int = 0
  cache_mib: float = 0.0


def _evict(table: DiskTable) -> None:
  table.flush()
  names = [table.numpy().filename] + [a.filename for a in table._state or ()]  # noqa: SLF001
  for name in names:
    fd = os.open(name, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _run(build, spec, batches, frequencies, disk_dir, reuse):
  placements = with_disk_dir(parse_placements(spec, (LAYER,)), disk_dir)
  model, offloaded = build_offloaded(build, placements, frequencies=frequencies)
  trainer = HostTableTrainer(model, offloaded, TRAIN, reuse_step_of=reuse)
  store = offloaded.host_stores[LAYER]
  table, source = store.table, getattr(store, "cache", store.table)  # source: what the step reads
  times, last = [], None
  it = trainer.iterate(iter(batches))
  for i in range(len(batches)):
    if i == _WARMUP.value:
      if isinstance(table, DiskTable):
        table.reset_stats()
      if isinstance(source, HotRowCache):
        source.reset_stats()
    if i >= _WARMUP.value and _EVICT.value and isinstance(table, DiskTable):
      _evict(table)
    start = time.perf_counter()
    metrics = next(it)
    jax.block_until_ready(metrics)
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
    last = metrics
  it.close()
  del last
  row = Row(spec, 1e3 * float(np.median(times)))
  if isinstance(source, HotRowCache):
    row.device = source.hit_rate
  if isinstance(table, DiskTable):
    c = table.cache
    row.dram, row.disk = c.hits / (c.hits + c.misses), c.misses / (c.hits + c.misses)
    row.refresh_rows = table.bypassed / _STEPS.value
    row.disk_rows = (c.misses + table.bypassed) / _STEPS.value
    row.disk_mib = row.disk_rows * table.dim * table.dtype.itemsize / 2**20
    row.cache_rows, row.cache_mib = c.capacity, c.nbytes / 2**20
  return trainer, row


def main(argv):
  del argv
  work = Path(tempfile.mkdtemp(prefix="disk_tier_bench_"))
  disk_dir = Path(_DIR.value) if _DIR.value else work / "disk"
  try:
    engram = EngramConfig(
      vocab_sizes=(_ROWS.value, _ROWS.value), n_embed_per_ngram=64, n_head_per_ngram=4, layer_ids=(LAYER,), pad_id=0
    )
    data = DataConfig(seq_len=64, batch_size=8, bpe_vocab_size=512, max_bytes=2_000_000, tokenizer_train_bytes=300_000)
    # the Trainer resolves the model against the tokenizer and builds the row hasher
    setup = Trainer(ModelConfig.tiny("engram_moe", vocab_size=512, engram=engram), TRAIN, data, work / "run")
    cfg = setup.model_config
    it = make_train_iterator(data, setup.tokenizer, row_hasher=setup.row_hasher)
    batches = [next(it) for _ in range(_WARMUP.value + _STEPS.value)]
    # the hot rows are ranked on the batches that follow (not on the timed ones)
    ranking = [next(it) for _ in range(_RANK.value)]
    build = lambda: build_model(cfg, 0)  # noqa: E731
    shape_model = nnx.eval_shape(build)
    engram_layer = shape_model.blocks[LAYER].engram
    rows, dim = int(engram_layer.num_rows), int(engram_layer.table.shape[1])
    offsets = np.asarray(engram_layer.offsets, np.int64)
    counts = count_row_frequencies([flat_rows_np(np.asarray(b["engram_ids"][LAYER]), offsets) for b in ranking], rows)
    frequencies = {LAYER: counts}
    table_mib = rows * dim * 4 / 2**20
    lookups = batches[0]["engram_ids"][LAYER].size
    print(
      f"table: {rows:,} rows x {dim} float32 = {table_mib:.1f} MiB (+ Adam m, v, count: "
      f"{disk_bytes(rows, dim, np.float32)['total'] / 2**20:.1f} MiB on disk per copy); "
      f"{lookups} lookups per step; built-in corpus; {_STEPS.value} timed steps"
    )
    specs = ["host"] + [f"disk@dram={f}" for f in _FRACTIONS.value]
    specs += [f"cached@{_HOT.value:g}+disk@dram={f}" for f in _FRACTIONS.value]
    # rounds: every placement once per round, in order; ratios paired within a round
    rounds, reuse = [], None
    for k in range(_REPEATS.value):
      rows_of_round = {}
      for spec in specs[k % len(specs) :] + specs[: k % len(specs)]:  # order rotated per round
        trainer, row = _run(build, spec, batches, frequencies, disk_dir, reuse)
        reuse = reuse or trainer
        rows_of_round[spec] = row
        shutil.rmtree(disk_dir, ignore_errors=True)
      rounds.append([rows_of_round[spec] for spec in specs])
    results = rounds[-1]  # hit rates are the same in every round (same batches)
    n = len(rounds)
    se = lambda x: float(np.std(x, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    for i, r in enumerate(results):
      times = [rd[i].step_ms for rd in rounds]
      ratios = [rd[i].step_ms / rd[0].step_ms for rd in rounds]
      r.step_ms, r.step_se = float(np.mean(times)), se(times)
      r.ratio, r.ratio_se = float(np.mean(ratios)), se(ratios)
    print(
      f"\n{'placement':34s} {'step_ms':>13s} {'ratio':>13s} {'device':>7s} {'dram':>6s} {'disk':>6s} "
      f"{'disk rows/step':>14s} {'hot refresh':>11s} {'MiB/step':>8s} {'cache rows':>10s} {'cache MiB':>9s}"
    )
    for r in results:
      pct = lambda x: "-" if np.isnan(x) else f"{100 * x:.1f}%"  # noqa: E731
      num = lambda x, f: "-" if np.isnan(x) else format(x, f)  # noqa: E731
      print(
        f"{r.placement:34s} {r.step_ms:6.1f} ± {r.step_se:4.1f} {r.ratio:5.2f} ± {r.ratio_se:5.2f} {pct(r.device):>7s} {pct(r.dram):>6s} "
        f"{pct(r.disk):>6s} {num(r.disk_rows, '14.0f')} {num(r.refresh_rows, '11.0f')} {num(r.disk_mib, '8.2f')} "
        f"{r.cache_rows:10d} "
        f"{r.cache_mib:9.2f}"
      )
    print(
      f"\nstep_ms: mean ± SE over {n} rounds of each round's median step time; ratio = step time / the host-placed (DRAM) step time of the same round (same batches), mean ± SE; page cache "
      f"{'evicted before each step' if _EVICT.value else 'warm'}"
    )
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
