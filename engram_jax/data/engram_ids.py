"""Host-side Engram hashing of packed batches: tokens -> per-layer per-head row ids
(`engram_ids`).

Hashing runs in the input pipeline (a grain map after batching: one vectorized NumPy call
per batch is ~4x cheaper than one per row, experiments/bench/pipeline.py), so the device receives ready row ids and the
rows can be prefetched before the Engram layer runs.
"""

from __future__ import annotations

import grain
import numpy as np

from engram_jax.config import EngramConfig
from engram_jax.hashing import NgramHasher, TokenizerCompressor

_INT32_MAX = np.iinfo(np.int32).max


class EngramRowHasher(grain.transforms.Map):
  """Adds "engram_ids": {layer_id: int32 [B, T, H]} to a batch (hashed per-head row ids,
  offsets NOT added), exactly `NgramHasher.hash(compressor(tokens), segment_ids)`.

  n-grams never cross a document boundary: positions before a document's start read the
  compressed pad id. Without a hasher (dense / MoE models) "engram_ids" is {}.
  """

  def __init__(self, hasher: NgramHasher | None, compressor: TokenizerCompressor | None):
    if hasher is not None:
      if compressor is None:
        raise ValueError("EngramRowHasher needs the TokenizerCompressor the hasher was built for")
      if compressor.num_compressed != hasher.compressed_vocab_size:
        raise ValueError(
          f"compressor has {compressor.num_compressed} compressed ids but the hasher was "
          f"built for {hasher.compressed_vocab_size}"
        )
      # Rows are < their head's prime, so the int32 cast below is exact iff every prime is.
      for layer, sizes in hasher.table_sizes.items():
        if int(sizes.max()) - 1 > _INT32_MAX:
          raise ValueError(f"Engram layer {layer} has a head of {int(sizes.max())} rows: row ids do not fit int32")
    self.hasher = hasher
    self.compressor = compressor

  @classmethod
  def build(
    cls, engram_config: EngramConfig | None, tokenizer, pad_id: int, compressor: TokenizerCompressor | None = None
  ) -> EngramRowHasher:
    """From an Engram config and the tokenizer (None config: no Engram layers).

    Raises:
      ValueError if `engram_config.pad_id` is not the tokenizer's pad id (the pad used for
      hashing is the compressed image of the tokenizer's pad token).
    """
    if engram_config is None:
      return cls(None, None)
    if engram_config.pad_id != pad_id:
      raise ValueError(
        f"EngramConfig.pad_id={engram_config.pad_id} is not the tokenizer's pad token id "
        f"{pad_id}; set EngramConfig(pad_id={pad_id}) so hashing pads with the tokenizer's pad"
      )
    compressor = compressor or TokenizerCompressor.from_tokenizer(tokenizer)
    if compressor.vocab_size != tokenizer.get_vocab_size(with_added_tokens=True):
      raise ValueError(
        f"compressor covers {compressor.vocab_size} ids but the tokenizer has "
        f"{tokenizer.get_vocab_size(with_added_tokens=True)}"
      )
    return cls(NgramHasher.from_compressor(engram_config, compressor), compressor)

  def ids(self, tokens: np.ndarray, segment_ids: np.ndarray | None) -> dict[int, np.ndarray]:
    """tokens: raw ids int [B, T] -> engram_ids {layer_id: int32 [B, T, H]}."""
    if self.hasher is None:
      return {}
    hashed = self.hasher.hash(self.compressor(tokens), segment_ids)
    return {layer: ids.astype(np.int32) for layer, ids in hashed.items()}

  def map(self, batch: dict) -> dict:
    """Adds "engram_ids" to a batch with "tokens" and "segment_ids" int [B, T]."""
    return {**batch, "engram_ids": self.ids(batch["tokens"], batch["segment_ids"])}

  __call__ = map
