"""Tokenizer compression: the reference algorithm on the golden tokenizer, errors, persistence."""

import numpy as np
import pytest
from tokenizers import Tokenizer

from engram_jax import EngramConfig, NgramHasher, TokenizerCompressor


@pytest.fixture(scope="module")
def compressor(testdata_dir):
  return TokenizerCompressor.from_file(testdata_dir / "compression_tokenizer.json")


def test_matches_reference_lookup_table(compressor, testdata_dir):
  expected = np.load(testdata_dir / "compression_expected.npz")
  assert compressor.num_compressed == int(expected["num_compressed"]) == 352
  np.testing.assert_array_equal(compressor.lookup_table, expected["lookup_table"])
  assert compressor.lookup_table.dtype == np.int64
  assert abs(compressor.reduction - (1 - 352 / 532)) < 1e-12


def test_from_tokenizer_equals_from_file(compressor, testdata_dir):
  tok = Tokenizer.from_file(str(testdata_dir / "compression_tokenizer.json"))
  again = TokenizerCompressor.from_tokenizer(tok)
  np.testing.assert_array_equal(again.lookup_table, compressor.lookup_table)
  assert again.fingerprint == compressor.fingerprint and len(compressor.fingerprint) == 64


def test_variants_share_an_id(testdata_dir, compressor):
  tok = Tokenizer.from_file(str(testdata_dir / "compression_tokenizer.json"))
  vocab = tok.get_vocab()
  # Every id whose decoded text differs only by case/whitespace maps to one compressed id.
  by_key = {}
  for tid in vocab.values():
    text = tok.decode([tid])
    if "\ufffd" in text:
      continue
    by_key.setdefault(text.strip().lower(), set()).add(int(compressor.lookup_table[tid]))
  plain_ascii = {k: v for k, v in by_key.items() if k.isascii() and k.isalpha()}
  assert plain_ascii and all(len(v) == 1 for v in plain_ascii.values())


def test_call_validates_ids(compressor):
  out = compressor(np.array([[0, 1, 531]]))
  assert out.dtype == np.int64 and out.shape == (1, 3)
  with pytest.raises(ValueError, match=r"token id 532 at position \(0, 1\)"):
    compressor(np.array([[3, 532]]))
  with pytest.raises(ValueError, match="pad_negative=True"):
    compressor(np.array([4, -1]))
  kept = compressor(np.array([4, -1]), pad_negative=True)
  assert kept[1] == -1 and kept[0] == compressor.lookup_table[4]
  with pytest.raises(ValueError, match="integers"):
    compressor(np.array([1.5]))


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_save_load_roundtrip_and_fingerprint_check(compressor, tmp_path, suffix):
  path = tmp_path / f"table{suffix}"
  compressor.save(path)
  loaded = TokenizerCompressor.load(path, expected_fingerprint=compressor.fingerprint)
  np.testing.assert_array_equal(loaded.lookup_table, compressor.lookup_table)
  assert loaded.num_compressed == compressor.num_compressed
  with pytest.raises(ValueError, match="built from tokenizer"):
    TokenizerCompressor.load(path, expected_fingerprint="0" * 64)


def test_hasher_from_compressor_compresses_the_pad_id(compressor):
  raw_pad = int(np.flatnonzero(compressor.lookup_table != np.arange(532))[0])
  cfg = EngramConfig(vocab_sizes=(1000, 1000), n_embed_per_ngram=8, n_head_per_ngram=2, pad_id=raw_pad)
  hasher = NgramHasher.from_compressor(cfg, compressor)
  assert hasher.pad_id == compressor.lookup_table[raw_pad] != raw_pad
  assert hasher.compressed_vocab_size == 352
