"""One process of tests/test_host_shards.py's 2-process run (and the one-process reference).

    python -m tests.host_shards_worker PORT PROCESS_ID OUTDIR

Trains the tiny Engram model (tests/test_offload_model.py's CONFIG, every Engram layer
host-placed) with `ShardedHostTableTrainer` on its half of every global batch, then writes
OUTDIR/result.{i}.json (metrics, the rows it holds), its table shards and a collective
checkpoint after step 2 (OUTDIR/ckpt: dense state + table shards), from which a new
trainer resumes and must repeat steps 3-4 exactly.
"""

import json
import sys
from pathlib import Path

import numpy as np

STEPS, B, T = 4, 4, 16


def global_batches(model, steps=STEPS, seed=0):
  """The same global batches [B, T] on every process: random tokens and hashed ids."""
  from tests.test_offload_model import CONFIG

  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    ids = {
      l: np.stack([rng.integers(0, s, (B, T)) for s in model.blocks[l].engram.table_sizes], -1).astype(np.int32)
      for l in CONFIG.engram_layer_ids
    }
    tokens = rng.integers(0, CONFIG.vocab_size, (B, T + 1)).astype(np.int32)
    out.append(
      {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "engram_ids": ids, "loss_mask": np.ones((B, T), np.float32)}
    )
  return out


def _floats(metrics):
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def reference_run():
  """The one-process host run (`HostTableTrainer`, one device) on the global batches."""
  import jax
  from flax import nnx

  from engram_jax.models.offloaded import forward_with_host_tables
  from engram_jax.train.host_trainer import HostTableTrainer
  from engram_jax.train.loss import masked_lm_loss, summarize_eval
  from tests.test_offload_model import fresh_model
  from tests.test_offload_training import RATE, TRAIN

  model = fresh_model()
  batches = global_batches(model)
  trainer = HostTableTrainer(model, "host", TRAIN, bias_update_rate=RATE)
  history = [_floats(jax.device_get(trainer.step(b)[0])) for b in batches]
  tables = {str(l): t.numpy().copy() for l, t in trainer.offloaded.tables.items()}
  # validation loss of the trained model on the first 2 global batches
  trained = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.rest)
  sums = [
    masked_lm_loss(forward_with_host_tables(trained, b, trainer.offloaded)[0], b["targets"], b["loss_mask"])[1]
    for b in batches[:2]
  ]
  val = summarize_eval({k: sum(float(x[k]) for x in sums) for k in sums[0]})
  return {"history": history, "tables": tables, "num_rows": {l: t.shape[0] for l, t in tables.items()}, "eval": val}


def main(port: int, process_id: int, outdir: Path) -> None:
  import jax

  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
  from engram_jax import sharding as sharding_lib
  from engram_jax.train.sharded_host_trainer import ShardedHostTableTrainer
  from engram_jax.train.state import build_model
  from tests.test_offload_model import CONFIG, fresh_model
  from tests.test_offload_training import RATE, TRAIN

  mesh = sharding_lib.make_mesh(data=2)
  model = fresh_model()
  batches = global_batches(model)
  # from a build function: each device initialises its rows of the tables (never whole)
  trainer = ShardedHostTableTrainer(lambda: build_model(CONFIG, 0), TRAIN, mesh, bias_update_rate=RATE)
  rows = slice(process_id * B // 2, (process_id + 1) * B // 2)
  local = [
    {k: ({l: v[rows] for l, v in x.items()} if k == "engram_ids" else x[rows]) for k, x in b.items()} for b in batches
  ]
  half = STEPS // 2
  history = [_floats(m) for m in trainer.train(local[:half])]
  trainer.save(outdir / "ckpt")  # a collective checkpoint after step 2, then steps 3-4
  history += [_floats(m) for m in trainer.train(local[half:])]
  val = trainer.evaluate(local[:2])  # the trained model on its rows of 2 global batches
  shards = {}
  for l, t in trainer.tables.items():
    assert t.state.m.shape == t.state.v.shape == t.table.shape and t.state.count.shape == t.table.shape[:1]
    shards[str(l)] = (t.lo, t.hi, int(t.table.shape[0]), t.plan.num_rows)
    np.save(outdir / f"table.{l}.p{process_id}.npy", t.table)
  # resume: a new trainer (from a built model this time) restored from the checkpoint
  # repeats steps 3-4 exactly
  resumed = ShardedHostTableTrainer(fresh_model(), TRAIN, mesh, bias_update_rate=RATE)
  resumed.restore(outdir / "ckpt")
  again = [_floats(m) for m in resumed.train(local[half:])]
  equal = again == history[half:] and all(
    all(np.array_equal(a, b) for a, b in zip((resumed.tables[l].table, *resumed.tables[l].state), (t.table, *t.state)))
    for l, t in trainer.tables.items()
  )
  result = {
    "history": history,
    "shards": shards,
    "resumed_equal": equal,
    "eval": val,
    "host_bytes": trainer.host_bytes(),
  }
  (outdir / f"result.{process_id}.json").write_text(json.dumps(result))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
