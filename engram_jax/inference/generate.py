"""Batched text generation: prefill, then sampled decode steps until eos or a token budget.

Prompts of different lengths are right-padded (segment id 0 marks padding) and prefilled
together, so each sequence's KV cache and Engram conv state end at its own prompt length;
every decode step then writes each sequence at its own next position. Finished sequences
stay in the batch (static shapes) until all are done or `max_new_tokens` is reached.

Device placement runs all decode steps in one jitted `lax.while_loop`; host placement
needs the host between steps (see `engram_jax.inference.decoder`) and runs a Python loop
over a jitted step. Both draw step i's token with `fold_in(key(seed), i)`, so they sample
the same tokens from the same logits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.hashing import NgramHasher, TokenizerCompressor
from engram_jax.inference.decode_state import DecodeState, EngramDecodeState
from engram_jax.inference.decoder import Decoder
from engram_jax.inference.sampling import SamplingConfig, sample
from engram_jax.models.transformer import Transformer
from engram_jax.offload import HostTable

PROMPT_BUCKET = 16  # padded prompt lengths are multiples of this: fewer compilations


@dataclasses.dataclass
class GenerationResult:
  """Continuations and timings of one `generate` call.

  Attributes:
    tokens: per prompt, the generated ids (ending with eos_id, included, if it was hit).
    prompt_tokens: prompt ids prefilled, summed over prompts.
    prefill_seconds: prefill wall time (first token sampled; host hashing and gathers
      included in host mode; compilation excluded).
    decode_seconds: wall time of the decode steps (compilation excluded).
    compile_seconds: compilation time of this call (0 when cached).
    decode_steps: decode steps run (the longest continuation minus one).
  """

  tokens: list[list[int]]
  prompt_tokens: int
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float
  decode_steps: int

  @property
  def generated_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_second(self) -> float:
    """Decode throughput: tokens made by decode steps (all but each sequence's first,
    which the prefill samples) per second of decode time."""
    made = sum(max(len(t) - 1, 0) for t in self.tokens)
    return made / self.decode_seconds if self.decode_seconds > 0 else 0.0

  @property
  def prefill_tokens_per_second(self) -> float:
    return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def _mask_vocab(logits: jax.Array, vocab_limit: int) -> jax.Array:
  """Never sample ids at or past vocab_limit (model vocabulary padding)."""
  if vocab_limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def _truncate(row: np.ndarray, eos_id: int | None) -> list[int]:
  out = row.tolist()
  if eos_id is not None and eos_id in out:
    out = out[:out.index(eos_id) + 1]
  return out


class Generator:
  """Reusable generation for one model (compiled functions are kept between calls).

  Args: as `generate` (model, hasher, compressor, table_placement, host_tables).
  """

  def __init__(self, model: Transformer, hasher: NgramHasher | None = None,
               compressor: TokenizerCompressor | None = None, *,
               table_placement: str = "device",
               host_tables: Mapping[int, HostTable] | None = None):
    self.decoder = Decoder(model, hasher, compressor, table_placement=table_placement,
                           host_tables=host_tables)
    self._compiled: dict = {}
    self._prefill = jax.jit(self._prefill_fn,
                            static_argnames=("max_len", "sampling", "vocab_limit"))
    self._loop = jax.jit(self._loop_fn,
                         static_argnames=("steps", "sampling", "vocab_limit", "eos_id"))
    self._step = jax.jit(self._step_fn, donate_argnames=("cache",),
                         static_argnames=("sampling", "vocab_limit"))

  # ----------------------------------------------------------------------------- traced
  def _prefill_fn(self, params, lut, tokens, lengths, rows, key, *, max_len, sampling,
                  vocab_limit):
    logits, state = self.decoder.prefill_fn(params, lut, tokens, lengths, rows, max_len=max_len)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    token = sample(_mask_vocab(last, vocab_limit), jax.random.fold_in(key, 0), sampling)
    return token, state

  def _step_fn(self, params, lut, token, cache, rows, key, index, *, sampling, vocab_limit):
    logits, state = self.decoder.step_fn(params, lut, token, cache, None, rows)
    nxt = sample(_mask_vocab(logits, vocab_limit), jax.random.fold_in(key, index), sampling)
    return nxt, state.cache

  def _loop_fn(self, params, lut, token, state: DecodeState, key, *, steps, sampling,
               vocab_limit, eos_id):
    """All decode steps on device: out int32 [B, steps + 1] (column 0 = token) and the
    number of columns filled."""
    out = jnp.zeros((token.shape[0], steps + 1), jnp.int32).at[:, 0].set(token)
    done = jnp.zeros(token.shape, bool) if eos_id is None else token == eos_id

    def cond(carry):
      i, _, _, _, done = carry
      return (i <= steps) & ~jnp.all(done)

    def body(carry):
      i, token, state, out, done = carry
      logits, state = self.decoder.step_fn(params, lut, token, state.cache, state.engram, None)
      nxt = sample(_mask_vocab(logits, vocab_limit), jax.random.fold_in(key, i), sampling)
      nxt = jnp.where(done, token, nxt)
      out = out.at[:, i].set(nxt)
      if eos_id is not None:
        done = done | (nxt == eos_id)
      return i + 1, nxt, state, out, done

    i, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, state, out, done))
    return out, i

  # ------------------------------------------------------------------------------- util
  def _compile(self, key, jitted, *args, **static):
    """AOT-compiles once per key; returns (executable, seconds spent compiling)."""
    if key in self._compiled:
      return self._compiled[key], 0.0
    start = time.perf_counter()
    exe = jitted.lower(*args, **static).compile()
    self._compiled[key] = exe
    return exe, time.perf_counter() - start

  # ----------------------------------------------------------------------------- public
  def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: SamplingConfig | None = None, seed: int = 0,
               eos_id: int | None = None) -> GenerationResult:
    dec = self.decoder
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    sampling = SamplingConfig() if sampling is None else sampling
    if not isinstance(sampling, SamplingConfig):
      raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if eos_id is not None and not 0 <= eos_id < dec.vocab_limit:
      raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {dec.vocab_limit})")
    tokens, lengths = dec.pad_prompts(prompts)
    b, p = tokens.shape
    bucket = -(-p // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.pad(tokens, ((0, 0), (0, bucket - p)))
    max_len = bucket + max_new_tokens
    steps = max_new_tokens - 1
    key = jax.random.key(seed)
    statics = {"sampling": sampling, "vocab_limit": dec.vocab_limit}
    host = dec.table_placement == "host"

    # Prefill and the first token.
    start = time.perf_counter()
    rows, window = None, None
    if host:
      compressed = dec.lut_np[tokens]
      rows = dec.host_rows(compressed)
      window = EngramDecodeState.after_prompt(
          compressed, lengths, dec.config.engram.max_ngram_size, dec.hasher.pad_id)
    host_seconds = time.perf_counter() - start
    args = (dec.params, dec.lut, tokens, lengths, rows, key)
    prefill, compile_s = self._compile(("prefill", b, bucket, max_len, sampling), self._prefill,
                                       *args, max_len=max_len, **statics)
    start = time.perf_counter()
    token, state = prefill(*args)
    token = jax.block_until_ready(token)
    prefill_seconds = host_seconds + time.perf_counter() - start

    # Decode.
    if steps == 0:
      out, used, decode_seconds = np.asarray(token)[:, None], 1, 0.0
    elif not host:
      args = (dec.params, dec.lut, token, state, key)
      loop, c = self._compile(("loop", b, max_len, steps, sampling, eos_id), self._loop,
                              *args, steps=steps, eos_id=eos_id, **statics)
      compile_s += c
      start = time.perf_counter()
      out, used = jax.block_until_ready(loop(*args))
      decode_seconds = time.perf_counter() - start
      out, used = np.asarray(out), int(used)
    else:
      out, used, decode_seconds, c = self._host_loop(token, state.replace(engram=window), key,
                                                     steps, eos_id, statics)
      compile_s += c
    continuations = [_truncate(out[i, :used], eos_id) for i in range(b)]
    return GenerationResult(tokens=continuations, prompt_tokens=int(lengths.sum()),
                            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                            compile_seconds=compile_s, decode_steps=used - 1)

  def _host_loop(self, token, state: DecodeState, key, steps, eos_id, statics):
    """Host-table decode: Python loop; rows of each new token gathered on the host."""
    dec = self.decoder
    token = np.asarray(token)
    out = [token]
    done = np.zeros(token.shape, bool) if eos_id is None else token == eos_id
    compile_s, start = 0.0, time.perf_counter()
    for i in range(1, steps + 1):
      if done.all():
        break
      rows, state = dec.host_step_rows(token, state)
      args = (dec.params, dec.lut, token, state.cache, rows, key, np.int32(i))
      if i == 1:
        paused = time.perf_counter()
        step, compile_s = self._compile(("step", token.shape[0], state.cache.kv[0].max_len,
                                         statics["sampling"]), self._step, *args, **statics)
        start += time.perf_counter() - paused
      nxt, cache = step(*args)
      state = state.replace(cache=cache)
      nxt = np.where(done, token, np.asarray(nxt))
      out.append(nxt)
      if eos_id is not None:
        done |= nxt == eos_id
      token = nxt
    decode_seconds = time.perf_counter() - start
    return np.stack(out, axis=1), len(out), decode_seconds, compile_s


def generate(model: Transformer, hasher: NgramHasher | None, compressor: TokenizerCompressor | None,
             prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig | None = None, seed: int = 0,
             eos_id: int | None = None, table_placement: str = "device",
             host_tables: Mapping[int, HostTable] | None = None) -> GenerationResult:
  """Continues a batch of prompts (raw token ids, any lengths >= 1).

  Args:
    model: the `Transformer`; hasher / compressor: its `NgramHasher` and
      `TokenizerCompressor` (None for models without Engram).
    prompts: B lists of token ids.
    max_new_tokens: tokens to generate per prompt at most.
    sampling: greedy / temperature / top-k / top-p (`SamplingConfig`; default: plain
      sampling at temperature 1).
    seed: sampling seed (step i uses fold_in(key(seed), i)).
    eos_id: a sequence stops after producing it (it is kept as its last token).
    table_placement: "device" (hash on device, one while_loop) or "host" (tables in host
      memory, rows gathered per token; see `engram_jax.inference.decoder`).
    host_tables: {layer: HostTable} for "host" (layers not named: the model's tables
      copied; a named layer may hold a size-0 placeholder in `model`, e.g. a
      `load_run(path, tables="host")` run's `run.host_tables`).
  Returns:
    `GenerationResult` (continuations, prefill / decode / compile times, tokens/s).
  For repeated calls build a `Generator` once: it keeps its compiled functions.
  """
  gen = Generator(model, hasher, compressor, table_placement=table_placement,
                  host_tables=host_tables)
  return gen(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
             eos_id=eos_id)


__all__ = ["PROMPT_BUCKET", "GenerationResult", "Generator", "generate"]
