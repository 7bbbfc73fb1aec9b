"""`DataConfig`: what the input pipeline reads, how it tokenizes, packs and batches."""

from __future__ import annotations

import dataclasses
from typing import Any

from engram_jax.config import check_int, check_known_fields

DEFAULT_SOURCES = ("stdlib",)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Configuration of the grain input pipeline (`engram_jax.data.pipeline`).

  Attributes:
    sources: training corpus as source specs (see `engram_jax.data.sources.parse_source`):
      "stdlib", "text:GLOB", "jsonl:GLOB:FIELD", "arrayrecord:GLOB[:FIELD]".
    eval_sources: validation corpus specs. None: split every training source by a stable
      hash of each document's key, `validation_fraction` of the documents to validation.
    seq_len: T, tokens per row (rows are packed with T + 1 tokens: inputs and targets).
    batch_size: B, rows per batch (per host).
    seed: shuffles documents (differently every epoch).
    num_workers: grain worker processes (`mp_prefetch`); 0 = everything in-process.
    prefetch_buffer_size: batches buffered ahead, per worker (or by a background thread
      when num_workers=0; 0 disables it).
    read_threads: grain threads reading + tokenizing documents per process (0: inline;
      extra threads contend for the GIL and measured slower; scale with num_workers).
    tokenizer_path: a `tokenizer.json` to load; None = train a byte-level BPE.
    bpe_vocab_size: vocabulary size of the trained BPE (special tokens included).
    tokenizer_dir: where a trained tokenizer is cached (`tokenizer.json`) and reused.
      None = train in memory every time.
    tokenizer_train_bytes: cap on the text (UTF-8 bytes) the BPE is trained on.
    max_documents / max_bytes: cap the training split (a stable pseudo-random subset),
      for tiny runs. None = no cap.
    validation_fraction: share of documents held out when `eval_sources` is None.
    stdlib_include_tests: the "stdlib" source includes the test packages (~20 of ~32 MB).
    num_eval_batches: a cap on the validation batches (the first ones of the fixed
      validation order); None = no cap (tests use 1-3 to stay fast).
    eval_batch_size: rows per validation batch; None = batch_size.
    decode_errors: a text / jsonl / arrayrecord file that is not valid UTF-8: "error"
      (default: ValueError naming the file and byte offset), "skip" (left out, counted in the
      log) or "replace" (undecodable bytes become U+FFFD). Binary files are always left out.
    rows_per_stream: training batches interleave batch_size / rows_per_stream independent
      document streams (disjoint shards of the documents, each shuffled and packed on its
      own), each giving this many consecutive rows of every batch; 1 = every row its own
      stream, so a batch draws from >= batch_size documents. batch_size = one stream (the
      old single-stream packing: a batch is ~1 document).
    eval_set: "chunks" (default): line-aligned chunks of seq_len + 1 tokens from every
      validation document, taken round-robin over the documents (a fixed shuffled order:
      every document contributes before any contributes twice), `eval_tokens` scored
      tokens; "packed": the validation documents packed like training rows, in their
      fixed order (the first batches cover only the first few documents).
    eval_tokens: scored tokens of the "chunks" validation set (at least; whole rows).
      None = every chunk of every validation document.
    eval_seed: order of the "chunks" validation set; independent of `seed`, so every
      model (whatever its data seed) is scored on the same tokens.
    num_facts: planted key -> value facts mixed into the training documents, each its own
      document (`engram_jax.data.facts`); 0 = none.
    held_out_facts: facts generated alongside but never trained on (the probe's control);
      None = as many as num_facts.
    fact_repeats: copies of each planted fact per epoch of the training documents.
    fact_seed: seed of the fact generator.
  """

  sources: tuple[str, ...] = DEFAULT_SOURCES
  eval_sources: tuple[str, ...] | None = None
  seq_len: int = 128
  batch_size: int = 16
  seed: int = 0
  num_workers: int = 0
  prefetch_buffer_size: int = 2
  read_threads: int = 0
  tokenizer_path: str | None = None
  bpe_vocab_size: int = 4096
  tokenizer_dir: str | None = None
  tokenizer_train_bytes: int = 8_000_000
  max_documents: int | None = None
  max_bytes: int | None = None
  validation_fraction: float = 0.05
  stdlib_include_tests: bool = True
  num_eval_batches: int | None = None
  eval_batch_size: int | None = None
  decode_errors: str = "error"
  rows_per_stream: int = 1
  eval_set: str = "chunks"
  eval_tokens: int | None = 131_072
  eval_seed: int = 0
  num_facts: int = 0
  held_out_facts: int | None = None
  fact_repeats: int = 1
  fact_seed: int = 0

  def __post_init__(self):
    # Accept lists / a single string from flags, JSON or ml_collections.
    for name in ("sources", "eval_sources"):
      value = getattr(self, name)
      if isinstance(value, str):
        value = (value,)
      if value is not None:
        object.__setattr__(self, name, tuple(str(v) for v in value))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first bad field (files are checked when read)."""
    if not self.sources:
      raise ValueError("DataConfig.sources is empty: name at least one source, e.g. ('stdlib',)")
    if self.eval_sources is not None and not self.eval_sources:
      raise ValueError("DataConfig.eval_sources is empty: use None to split the training sources")
    for name in ("seq_len", "batch_size", "bpe_vocab_size", "tokenizer_train_bytes", "rows_per_stream", "fact_repeats"):
      check_int("DataConfig", name, getattr(self, name), low=1)
    for name in ("num_workers", "prefetch_buffer_size", "read_threads", "num_facts", "eval_seed", "fact_seed"):
      check_int("DataConfig", name, getattr(self, name), low=0)
    for name in ("max_documents", "max_bytes", "num_eval_batches", "eval_batch_size", "eval_tokens"):
      check_int("DataConfig", name, getattr(self, name), low=1, optional=True)
    check_int("DataConfig", "held_out_facts", self.held_out_facts, low=0, optional=True)
    check_int("DataConfig", "seed", self.seed, low=0, high=2**32 - 1)
    for name in ("tokenizer_path", "tokenizer_dir"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"DataConfig.{name} must be None or a non-empty path string, got {value!r}")
    if not isinstance(self.stdlib_include_tests, bool):
      raise ValueError(f"DataConfig.stdlib_include_tests must be True or False, got {self.stdlib_include_tests!r}")
    from engram_jax.data.sources import DECODE_ERRORS

    if self.decode_errors not in DECODE_ERRORS:
      raise ValueError(f"DataConfig.decode_errors must be one of {DECODE_ERRORS}, got {self.decode_errors!r}")
    if self.bpe_vocab_size < 259 and self.tokenizer_path is None:
      raise ValueError(
        f"DataConfig.bpe_vocab_size={self.bpe_vocab_size} is too small for a byte-level BPE: "
        "it needs 256 byte tokens + 3 special tokens, i.e. >= 259"
      )
    if (
      isinstance(self.validation_fraction, bool)
      or not isinstance(self.validation_fraction, (int, float))
      or not 0.0 <= self.validation_fraction < 1.0
    ):
      raise ValueError(f"DataConfig.validation_fraction must be a number in [0, 1), got {self.validation_fraction!r}")
    from engram_jax.data.sources import (
      parse_source,  # late: sources imports nothing heavy
    )

    for spec in self.sources + (self.eval_sources or ()):
      parse_source(spec)
    if self.batch_size % self.rows_per_stream:
      raise ValueError(
        f"DataConfig.batch_size={self.batch_size} is not a multiple of rows_per_stream={self.rows_per_stream}"
      )
    if self.eval_set not in ("chunks", "packed"):
      raise ValueError(f"DataConfig.eval_set must be 'chunks' or 'packed', got {self.eval_set!r}")

  @property
  def num_held_out_facts(self) -> int:
    """Facts generated but never trained on: `held_out_facts`, or `num_facts` when None."""
    return self.num_facts if self.held_out_facts is None else self.held_out_facts

  @property
  def eval_rows(self) -> int:
    """Rows per validation batch: `eval_batch_size`, or `batch_size` when None."""
    return self.eval_batch_size or self.batch_size

  def replace(self, **changes: Any) -> DataConfig:
    """A copy with `changes` applied, checked like a new config."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """The fields as JSON-able data (tuples as lists); `from_dict` inverts it."""
    d = dataclasses.asdict(self)
    d["sources"] = list(self.sources)
    d["eval_sources"] = None if self.eval_sources is None else list(self.eval_sources)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DataConfig:
    """A config from `to_dict` output; ValueError naming any unknown field."""
    check_known_fields(cls, d)
    return cls(**d)
