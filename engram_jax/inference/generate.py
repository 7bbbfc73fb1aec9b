"""Batched text generation: prefill, then sampled decode steps until eos or a token budget.

Prompts of different lengths are right-padded (segment id 0 marks padding) and prefilled
together, so each sequence's KV cache and Engram conv state end at its own prompt length;
every decode step then writes each sequence at its own next position. Finished sequences
stay in the batch (static shapes) until all are done or `max_new_tokens` is reached.

Every placement (device, host or cached row stores) runs all decode steps in one jitted
`lax.while_loop` (host rows are read inside it, see `engram_jax.inference.decoder`); only
the NumPy fallback (`decode_path == "host_python_loop"`) runs a Python loop over a jitted
step. All draw step i's token with `fold_in(key(seed), i)`, so they sample the same tokens
from the same logits. `GenerationResult.decode_path` says which path ran.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.hashing import NgramHasher, TokenizerCompressor
from engram_jax.inference.decode_state import DecodeState, EngramDecodeState
from engram_jax.inference.decoder import Decoder
from engram_jax.inference.sampling import SamplingConfig, sample
from engram_jax.models.transformer import Transformer
from engram_jax.offload.row_store import RowStore

PROMPT_BUCKET = 16  # padded prompt lengths are multiples of this: fewer compilations


@dataclasses.dataclass
class GenerationResult:
  """Continuations and timings of one `generate` call.

  Attributes:
    tokens: per prompt, the generated ids (ending with eos_id, included, if it was hit).
    prompt_tokens: prompt ids prefilled, summed over prompts.
    prefill_seconds: prefill wall time (first token sampled; host hashing and gathers
      included; compilation excluded).
    decode_seconds: wall time of the decode steps (compilation excluded).
    compile_seconds: compilation time of this call (0 when cached).
    decode_steps: decode steps run (the longest continuation minus one).
    decode_path: "device_loop", "host_in_loop", "cached_in_loop" or "host_python_loop".
    batch: B, sequences decoded together.
    host_rows_read: table rows copied host -> device by the decode steps (all layers).
    cache_lookups, cache_hits: row lookups of the decode steps that went through a hot-row
      cache, and how many the cache served.
    row_bytes: bytes of one table row (0 without host tables).
  """

  tokens: list[list[int]]
  prompt_tokens: int
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float
  decode_steps: int
  decode_path: str = "device_loop"
  batch: int = 0
  host_rows_read: int = 0
  cache_lookups: int = 0
  cache_hits: int = 0
  row_bytes: int = 0

  @property
  def generated_tokens(self) -> int:
    """Tokens generated over all sequences (up to and including each one's EOS)."""
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_second(self) -> float:
    """Decode throughput: tokens made by decode steps (all but each sequence's first,
    which the prefill samples) per second of decode time."""
    made = sum(max(len(t) - 1, 0) for t in self.tokens)
    return made / self.decode_seconds if self.decode_seconds > 0 else 0.0

  @property
  def prefill_tokens_per_second(self) -> float:
    """Prompt tokens per second of the prefill (0 when it was not timed)."""
    return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

  @property
  def host_bytes_per_token(self) -> float:
    """Bytes host -> device per decoded token (per sequence and step, all layers)."""
    slots = self.decode_steps * self.batch
    return self.host_rows_read * self.row_bytes / slots if slots else 0.0

  @property
  def cache_hit_rate(self) -> float:
    """Fraction of the decode's hot-cache row lookups served from the device (NaN without a cache)."""
    return self.cache_hits / self.cache_lookups if self.cache_lookups else float("nan")


def _mask_vocab(logits: jax.Array, vocab_limit: int) -> jax.Array:
  """Never sample ids at or past vocab_limit (model vocabulary padding)."""
  if vocab_limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def _truncate(row: np.ndarray, eos_id: int | None) -> list[int]:
  out = row.tolist()
  if eos_id is not None and eos_id in out:
    out = out[: out.index(eos_id) + 1]
  return out


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class Generator:
  """Reusable generation for one model (compiled functions are kept between calls).

  Args: model, hasher, compressor as `generate`, and
    max_len: the longest sequence (prompt + new tokens) a call may produce, e.g. the
      context the model was trained for; None = no limit (the cache is sized per call).
    decoder_options: `Decoder`'s keyword arguments (stores, host_decode, miss_fraction).
  """

  def __init__(
    self,
    model: Transformer,
    hasher: NgramHasher | None = None,
    compressor: TokenizerCompressor | None = None,
    *,
    max_len: int | None = None,
    **decoder_options: Any,
  ):
    if max_len is not None and (not _is_int(max_len) or max_len < 2):
      raise ValueError(f"max_len must be None or an int >= 2, got {max_len!r}")
    self.max_len = max_len
    self.decoder = Decoder(model, hasher, compressor, **decoder_options)
    self._compiled: dict = {}
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("max_len", "sampling", "vocab_limit"))
    self._loop = jax.jit(self._loop_fn, static_argnames=("steps", "sampling", "vocab_limit", "eos_id"))
    self._step = jax.jit(self._step_fn, donate_argnames=("cache",), static_argnames=("sampling", "vocab_limit"))

  @property
  def decode_path(self) -> str:
    """Which decode loop runs: one of `DECODE_PATHS` (decided by the row stores and `host_decode`)."""
    return self.decoder.decode_path

  # ----------------------------------------------------------------------------- traced
  def _prefill_fn(self, params, lut, tokens, lengths, rows, key, tables, *, max_len, sampling, vocab_limit):
    logits, state = self.decoder.prefill_fn(params, lut, tokens, lengths, rows, max_len=max_len, tables=tables)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    token = sample(_mask_vocab(last, vocab_limit), jax.random.fold_in(key, 0), sampling)
    return token, state

  def _step_fn(self, params, lut, token, cache, rows, key, index, *, sampling, vocab_limit):
    logits, state = self.decoder.step_fn(params, lut, token, cache, None, rows)
    nxt = sample(_mask_vocab(logits, vocab_limit), jax.random.fold_in(key, index), sampling)
    return nxt, state.cache

  def _loop_fn(self, params, lut, token, state: DecodeState, key, tables, *, steps, sampling, vocab_limit, eos_id):
    """All decode steps in one program: out int32 [B, steps + 1] (column 0 = token), the
    number of columns filled and the summed host-read stats."""
    out = jnp.zeros((token.shape[0], steps + 1), jnp.int32).at[:, 0].set(token)
    done = jnp.zeros(token.shape, bool) if eos_id is None else token == eos_id
    zero = {"lookups": jnp.int32(0), "hits": jnp.int32(0), "host_rows": jnp.int32(0)}

    def cond(carry):
      i, _, _, _, done, _ = carry
      return (i <= steps) & ~jnp.all(done)

    def body(carry):
      i, token, state, out, done, totals = carry
      logits, state, stats = self.decoder.step_core(params, lut, token, state.cache, state.engram, None, tables)
      nxt = sample(_mask_vocab(logits, vocab_limit), jax.random.fold_in(key, i), sampling)
      nxt = jnp.where(done, token, nxt)
      out = out.at[:, i].set(nxt)
      if eos_id is not None:
        done = done | (nxt == eos_id)
      if stats is not None:
        totals = {k: totals[k] + stats[k] for k in totals}
      return i + 1, nxt, state, out, done, totals

    i, _, _, out, _, totals = jax.lax.while_loop(cond, body, (jnp.int32(1), token, state, out, done, zero))
    return out, i, totals

  # ------------------------------------------------------------------------------- util
  def _compile(self, key, jitted, *args, **static):
    """AOT-compiles once per key; returns (executable, seconds spent compiling)."""
    if key in self._compiled:
      return self._compiled[key], 0.0
    start = time.perf_counter()
    exe = jitted.lower(*args, **static).compile()
    self._compiled[key] = exe
    return exe, time.perf_counter() - start

  def _check_call(self, lengths, max_new_tokens, sampling, seed, eos_id) -> SamplingConfig:
    dec = self.decoder
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    sampling = SamplingConfig() if sampling is None else sampling
    if not isinstance(sampling, SamplingConfig):
      raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if not _is_int(seed):
      raise ValueError(f"seed must be an int, got {seed!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < dec.vocab_limit):
      raise ValueError(f"eos_id {eos_id!r} is outside the vocabulary [0, {dec.vocab_limit})")
    if self.max_len is not None:
      longest = int(np.argmax(lengths))
      if int(lengths[longest]) + max_new_tokens > self.max_len:
        raise ValueError(
          f"prompt {longest} has {int(lengths[longest])} tokens: with "
          f"max_new_tokens={max_new_tokens} it would reach "
          f"{int(lengths[longest]) + max_new_tokens} > max_len={self.max_len}"
        )
    return sampling

  # ----------------------------------------------------------------------------- public
  def __call__(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    eos_id: int | None = None,
  ) -> GenerationResult:
    """Generates up to `max_new_tokens` for each prompt (token lists of any lengths, padded here), stopping a sequence at `eos_id`; returns tokens, timings and cache statistics."""
    dec = self.decoder
    tokens, lengths = dec.pad_prompts(prompts)
    sampling = self._check_call(lengths, max_new_tokens, sampling, seed, eos_id)
    b, p = tokens.shape
    bucket = -(-p // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.pad(tokens, ((0, 0), (0, bucket - p)))
    max_len = bucket + max_new_tokens
    steps = max_new_tokens - 1
    key = jax.random.key(seed)
    statics = {"sampling": sampling, "vocab_limit": dec.vocab_limit}
    python = dec.decode_path == "host_python_loop"

    # Prefill and the first token.
    start = time.perf_counter()
    rows, window = None, None
    if python:
      compressed = dec.lut_np[tokens]
      rows = dec.host_rows(compressed)
      window = EngramDecodeState.after_prompt(compressed, lengths, dec.config.engram.max_ngram_size, dec.hasher.pad_id)
    host_seconds = time.perf_counter() - start
    args = (dec.params, dec.lut, tokens, lengths, rows, key, dec.tables)
    prefill, compile_s = self._compile(
      ("prefill", b, bucket, max_len, sampling), self._prefill, *args, max_len=max_len, **statics
    )
    start = time.perf_counter()
    token, state = prefill(*args)
    token = jax.block_until_ready(token)
    prefill_seconds = host_seconds + time.perf_counter() - start

    # Decode.
    totals = {"lookups": 0, "hits": 0, "host_rows": 0}
    if steps == 0:
      out, used, decode_seconds = np.asarray(token)[:, None], 1, 0.0
    elif not python:
      args = (dec.params, dec.lut, token, state, key, dec.tables)
      loop, c = self._compile(
        ("loop", b, max_len, steps, sampling, eos_id), self._loop, *args, steps=steps, eos_id=eos_id, **statics
      )
      compile_s += c
      start = time.perf_counter()
      out, used, stats = jax.block_until_ready(loop(*args))
      decode_seconds = time.perf_counter() - start
      out, used = np.asarray(out), int(used)
      totals = {k: int(v) for k, v in stats.items()}
    else:
      out, used, decode_seconds, c = self._host_loop(token, state.replace(engram=window), key, steps, eos_id, statics)
      compile_s += c
      per_step = b * dec.config.engram.num_heads * len(dec.host_tables)
      totals["host_rows"] = (used - 1) * per_step
      totals["lookups"] = 0
    continuations = [_truncate(out[i, :used], eos_id) for i in range(b)]
    cached = bool(dec.hot_caches)
    return GenerationResult(
      tokens=continuations,
      prompt_tokens=int(lengths.sum()),
      prefill_seconds=prefill_seconds,
      decode_seconds=decode_seconds,
      compile_seconds=compile_s,
      decode_steps=used - 1,
      decode_path=dec.decode_path,
      batch=b,
      host_rows_read=totals["host_rows"],
      cache_lookups=totals["lookups"] if cached else 0,
      cache_hits=totals["hits"] if cached else 0,
      row_bytes=dec.row_bytes,
    )

  def _host_loop(self, token, state: DecodeState, key, steps, eos_id, statics):
    """NumPy fallback: Python loop; rows of each new token hashed and gathered on the host."""
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
        step, compile_s = self._compile(
          ("step", token.shape[0], state.cache.kv[0].max_len, statics["sampling"]), self._step, *args, **statics
        )
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


def generate(
  model: Transformer,
  hasher: NgramHasher | None,
  compressor: TokenizerCompressor | None,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  sampling: SamplingConfig | None = None,
  seed: int = 0,
  eos_id: int | None = None,
  stores: Mapping[int, RowStore] | None = None,
  host_decode: str = "auto",
) -> GenerationResult:
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
    stores: {layer: row store}: None / device stores (tables on the accelerator), host
      stores (tables in host memory, rows read inside the compiled loop) or cached stores
      (hot rows on the device, misses from host memory); e.g. a `load_run(path,
      tables="host")` run's `run.stores`; see `engram_jax.inference.decoder`.
    host_decode: "auto", "in_loop" or "python" (the per-token NumPy fallback).
  Returns:
    `GenerationResult` (continuations, prefill / decode / compile times, tokens/s, the
    decode path that ran, host -> device rows).
  For repeated calls build a `Generator` once: it keeps its compiled functions.
  """
  gen = Generator(model, hasher, compressor, stores=stores, host_decode=host_decode)
  return gen(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, eos_id=eos_id)


__all__ = ["PROMPT_BUCKET", "GenerationResult", "Generator", "generate"]
