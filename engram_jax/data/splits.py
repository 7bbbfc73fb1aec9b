"""The training and validation documents of a `DataConfig` (below the tokenizer and the
pipeline, which both read them)."""

from __future__ import annotations

from engram_jax.data import corpus as corpus_lib
from engram_jax.data.config import DataConfig
from engram_jax.data.sources import Corpus, build_corpus


def train_corpus(config: DataConfig) -> Corpus:
  """Training documents: all of `sources` if `eval_sources` is set, else their train split;
  capped by `max_documents` / `max_bytes`."""
  split = None if config.eval_sources is not None else corpus_lib.TRAIN
  return build_corpus(
    config.sources,
    split,
    validation_fraction=config.validation_fraction,
    max_documents=config.max_documents,
    max_bytes=config.max_bytes,
    stdlib_include_tests=config.stdlib_include_tests,
    decode_errors=config.decode_errors,
  )


def eval_corpus(config: DataConfig) -> Corpus:
  """Validation documents: `eval_sources`, else the validation split of `sources`."""
  if config.eval_sources is not None:
    return build_corpus(
      config.eval_sources, None, stdlib_include_tests=config.stdlib_include_tests, decode_errors=config.decode_errors
    )
  if config.validation_fraction == 0.0:
    raise ValueError("DataConfig.validation_fraction=0 and no eval_sources: there is no validation data")
  return build_corpus(
    config.sources,
    corpus_lib.VALIDATION,
    validation_fraction=config.validation_fraction,
    stdlib_include_tests=config.stdlib_include_tests,
    decode_errors=config.decode_errors,
  )
