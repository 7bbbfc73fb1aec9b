"""Hit rate of a frequency-ranked hot-row cache on a token stream (per n-gram order).

The cache of one order holds the top `fraction` of that order's rows (all its heads),
ranked by counts on `token_stream`; the hit rate is the share of the order's lookups on
`eval_stream` (default: the same stream, an in-sample upper bound) that find their row
in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from engram_jax.offload.hot_cache import top_rows


def analytic_zipf_hit_rate(num_items: int, capacity: int, exponent: float) -> float:
  """Share of draws from Zipf(exponent) over `num_items` that fall in the top `capacity`."""
  weights = np.arange(1, num_items + 1, dtype=np.float64) ** -exponent
  return float(weights[:capacity].sum() / weights.sum())


def hit_rate_from_counts(rank_counts: np.ndarray, eval_counts: np.ndarray, capacity: int) -> float:
  """Hit rate on `eval_counts` of the cache of the top `capacity` rows by `rank_counts`."""
  total = eval_counts.sum()
  if total == 0:
    raise ValueError("no lookups to measure a hit rate on")
  return float(eval_counts[top_rows(rank_counts, capacity)].sum() / total)


def _layer_counts(
  stream: Iterable, hasher, layer_id: int, compress: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
  num_rows = hasher.total_rows(layer_id)
  offsets = hasher.offsets[layer_id]
  counts = np.zeros(num_rows, np.int64)
  for tokens in stream:
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:  # one document: hash it alone so no n-gram crosses documents
      tokens = tokens[None]
    ids = compress(tokens) if compress is not None else tokens.astype(np.int64)
    flat = hasher.hash(ids)[layer_id] + offsets
    counts += np.bincount(flat.reshape(-1), minlength=num_rows)
  return counts


def measure_hit_rate(
  token_stream: Iterable,
  hasher,
  cache_fractions: Sequence[float] | float,
  *,
  layer_id: int | None = None,
  eval_stream: Iterable | None = None,
  compressor: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, dict[float, float]]:
  """Hit rates of per-order caches: {"order 2": {fraction: rate}, ..., "all": {...}}.

  Args:
    token_stream: documents (1-D int arrays) or batches [B, T] of token ids; compressed
      ids unless `compressor` is given (then raw ids, mapped by it).
    hasher: an `NgramHasher`.
    cache_fractions: fractions of each order's rows to cache.
    layer_id: the Engram layer to measure (default: the hasher's first).
    eval_stream: stream to measure on (None: token_stream itself, in-sample).
    compressor: raw -> compressed ids (e.g. a `TokenizerCompressor`).
  "all" is one cache of `fraction` of the whole layer table over all orders' lookups.
  """
  fractions = [cache_fractions] if np.isscalar(cache_fractions) else list(cache_fractions)
  for f in fractions:
    if not 0 < f <= 1:
      raise ValueError(f"cache fraction must be in (0, 1], got {f}")
  layer_id = hasher.layer_ids[0] if layer_id is None else layer_id
  rank = _layer_counts(token_stream, hasher, layer_id, compressor)
  evals = rank if eval_stream is None else _layer_counts(eval_stream, hasher, layer_id, compressor)
  sizes, offsets = hasher.table_sizes[layer_id], hasher.offsets[layer_id]
  k = hasher.config.n_head_per_ngram
  out = {}
  for order in range(2, hasher.config.max_ngram_size + 1):
    first, last = (order - 2) * k, (order - 1) * k - 1
    lo, hi = int(offsets[first]), int(offsets[last] + sizes[last])
    out[f"order {order}"] = {
      f: hit_rate_from_counts(rank[lo:hi], evals[lo:hi], max(1, round(f * (hi - lo)))) for f in fractions
    }
  out["all"] = {f: hit_rate_from_counts(rank, evals, max(1, round(f * rank.size))) for f in fractions}
  return out
