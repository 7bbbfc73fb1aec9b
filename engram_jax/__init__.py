"""engram-jax: Engram conditional memory and a DeepSeek-style MoE backbone in JAX/Flax NNX."""

from engram_jax.config import EngramConfig
from engram_jax.hashing import NgramHasher, TokenizerCompressor

__version__ = "0.1.0"


def __getattr__(name):
  # The NNX layers import JAX/Flax; keep `import engram_jax` light for host-only users
  # (data workers hash with NumPy alone).
  if name == "Engram":
    from engram_jax.layers.engram import Engram

    return Engram
  if name == "interop":
    import importlib

    return importlib.import_module("engram_jax.interop")
  raise AttributeError(f"module 'engram_jax' has no attribute {name!r}")


__all__ = ["Engram", "EngramConfig", "NgramHasher", "TokenizerCompressor", "__version__"]
