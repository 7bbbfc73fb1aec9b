"""The grain input pipeline: documents -> tokens -> packed rows -> batches with Engram rows.

  Corpus (random access, str) [+ planted facts, `engram_jax.data.facts`]
    -> S = B / rows_per_stream document streams (disjoint shards of the documents), each:
       shuffle(seed, stream), a new order every epoch; repeat forever [MapDataset]
       -> drop blank documents; tokenize + <eos>                      [read threads]
       -> concat-then-split into rows_per_stream rows of T + 1 tokens (segment ids, positions)
       -> inputs / targets / loss mask / target bytes
    -> interleave: a batch is the next rows of every stream, so it draws from >= S documents
    -> compress + hash n-grams per Engram layer (host, NumPy, whole batch at once)
    -> prefetch: `num_workers` processes (mp_prefetch) or one background thread

Every batch is a dict of NumPy arrays (B = batch_size, T = seq_len, H = (N-1)*K):
  tokens, targets, segment_ids, positions, target_bytes: int32 [B, T]; loss_mask:
  float32 [B, T]; engram_rows: {layer_id: int32 [B, T, H]} ({} without Engram).
(With workers, some arrays arrive as grain's SharedMemoryArray, an np.ndarray subclass.)

The order is a pure function of (corpus, tokenizer, seed, seq_len, batch_size,
rows_per_stream, num_workers, shard): changing num_workers changes which worker packs which documents.
Checkpointing: the iterator is a `grain.DatasetIterator`; store it in an orbax
checkpoint with `grain.checkpoint.CheckpointSave(iterator)` and restore with
`grain.checkpoint.CheckpointRestore(iterator)` (see `checkpoint_args`), or use
`iterator.get_state()` / `set_state()` (JSON-able dicts) directly.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from engram_jax.config import EngramConfig
from engram_jax.data.config import DataConfig
from engram_jax.data.engram_ids import EngramRowHasher
from engram_jax.data.eval_set import chunk_eval_batches
from engram_jax.data.facts import FactMixedCorpus, facts_for
from engram_jax.data.packing import (
  BatchToExample,
  InterleaveRowsIterDataset,
  PackedBatchIterDataset,
  TokenizeDocument,
  has_text,
)
from engram_jax.data.sources import Corpus
from engram_jax.data.splits import eval_corpus, train_corpus
from engram_jax.data.tokenizer import special_ids, token_byte_lengths

Batch = dict[str, Any]

_READ_BUFFER = 64  # documents read + tokenized ahead per process


def _batch_dataset(docs: grain.MapDataset, config: DataConfig, tokenizer, batch_size: int) -> grain.IterDataset:
  """Documents (MapDataset of str) -> packed example batches without Engram rows."""
  ids = special_ids(tokenizer)
  ds = docs.filter(has_text).map(TokenizeDocument(tokenizer, ids.eos))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=_READ_BUFFER))
  ds = PackedBatchIterDataset(ds, batch_size=batch_size, seq_len=config.seq_len, pad_id=ids.pad)
  return ds.map(BatchToExample(ids.pad, token_byte_lengths(tokenizer)))


def make_train_dataset(
  config: DataConfig,
  tokenizer,
  engram_config: EngramConfig | None = None,
  *,
  row_hasher: EngramRowHasher | None = None,
  corpus: Corpus | None = None,
  shard: tuple[int, int] = (0, 1),
) -> grain.IterDataset:
  """The infinite training dataset of batches (see the module docstring).

  Args:
    config: the data config.
    tokenizer: a `tokenizers.Tokenizer` (`load_or_train_tokenizer`).
    engram_config: Engram layers to hash for; None = "engram_ids" is {}.
    row_hasher: a prebuilt `EngramRowHasher` (overrides engram_config).
    corpus: the training documents (default `train_corpus(config)`); with
      `config.num_facts` the planted facts are added to it.
    shard: (index, count): this host reads documents index, index + count, ... (pass
      (jax.process_index(), jax.process_count()) for multi-host data parallelism).
  """
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
  corpus = corpus if corpus is not None else train_corpus(config)
  if config.num_facts:
    corpus = FactMixedCorpus(corpus, facts_for(config, tokenizer).trained, config.fact_repeats)
  if len(corpus) < count:
    raise ValueError(f"{len(corpus)} training documents cannot be sharded over {count} hosts")
  if row_hasher is None:
    row_hasher = EngramRowHasher.build(engram_config, tokenizer, special_ids(tokenizer).pad)
  docs = grain.MapDataset.source(corpus)[index::count]
  streams = config.batch_size // config.rows_per_stream
  if streams == 1:  # the single-stream packing, exactly as before streams existed
    ds = _batch_dataset(docs.shuffle(seed=config.seed).repeat(None), config, tokenizer, config.batch_size)
  else:
    if len(docs) < streams:
      raise ValueError(
        f"{len(docs)} training documents cannot feed {streams} document streams "
        f"(DataConfig.batch_size={config.batch_size} / rows_per_stream="
        f"{config.rows_per_stream}); raise rows_per_stream"
      )
    ds = InterleaveRowsIterDataset(
      [
        _batch_dataset(
          docs[j::streams].shuffle(seed=_stream_seed(config.seed, j)).repeat(None),
          config,
          tokenizer,
          config.rows_per_stream,
        )
        for j in range(streams)
      ]
    )
  # Hash whole batches: one vectorized NumPy pass instead of one per row.
  ds = ds.map(row_hasher)
  if config.num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=max(1, config.prefetch_buffer_size)
      )
    )
  elif config.prefetch_buffer_size > 0:
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch_buffer_size)
  return ds


def _stream_seed(seed: int, stream: int) -> int:
  # distinct, decorrelated shuffles per stream, a pure function of (seed, stream)
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they
  # are unparsed and reading them raises. Defaults are what we want there.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(
  config: DataConfig, tokenizer, engram_config: EngramConfig | None = None, **kwargs
) -> grain.DatasetIterator:
  """An iterator over training batches; deterministic for a seed, checkpointable.

  Takes the arguments of `make_train_dataset`. Close it (`.close()`) when using workers.
  """
  return iter(make_train_dataset(config, tokenizer, engram_config, **kwargs))


def make_eval_batches(
  config: DataConfig, tokenizer, engram_config: EngramConfig | None = None, *, row_hasher: EngramRowHasher | None = None
) -> list[Batch]:
  """The fixed validation set: the same batches for every model with the same tokenizer.

  `config.eval_set="chunks"` (default): line-aligned chunks from every validation
  document, round-robin, `config.eval_tokens` scored tokens (`engram_jax.data.eval_set`).
  "packed": validation documents in their fixed (stable-hash) order, packed like training
  rows. Either way `config.eval_rows` rows per batch, at most `config.num_eval_batches`
  batches (no cap if None); the last batch is padded with empty rows (loss_mask 0).
  """
  ids = special_ids(tokenizer)
  if row_hasher is None:
    row_hasher = EngramRowHasher.build(engram_config, tokenizer, ids.pad)
  if config.eval_set == "chunks":
    return chunk_eval_batches(eval_corpus(config), tokenizer, config, row_hasher)
  docs = grain.MapDataset.source(eval_corpus(config))
  batches = []
  for batch in _batch_dataset(docs, config, tokenizer, config.eval_rows):
    batches.append(row_hasher(batch))
    if config.num_eval_batches is not None and len(batches) == config.num_eval_batches:
      break
  return batches


def checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False):
  """Orbax args that save (or restore in place) a training iterator's position.

  Use inside a Composite, e.g.
    manager.save(step, args=ocp.args.Composite(state=..., data=checkpoint_args(it)))
    manager.restore(step, args=ocp.args.Composite(state=..., data=checkpoint_args(it,
                                                                        restore=True)))
  The handler (`grain.checkpoint.CheckpointHandler`) writes one JSON file per process.
  """
  import grain.checkpoint as grain_checkpoint  # registers the args with orbax

  return grain_checkpoint.CheckpointRestore(iterator) if restore else grain_checkpoint.CheckpointSave(iterator)


def batch_spec(config: DataConfig, engram_config: EngramConfig | None = None) -> dict[str, Any]:
  """Shapes and dtypes of a training batch: {name: (shape, dtype)} (engram_rows nested)."""
  b, t = config.batch_size, config.seq_len
  spec: dict[str, Any] = {
    k: ((b, t), np.int32) for k in ("tokens", "targets", "segment_ids", "positions", "target_bytes")
  }
  spec["loss_mask"] = ((b, t), np.float32)
  spec["engram_ids"] = (
    {}
    if engram_config is None
    else {layer: ((b, t, engram_config.num_heads), np.int32) for layer in engram_config.layer_ids}
  )
  return spec
