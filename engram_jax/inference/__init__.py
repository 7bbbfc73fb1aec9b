"""Generation: prefill + KV-cached decode with Engram rows hashed per new token on device
and read from device tables, tables in host memory or a hot-row cache (inside the compiled
decode loop), and sampling."""

from engram_jax.inference.decode_state import DecodeState, EngramDecodeState
from engram_jax.inference.decoder import DECODE_PATHS, HOST_DECODES, Decoder
from engram_jax.inference.generate import GenerationResult, Generator, generate
from engram_jax.inference.sampling import SamplingConfig, sample

__all__ = [
  "DECODE_PATHS",
  "HOST_DECODES",
  "DecodeState",
  "Decoder",
  "EngramDecodeState",
  "GenerationResult",
  "Generator",
  "SamplingConfig",
  "generate",
  "sample",
]
