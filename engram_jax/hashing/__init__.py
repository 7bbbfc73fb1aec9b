"""Host-side hashing: tokenizer compression and n-gram hashing (NumPy; no JAX import)."""

from engram_jax.hashing.compression import TokenizerCompressor, tokenizer_fingerprint
from engram_jax.hashing.ngram import NgramHasher, layer_multipliers, layer_table_sizes
from engram_jax.hashing.primes import is_prime, next_prime

__all__ = [
  "NgramHasher",
  "TokenizerCompressor",
  "is_prime",
  "layer_multipliers",
  "layer_table_sizes",
  "next_prime",
  "tokenizer_fingerprint",
]
