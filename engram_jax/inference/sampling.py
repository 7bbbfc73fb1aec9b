"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), as one pure function.

Shapes: logits [B, V] (any float dtype; computed in float32) -> token ids [B] int32.

Order (as in Hugging Face's warpers): divide by the temperature, keep the top_k largest
logits, then keep the smallest prefix of those (sorted by probability, renormalized
over the kept top-k) whose mass reaches top_p, and draw from what is left.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen.

  Attributes:
    temperature: logits are divided by it; 0 means greedy (argmax).
    top_k: keep only the k most likely tokens; 0 = no limit.
    top_p: keep the smallest set of most likely tokens whose probability mass is
      >= top_p; 1.0 = no limit.
    greedy: argmax, whatever the other fields say.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    if not real(self.temperature) or not 0 <= self.temperature < float("inf"):
      raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
    if not real(self.top_p) or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must lie in (0, 1], got {self.top_p!r}")
    if not isinstance(self.greedy, bool):
      raise ValueError(f"SamplingConfig.greedy must be a bool, got {self.greedy!r}")

  @property
  def is_greedy(self) -> bool:
    """Whether sampling reduces to argmax (`greedy`, or temperature 0)."""
    return self.greedy or self.temperature == 0


def sample(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
  """Draws one token per row of logits [B, V]; returns int32 [B].

  Deterministic for a given key. Jit-able with `config` static (it is hashable).
  """
  if logits.ndim != 2:
    raise ValueError(f"sample expects logits [B, V], got shape {logits.shape}")
  logits = logits.astype(jnp.float32)
  if config.is_greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / config.temperature
  vocab = logits.shape[-1]
  k = config.top_k if 0 < config.top_k < vocab else vocab
  if k == vocab and config.top_p >= 1.0:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

  # Candidates sorted by logit, descending: [B, k]. Index-based, so ties at the k-th
  # value never let more than k tokens through.
  values, indices = jax.lax.top_k(logits, k)
  if config.top_p < 1.0:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive prefix sum
    # Keep i while the tokens before it have not reached top_p: the smallest prefix with
    # mass >= top_p (the first token always stays).
    values = jnp.where(mass_before < config.top_p, values, -jnp.inf)
  choice = jax.random.categorical(key, values, axis=-1)  # [B] in [0, k)
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


__all__ = ["SamplingConfig", "sample"]
