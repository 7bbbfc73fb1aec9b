"""Generation state: the model's caches plus the n-gram window Engram hashes from.

Shapes (B sequences, N = max n-gram order, P padded prompt length):
  EngramDecodeState.window  int32 [B, N-1]  compressed ids of each sequence's last N-1
                                            tokens, oldest first (the pad id before the
                                            sequence start)
  DecodeState.cache         `DecodeCache`: KV cache per block, Engram conv state per
                                            Engram layer [B, (kernel-1)*N, G, D]

Row ids of the next position t need x'[t-N+1 .. t]: the window plus the new token's
compressed id, i.e. a [B, N] row whose last position `NgramHasher` hashes exactly as it
would inside the full sequence (every shift it reads lies in the window).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.models.transformer import DecodeCache


@flax.struct.dataclass
class EngramDecodeState:
  """The last N-1 compressed ids per sequence: window int32 [B, N-1] (jax or NumPy)."""

  window: jax.Array

  @classmethod
  def after_prompt(cls, compressed: jax.Array, lengths: jax.Array, order: int, pad_id: int) -> EngramDecodeState:
    """The window after each sequence's own prompt.

    Args:
      compressed: int [B, P] right-padded compressed prompts.
      lengths: int [B] prompt lengths (>= 1).
      order: N, the largest n-gram order.
      pad_id: the compressed pad id (read before the sequence start).
    """
    xp = np if isinstance(compressed, np.ndarray) and isinstance(lengths, np.ndarray) else jnp
    p = compressed.shape[1]
    idx = lengths[:, None] - (order - 1) + xp.arange(order - 1)[None, :]  # [B, N-1]
    vals = xp.take_along_axis(compressed, xp.clip(idx, 0, p - 1), axis=1)
    window = xp.where(idx >= 0, vals, pad_id).astype(xp.int32)
    return cls(window=window)

  def push(self, compressed_token: jax.Array) -> tuple[jax.Array, EngramDecodeState]:
    """Appends one compressed id per sequence [B].

    Returns (the [B, N] n-gram row to hash, whose last position is the new token; the
    state holding its last N-1 ids).
    """
    xp = np if isinstance(self.window, np.ndarray) else jnp
    full = xp.concatenate([self.window, compressed_token[:, None].astype(xp.int32)], axis=1)
    return full, EngramDecodeState(window=full[:, 1:])


@flax.struct.dataclass
class DecodeState:
  """Everything a decode step carries: the model's `DecodeCache` and the Engram window
  (None for models without Engram; a NumPy window on the host in the per-token NumPy
  fallback, `decode_path == "host_python_loop"`)."""

  cache: DecodeCache
  engram: EngramDecodeState | None

  @property
  def lengths(self) -> jax.Array:
    """[B] int32: tokens each sequence has in the cache."""
    return self.cache.lengths


__all__ = ["DecodeState", "EngramDecodeState"]
