"""Tokenizers: load a `tokenizer.json`, or train (and cache) a byte-level BPE on the corpus.

A trained tokenizer has the special tokens <pad>=0, <bos>=1, <eos>=2 followed by the 256
byte tokens and the learned merges. Its ByteLevel pre-tokenizer adds no prefix space, so
decoding the ids of a text gives the text back byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from engram_jax.data.splits import train_corpus
from engram_jax.hashing.compression import load_tokenizer_file

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"

# Spellings of special tokens in common tokenizer.json files, most specific first.
_PAD_NAMES = (PAD, "[PAD]", "<|pad|>", "<|padding|>")
_EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Raw ids of the special tokens the pipeline uses (bos may be absent)."""

  pad: int
  eos: int
  bos: int | None


def _find(tokenizer: Any, names: tuple[str, ...]) -> int | None:
  for name in names:
    tid = tokenizer.token_to_id(name)
    if tid is not None:
      return int(tid)
  return None


def special_ids(tokenizer: Any) -> SpecialIds:
  """Finds pad / eos / bos; a tokenizer without a pad token pads with its eos (GPT-2 style).

  Raises:
    ValueError if the tokenizer has no end-of-document token.
  """
  eos = _find(tokenizer, _EOS_NAMES)
  if eos is None:
    raise ValueError(
      f"tokenizer has no end-of-document token (looked for {_EOS_NAMES}); documents are packed with one at their end"
    )
  pad = _find(tokenizer, _PAD_NAMES)
  if pad is None:
    padding = getattr(tokenizer, "padding", None)
    pad = int(padding["pad_id"]) if padding else eos
  return SpecialIds(pad=pad, eos=eos, bos=_find(tokenizer, _BOS_NAMES))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, length: int | None = None):
  """Trains a byte-level BPE with <pad>=0, <bos>=1, <eos>=2 (seconds for a few MB).

  Args:
    texts: training documents.
    vocab_size: final vocabulary size, special and byte tokens included (>= 259).
    length: number of texts, for the trainer's bookkeeping only.
  Returns:
    a `tokenizers.Tokenizer`.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"a byte-level BPE needs vocab_size >= 259, got {vocab_size}")
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer, length=length)
  return tokenizer


def _capped_texts(corpus, max_bytes: int) -> list[str]:
  texts, total = [], 0
  for i in range(len(corpus)):
    text = corpus[i]
    texts.append(text)
    total += len(text.encode("utf-8"))
    if total >= max_bytes:
      break
  return texts


def load_or_train_tokenizer(config, cache_dir: str | os.PathLike | None = None):
  """The tokenizer of a `DataConfig`.

  `config.tokenizer_path` set: loads that `tokenizer.json`. Otherwise trains a byte-level
  BPE of `config.bpe_vocab_size` on the first `config.tokenizer_train_bytes` of the training
  split, caching it as `<cache_dir>/tokenizer.json` (cache_dir defaults to
  `config.tokenizer_dir`; None = no cache) and reusing a cached one.

  Raises:
    FileNotFoundError for a missing `tokenizer_path`; ValueError naming the file for one that
    is not a tokenizer.json (truncated, not JSON, JSON of something else), and when a cached
    tokenizer was trained for a different vocabulary size.
  """
  if config.tokenizer_path is not None:
    return load_tokenizer_file(config.tokenizer_path, "DataConfig.tokenizer_path")

  cache_dir = cache_dir if cache_dir is not None else config.tokenizer_dir
  meta = {
    "vocab_size": config.bpe_vocab_size,
    "sources": list(config.sources),
    "train_bytes": config.tokenizer_train_bytes,
  }
  if cache_dir is not None:
    cached = Path(cache_dir) / TOKENIZER_FILE
    if cached.is_file():
      meta_path = Path(cache_dir) / META_FILE
      stored = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
      if stored.get("vocab_size", config.bpe_vocab_size) != config.bpe_vocab_size:
        raise ValueError(
          f"cached tokenizer {cached} was trained with vocab_size={stored['vocab_size']}, "
          f"but DataConfig.bpe_vocab_size={config.bpe_vocab_size}; use another tokenizer_dir "
          "or delete the cached file"
        )
      return load_tokenizer_file(cached, "cached tokenizer (delete it to retrain)")

  texts = _capped_texts(train_corpus(config), config.tokenizer_train_bytes)
  log.info("training a %d-token byte-level BPE on %d documents", config.bpe_vocab_size, len(texts))
  tokenizer = train_bpe_tokenizer(texts, config.bpe_vocab_size, length=len(texts))
  if cache_dir is not None:
    _atomic_write(Path(cache_dir) / TOKENIZER_FILE, tokenizer.to_str())
    _atomic_write(Path(cache_dir) / META_FILE, json.dumps(meta, indent=1))
  return tokenizer


def _atomic_write(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def _is_byte_level(tokenizer: Any) -> bool:
  decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
  stack = [decoder]
  while stack:
    d = stack.pop()
    if d.get("type") == "ByteLevel":
      return True
    stack.extend(d.get("decoders", []))
  return False


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
  """UTF-8 bytes each token stands for: np.int32 [V]; special tokens count 0.

  Exact for byte-level BPEs (one byte per symbol of the token string). For other
  tokenizers an approximation: byte-fallback tokens <0xHH> are 1 byte, '▁' is a space,
  a WordPiece '##' prefix is dropped.
  """
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  out = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), np.int32)
  byte_level = _is_byte_level(tokenizer)
  added = tokenizer.get_added_tokens_decoder()
  for token, tid in vocab.items():
    if tid in added:  # added tokens hold raw text, not byte-level symbols
      out[tid] = 0 if added[tid].special else len(added[tid].content.encode("utf-8"))
    elif byte_level:
      out[tid] = len(token)
    elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
      out[tid] = 1
    else:
      out[tid] = len(token.removeprefix("##").replace("\u2581", " ").encode("utf-8"))
  return out
