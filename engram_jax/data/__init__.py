"""Input pipeline (grain): sources, tokenizer, packing and host-side Engram hashing."""

from engram_jax.data.config import DataConfig
from engram_jax.data.corpus import (
  TRAIN,
  VALIDATION,
  split_of,
  stable_hash,
  stdlib_files,
)
from engram_jax.data.engram_ids import EngramRowHasher
from engram_jax.data.packing import EXAMPLE_KEYS, PackedBatchIterDataset, row_to_example
from engram_jax.data.pipeline import (
  batch_spec,
  checkpoint_args,
  eval_corpus,
  make_eval_batches,
  make_train_dataset,
  make_train_iterator,
  train_corpus,
)
from engram_jax.data.sources import Corpus, SourceSpec, build_corpus, parse_source
from engram_jax.data.tokenizer import (
  SpecialIds,
  load_or_train_tokenizer,
  special_ids,
  token_byte_lengths,
  train_bpe_tokenizer,
)

__all__ = [
  "EXAMPLE_KEYS",
  "TRAIN",
  "VALIDATION",
  "Corpus",
  "DataConfig",
  "EngramRowHasher",
  "PackedBatchIterDataset",
  "SourceSpec",
  "SpecialIds",
  "batch_spec",
  "build_corpus",
  "checkpoint_args",
  "eval_corpus",
  "load_or_train_tokenizer",
  "make_eval_batches",
  "make_train_dataset",
  "make_train_iterator",
  "parse_source",
  "row_to_example",
  "special_ids",
  "split_of",
  "stable_hash",
  "stdlib_files",
  "token_byte_lengths",
  "train_bpe_tokenizer",
  "train_corpus",
]
