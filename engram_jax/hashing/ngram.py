"""`NgramHasher`: bit-exact host-side n-gram hashing (ENGRAM_SPEC.md §3). NumPy only.

For Engram layer L, order n and head k, the row of position t is

    mix(t, n) = XOR_{j<n} ( x'[t-j] * m_L[j] )   (64-bit two's complement)
    row       = mix(t, n) mod p_{n,k}

where x' are compressed ids (positions before the sequence or document start read the pad
id), m_L are odd per-layer multipliers and p_{n,k} distinct primes. Hash ids depend only
on token ids, so they are computed in the data pipeline and rows can be prefetched.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from engram_jax.config import EngramConfig
from engram_jax.hashing.primes import next_prime

_INT64_MAX = np.iinfo(np.int64).max
_LAYER_SEED_STRIDE = 10007  # the reference's PRIME_1


def layer_multipliers(seed: int, layer_id: int, max_ngram_size: int, compressed_vocab_size: int) -> np.ndarray:
  """Odd multipliers m_0..m_{N-1} of one layer, np.int64 [N] (reference: default_rng per layer)."""
  half = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
  rng = np.random.default_rng(int(seed + _LAYER_SEED_STRIDE * int(layer_id)))
  r = rng.integers(low=0, high=half, size=(max_ngram_size,), dtype=np.int64)
  return r * 2 + 1


def layer_table_sizes(config: EngramConfig) -> dict[int, np.ndarray]:
  """Distinct primes per head, {layer_id: np.int64 [(N-1)*K]}: layers in order, then orders 2..N, then heads."""
  taken: set[int] = set()
  sizes: dict[int, np.ndarray] = {}
  for layer_id in config.layer_ids:
    layer_sizes = []
    for nominal in config.vocab_sizes:
      start = nominal - 1
      for _ in range(config.n_head_per_ngram):
        p = next_prime(start, taken)
        taken.add(p)
        layer_sizes.append(p)
        start = p
    sizes[layer_id] = np.asarray(layer_sizes, dtype=np.int64)
  return sizes


def shifted_ids(ids: np.ndarray, shift: int, pad_id: int, segment_ids: np.ndarray | None = None) -> np.ndarray:
  """x[t - shift], reading `pad_id` before the start of the row or of the token's document."""
  if shift == 0:
    return ids
  _, t = ids.shape
  out = np.full_like(ids, pad_id)
  if shift < t:
    out[:, shift:] = ids[:, :-shift]
    if segment_ids is not None:
      crossed = segment_ids[:, shift:] != segment_ids[:, :-shift]
      out[:, shift:][crossed] = pad_id
  return out


class NgramHasher:
  """Host-side multi-layer, multi-head n-gram hasher, bit-exact with the reference.

  Args:
    config: the Engram configuration.
    compressed_vocab_size: V', the number of compressed ids (bounds the multipliers).
    pad_id: COMPRESSED pad id; defaults to `config.pad_id` (already compressed). Use
      `from_compressor` to map a raw pad id through a `TokenizerCompressor`.

  Attributes (per Engram layer id):
    multipliers[layer]: np.int64 [N], odd.
    table_sizes[layer]: np.int64 [(N-1)*K], the prime size of every head.
    offsets[layer]: np.int64 [(N-1)*K], first row of every head in the layer's flat table.
  """

  def __init__(self, config: EngramConfig, compressed_vocab_size: int, *, pad_id: int | None = None):
    if compressed_vocab_size < 1:
      raise ValueError(f"compressed_vocab_size must be >= 1, got {compressed_vocab_size}")
    self.config = config
    self.compressed_vocab_size = int(compressed_vocab_size)
    self.pad_id = int(config.pad_id if pad_id is None else pad_id)
    if not 0 <= self.pad_id < self.compressed_vocab_size:
      raise ValueError(f"pad id {self.pad_id} is outside the compressed vocabulary [0, {compressed_vocab_size})")
    self.multipliers = {
      lid: layer_multipliers(config.seed, lid, config.max_ngram_size, compressed_vocab_size) for lid in config.layer_ids
    }
    self.table_sizes = layer_table_sizes(config)
    self.offsets = {
      lid: np.concatenate([[0], np.cumsum(s)[:-1]]).astype(np.int64) for lid, s in self.table_sizes.items()
    }

  @classmethod
  def from_compressor(cls, config: EngramConfig, compressor: Any) -> "NgramHasher":
    """Uses the compressor's V' and maps `config.pad_id` (a RAW id) through it."""
    pad = int(compressor(np.asarray([config.pad_id]))[0])
    return cls(config, compressor.num_compressed, pad_id=pad)

  # -- shapes -----------------------------------------------------------------------------
  @property
  def layer_ids(self) -> tuple[int, ...]:
    """The Engram layers (block indices) this hasher serves, ascending: `config.layer_ids`."""
    return self.config.layer_ids

  @property
  def num_heads(self) -> int:
    """H = (N-1)*K hash heads per layer: the last axis of `hash` output."""
    return self.config.num_heads

  def total_rows(self, layer_id: int) -> int:
    """Rows of the layer's flat table: the sum of its heads' primes."""
    return int(self._check_layer(layer_id).sum())

  def _check_layer(self, layer_id: int) -> np.ndarray:
    if layer_id not in self.table_sizes:
      raise KeyError(f"layer {layer_id} is not an Engram layer; Engram layers are {self.layer_ids}")
    return self.table_sizes[layer_id]

  # -- hashing --------------------------------------------------------------------------------
  def check_ids(self, compressed_ids: Any) -> np.ndarray:
    """Validates a [B, T] batch of compressed ids and returns it as int64."""
    ids = np.asarray(compressed_ids)
    if ids.ndim != 2:
      raise ValueError(f"compressed ids must have shape [batch, seq], got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"compressed ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    bad = (ids < 0) | (ids >= self.compressed_vocab_size)
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
        f"compressed id {int(ids[pos])} at position {pos} is outside [0, "
        f"{self.compressed_vocab_size}); compress raw ids first and do not pass negative padding"
      )
    return ids

  def hash_layer(
    self, ids: np.ndarray, layer_id: int, segment_ids: np.ndarray | None = None, *, checked: bool = False
  ) -> np.ndarray:
    """Per-head rows (offsets NOT added) of one layer: np.int64 [B, T, (N-1)*K]."""
    sizes = self._check_layer(layer_id)
    if not checked:
      ids = self.check_ids(ids)
    if segment_ids is not None:
      segment_ids = np.asarray(segment_ids)
      if segment_ids.shape != ids.shape:
        raise ValueError(f"segment_ids shape {segment_ids.shape} != ids shape {ids.shape}")
    mult = self.multipliers[layer_id]
    n_max, k = self.config.max_ngram_size, self.config.n_head_per_ngram
    # Valid ids are < V' and multipliers < int64_max / V', so products never overflow.
    terms = [shifted_ids(ids, j, self.pad_id, segment_ids) * mult[j] for j in range(n_max)]
    out = np.empty(ids.shape + (len(sizes),), dtype=np.int64)
    mix = terms[0]
    for n in range(2, n_max + 1):
      mix = np.bitwise_xor(mix, terms[n - 1])
      for h in range(k):
        col = (n - 2) * k + h
        out[..., col] = mix % sizes[col]
    return out

  def hash(self, compressed_ids: Any, segment_ids: Any = None) -> dict[int, np.ndarray]:
    """Hashes a [B, T] batch of COMPRESSED ids for every Engram layer.

    Args:
      compressed_ids: int [B, T], values in [0, V').
      segment_ids: optional int [B, T] document ids of packed rows; a token never sees
        tokens of another document (they read as the pad id).
    Returns:
      {layer_id: np.int64 [B, T, (N-1)*K]} per-head rows, orders ascending, heads within.
    """
    ids = self.check_ids(compressed_ids)
    return {lid: self.hash_layer(ids, lid, segment_ids, checked=True) for lid in self.layer_ids}

  def hash_jax(self, compressed_ids: Any, segment_ids: Any = None) -> dict[int, Any]:
    """Same as `hash`, on device and jit-able, exact without 64-bit mode: int32 rows.

    Returns {layer_id: int32 jax.Array [B, T, (N-1)*K]}, equal to `hash`'s rows. See
    `engram_jax.hashing.device_hash` for the 32-bit limb method.
    """
    from engram_jax.hashing import device_hash  # JAX only where the device path is used

    return device_hash.hash_all_layers(self, compressed_ids, segment_ids)

  # -- constants ---------------------------------------------------------------------------------
  def constants(self) -> dict[str, Any]:
    """Every constant that gives trained rows their meaning, as JSON-able data."""
    return {
      "config": self.config.to_dict(),
      "compressed_vocab_size": self.compressed_vocab_size,
      "pad_id": self.pad_id,
      "seed": self.config.seed,
      "multipliers": {str(l): [int(v) for v in m] for l, m in self.multipliers.items()},
      "table_sizes": {str(l): [int(v) for v in s] for l, s in self.table_sizes.items()},
      "offsets": {str(l): [int(v) for v in o] for l, o in self.offsets.items()},
    }

  @classmethod
  def from_constants(cls, constants: Mapping[str, Any]) -> "NgramHasher":
    """Rebuilds a hasher and checks that the stored constants are the ones it derives."""
    config = EngramConfig.from_dict(dict(constants["config"]))
    hasher = cls(config, int(constants["compressed_vocab_size"]), pad_id=int(constants["pad_id"]))
    diff = hasher.diff_constants(constants)
    if diff:
      raise ValueError("stored hash constants disagree with the ones derived from the config: " + "; ".join(diff))
    return hasher

  def diff_constants(self, other: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between these constants and `other` (empty if equal)."""
    mine = self.constants()
    out = []
    for key in ("compressed_vocab_size", "pad_id", "seed"):
      if mine[key] != other.get(key):
        out.append(f"{key}: {other.get(key)!r} != {mine[key]!r}")
    for key in ("multipliers", "table_sizes", "offsets"):
      theirs = {str(k): [int(v) for v in vs] for k, vs in dict(other.get(key, {})).items()}
      if theirs != mine[key]:
        layers = sorted(set(theirs) | set(mine[key]), key=int)
        bad = [l for l in layers if theirs.get(l) != mine[key].get(l)]
        out.append(f"{key} differ for layers {bad}")
    other_cfg = dict(other.get("config", {}))
    for k, v in mine["config"].items():
      if other_cfg.get(k) != v:
        out.append(f"config.{k}: {other_cfg.get(k)!r} != {v!r}")
    return out
