"""Tokenizer: byte-level BPE training, caching, loading, special ids and token byte lengths."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from engram_jax.data import (
  DataConfig,
  load_or_train_tokenizer,
  special_ids,
  token_byte_lengths,
  train_bpe_tokenizer,
)
from engram_jax.data import tokenizer as tokenizer_lib

TINY = DataConfig(max_bytes=300_000, bpe_vocab_size=512, tokenizer_train_bytes=300_000)
TEXT = "def fünf(x):\n    return x  # ✓ naïve — 漢字 tab\there\r\n"


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  cache = tmp_path_factory.mktemp("tok")
  return cache, load_or_train_tokenizer(TINY, cache)


def test_trained_bpe_has_special_ids_and_round_trips(cached):
  _, tok = cached
  assert tok.get_vocab_size() == 512
  assert special_ids(tok) == tokenizer_lib.SpecialIds(pad=0, eos=2, bos=1)
  ids = tok.encode(TEXT, add_special_tokens=False).ids
  assert tok.decode(ids) == TEXT
  assert len(ids) < len(TEXT.encode())  # merges were learned
  assert 0 not in ids and 2 not in ids  # specials never come from text


def test_cache_is_written_reused_and_checked(cached, monkeypatch):
  cache, tok = cached
  assert (cache / "tokenizer.json").is_file()
  assert json.loads((cache / "tokenizer_meta.json").read_text())["vocab_size"] == 512

  def no_training(*args, **kwargs):
    raise AssertionError("a cached tokenizer must not be retrained")

  monkeypatch.setattr(tokenizer_lib, "train_bpe_tokenizer", no_training)
  again = load_or_train_tokenizer(TINY, cache)
  assert again.to_str() == tok.to_str()
  with pytest.raises(ValueError, match="trained with vocab_size=512.*bpe_vocab_size=600"):
    load_or_train_tokenizer(TINY.replace(bpe_vocab_size=600), cache)


def test_training_is_deterministic(cached):
  _, tok = cached
  assert load_or_train_tokenizer(TINY).to_str() == tok.to_str()  # no cache dir: retrains


def test_tokenizer_path_loads_and_missing_path_raises(cached, tmp_path):
  cache, tok = cached
  loaded = load_or_train_tokenizer(TINY.replace(tokenizer_path=str(cache / "tokenizer.json")))
  assert loaded.encode(TEXT).ids == tok.encode(TEXT).ids
  with pytest.raises(FileNotFoundError, match="no_such.json"):
    load_or_train_tokenizer(TINY.replace(tokenizer_path=str(tmp_path / "no_such.json")))


def test_token_byte_lengths_sum_to_the_text_bytes(cached):
  _, tok = cached
  lengths = token_byte_lengths(tok)
  assert lengths.shape == (512,) and lengths.dtype == np.int32
  assert list(lengths[:3]) == [0, 0, 0]  # <pad> <bos> <eos>
  assert (lengths[3:] >= 1).all()
  ids = tok.encode(TEXT, add_special_tokens=False).ids
  assert lengths[ids].sum() == len(TEXT.encode("utf-8"))


def test_special_ids_of_other_tokenizers():
  gpt2_like = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}, unk_token="a"))
  assert special_ids(gpt2_like) == tokenizer_lib.SpecialIds(pad=0, eos=0, bos=None)
  no_eos = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
  with pytest.raises(ValueError, match="no end-of-document token"):
    special_ids(no_eos)


def test_train_rejects_a_vocab_below_the_byte_alphabet():
  with pytest.raises(ValueError, match="vocab_size >= 259"):
    train_bpe_tokenizer(["abc"], 100)
