"""Generation: prefill + KV-cached decode with Engram rows hashed per new token (on device,
or gathered from host tables), and sampling."""

from engram_jax.inference.decode_state import DecodeState, EngramDecodeState
from engram_jax.inference.decoder import TABLE_PLACEMENTS, Decoder
from engram_jax.inference.generate import GenerationResult, Generator, generate
from engram_jax.inference.sampling import SamplingConfig, sample

__all__ = [
    "TABLE_PLACEMENTS",
    "DecodeState",
    "Decoder",
    "EngramDecodeState",
    "GenerationResult",
    "Generator",
    "SamplingConfig",
    "generate",
    "sample",
]
