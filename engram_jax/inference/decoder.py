"""`Decoder`: jitted prefill and one-token decode of a `Transformer`, with Engram rows for
each new position either hashed on device or gathered from host tables.

Shapes (B sequences, P padded prompt length, V vocab, N max n-gram order, H Engram heads,
d_h head width, S cache slots):
  prompts   int [B, P] raw ids, right-padded; lengths int [B] (>= 1)
  token     int [B]    the token fed at each sequence's next position
  logits    float32 [B, P, V] (prefill) / [B, V] (step)

Table placements:
  "device"  Everything stays on the accelerator. The raw -> compressed id table (int32
            [V]) is a device array; a step compresses the new token, appends it to the
            `EngramDecodeState` window and hashes the [B, N] row with
            `NgramHasher.hash_jax` (exact 64-bit arithmetic in uint32 limbs). No host
            round trip, so `generate` runs all decode steps in one `lax.while_loop`.
  "host"    The tables stay in host memory (`engram_jax.offload.HostTable`); the device
            copy of the model holds a [1, d_h] placeholder instead of each table. After a
            token is sampled it is copied to the host, hashed there with NumPy
            (`NgramHasher.hash`) and its H rows per Engram layer are gathered and copied to
            the device before the step runs (`engram_inputs`).
            Latency per token: one device -> host sync of B ids, a host hash (~us) and a
            host gather + host -> device copy of B * H * d_h values per Engram layer, all
            on the critical path (the next token is unknown until it is sampled, so rows
            cannot be fetched ahead), plus a Python dispatch per step instead of one
            while_loop. Small for batched decoding of large models, dominant for tiny ones.
            Overlapping the gather with the blocks before the first Engram layer (the
            paper's prefetch) would need the step split at that layer; not done here.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.hashing import NgramHasher, TokenizerCompressor
from engram_jax.inference.decode_state import DecodeState, EngramDecodeState
from engram_jax.models.transformer import DecodeCache, Transformer
from engram_jax.offload import HostTable

TABLE_PLACEMENTS = ("device", "host")


def _is_table(path) -> bool:
  keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]
  return "engram" in keys and keys[-1] == "table"


class Decoder:
  """Prefill and decode steps for one model (jitted once per shape).

  Args:
    model: the `Transformer` (read once: later changes to it are not seen).
    hasher: the model's `NgramHasher` (required iff the model has Engram layers).
    compressor: the `TokenizerCompressor` the hasher was built for.
    table_placement: "device" or "host" (see the module docstring).
    host_tables: {layer_id: HostTable} for "host"; Engram layers not named get a copy of
      the model's table (NumPy gather); all of them by default. A layer named here may
      have a size-0 placeholder table in `model` (`split_tables`, `build_offloaded`,
      `load_run(tables="host")`); "device" refuses such a model.
  """

  def __init__(self, model: Transformer, hasher: NgramHasher | None = None,
               compressor: TokenizerCompressor | None = None, *,
               table_placement: str = "device",
               host_tables: Mapping[int, HostTable] | None = None):
    if not isinstance(model, Transformer):
      raise TypeError(f"Decoder needs a Transformer, got {type(model).__name__}")
    if table_placement not in TABLE_PLACEMENTS:
      raise ValueError(f"table_placement must be one of {TABLE_PLACEMENTS}, got {table_placement!r}")
    config = model.config
    self.config = config
    self.table_placement = table_placement
    self.hasher = hasher
    self.compressor = compressor
    self.layer_ids = config.engram_layer_ids
    graphdef, params = nnx.split(model)
    self.graphdef = graphdef
    self.host_tables: dict[int, HostTable] = {}
    if config.engram is None:
      if table_placement == "host":
        raise ValueError("table_placement='host' needs a model with Engram layers")
      self.lut = None
      self.lut_np = None
    else:
      self._check_hashing(config, hasher, compressor)
      # Ids the tokenizer does not know (model vocab padding) hash as the pad id;
      # `generate` never samples them.
      lut = np.full(max(config.vocab_size, compressor.vocab_size), hasher.pad_id, np.int32)
      lut[:compressor.vocab_size] = compressor.lookup_table
      self.lut_np = lut
      self.lut = jnp.asarray(lut)
      if table_placement == "host":
        self.host_tables = self._host_tables(model, host_tables)
        # The device copy of the model keeps a [1, d_h] stand-in for every table: the
        # forward reads rows from engram_inputs only.
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: v.replace(jnp.zeros((1,) + v.shape[1:], v.dtype)) if _is_table(p) else v,
            params, is_leaf=lambda x: isinstance(x, nnx.Variable))
      else:
        if host_tables:
          raise ValueError("host_tables are only used with table_placement='host'")
        self._check_device_tables(model)
    self.params = params
    self._prefill_jit = jax.jit(self.prefill_fn, static_argnames=("max_len",))
    self._step_jit = jax.jit(self.step_fn, donate_argnames=("cache",))

  # ----------------------------------------------------------------------------- checks
  @staticmethod
  def _check_hashing(config, hasher, compressor) -> None:
    if hasher is None or compressor is None:
      raise ValueError(
          f"model has Engram layers {config.engram_layer_ids}: pass its NgramHasher and "
          "TokenizerCompressor")
    if hasher.config != config.engram:
      raise ValueError(f"hasher config {hasher.config} is not the model's {config.engram}")
    if compressor.num_compressed != hasher.compressed_vocab_size:
      raise ValueError(
          f"compressor has {compressor.num_compressed} compressed ids, the hasher was built "
          f"for {hasher.compressed_vocab_size}")

  @staticmethod
  def _check_device_tables(model) -> None:
    split = [b.layer for b in model.blocks
             if b.engram is not None and b.engram.table.get_value().shape[0] == 0]
    if split:
      raise ValueError(f"the model's Engram tables of layers {split} are size-0 placeholders "
                       "(the tables are in host memory): use table_placement='host' with "
                       "host_tables={layer: HostTable}")

  def _host_tables(self, model, host_tables) -> dict[int, HostTable]:
    tables = dict(host_tables or {})
    unknown = sorted(set(tables) - set(self.layer_ids))
    if unknown:
      raise ValueError(f"host_tables has layers {unknown} that are not the model's Engram "
                       f"layers {list(self.layer_ids)}")
    for b in model.blocks:
      if b.engram is None or b.layer in tables:
        continue
      value = b.engram.table.get_value()
      if value.shape[0] == 0:
        raise ValueError(f"Engram layer {b.layer}'s table in the model is a size-0 "
                         "placeholder: pass its HostTable in host_tables")
      tables[b.layer] = HostTable(np.asarray(value))
    for lid, table in tables.items():
      want = (self.hasher.total_rows(lid), self.config.engram.head_dim)
      if tuple(table.shape) != want:
        raise ValueError(f"host table of layer {lid} has shape {table.shape}, expected {want}")
    return tables

  @property
  def vocab_limit(self) -> int:
    """Ids that may be fed or sampled: the model's vocabulary, cut to the tokenizer's."""
    if self.compressor is None:
      return self.config.vocab_size
    return min(self.config.vocab_size, self.compressor.vocab_size)

  def pad_prompts(self, prompts) -> tuple[np.ndarray, np.ndarray]:
    """list of B token lists -> (tokens int32 [B, P] right-padded with 0, lengths int32 [B])."""
    if not prompts:
      raise ValueError("need at least one prompt")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
      raise ValueError(f"prompt {int(np.argmin(lengths))} is empty; every prompt needs a token")
    tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
    for i, p in enumerate(prompts):
      ids = np.asarray(p)
      if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
        raise ValueError(f"prompt {i} must be a flat list of int token ids, got {p!r:.80}")
      bad = (ids < 0) | (ids >= self.vocab_limit)
      if bad.any():
        raise ValueError(f"prompt {i} has token id {int(ids[bad][0])} outside the vocabulary "
                         f"[0, {self.vocab_limit})")
      tokens[i, :len(ids)] = ids
    return tokens, lengths

  # ---------------------------------------------------------------------- host-side rows
  def host_rows(self, compressed: np.ndarray) -> dict[int, jax.Array]:
    """Compressed ids int [B, T] -> {layer: device rows [B, T, H, d_h]} from the host tables.

    Positions before the row start read the pad id, so a [B, N] window gives the exact
    rows of its last position.
    """
    hashed = self.hasher.hash(compressed)
    return {lid: self.host_tables[lid].gather(rows + self.hasher.offsets[lid])
            for lid, rows in hashed.items()}

  # ---------------------------------------------------------------- traced (jit-able)
  def _forward(self, params, tokens, cache, segment_ids=None, row_ids=None, rows=None):
    model = nnx.merge(self.graphdef, params)
    inputs = None if rows is None else {
        lid: r.reshape(r.shape[:2] + (-1,)) for lid, r in rows.items()}
    logits, aux = model(tokens, row_ids, segment_ids=segment_ids, engram_inputs=inputs,
                        cache=cache)
    return logits, aux["cache"]

  def prefill_fn(self, params, lut, tokens, lengths, rows, *, max_len):
    """Traceable prefill (use inside jit): params = `self.params`, lut = `self.lut`,
    tokens int [B, P] right-padded, lengths int [B], rows None (device hashing) or
    {layer: [B, P, H, d_h]}. Returns (logits [B, P, V], DecodeState)."""
    b, p = tokens.shape
    model_cache = nnx.merge(self.graphdef, params).init_cache(b, max_len)
    segment_ids = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
    row_ids, window = None, None
    if self.config.engram is not None and rows is None:
      compressed = jnp.take(lut, tokens, axis=0)
      row_ids = self.hasher.hash_jax(compressed)
      window = EngramDecodeState.after_prompt(
          compressed, lengths, self.config.engram.max_ngram_size, self.hasher.pad_id)
    logits, cache = self._forward(params, tokens, model_cache, segment_ids, row_ids, rows)
    return logits, DecodeState(cache=cache, engram=window)

  def step_fn(self, params, lut, token, cache: DecodeCache, window, rows):
    """Traceable decode step: token int [B]; window the device `EngramDecodeState`
    (rows None) or None with rows {layer: [B, 1, H, d_h]}. Returns (logits [B, V],
    DecodeState)."""
    row_ids, new_window = None, None
    if self.config.engram is not None and rows is None:
      ngram, new_window = window.push(jnp.take(lut, token, axis=0))
      row_ids = {lid: r[:, -1:] for lid, r in self.hasher.hash_jax(ngram).items()}
    logits, cache = self._forward(params, token[:, None], cache, None, row_ids, rows)
    return logits[:, 0], DecodeState(cache=cache, engram=new_window)

  # ----------------------------------------------------------------------------- public
  def prefill(self, tokens, lengths, max_len: int) -> tuple[jax.Array, DecodeState]:
    """Runs right-padded prompts tokens [B, P] of `lengths` [B] through the model.

    Returns (logits float32 [B, P, V] (positions >= lengths[b] are padding), the state
    after each sequence's own prompt, with room for max_len tokens in all).
    """
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
      raise ValueError(f"tokens must be [B, P] and lengths [B], got {tokens.shape}, {lengths.shape}")
    if (lengths < 1).any() or (lengths > tokens.shape[1]).any():
      raise ValueError(f"lengths {lengths.tolist()} must lie in [1, P={tokens.shape[1]}]")
    if max_len < tokens.shape[1]:
      raise ValueError(f"max_len={max_len} is shorter than the padded prompts ({tokens.shape[1]})")
    rows, window = None, None
    if self.table_placement == "host":
      compressed = self.lut_np[tokens]
      rows = self.host_rows(compressed)
      window = EngramDecodeState.after_prompt(
          compressed, lengths, self.config.engram.max_ngram_size, self.hasher.pad_id)
    logits, state = self._prefill_jit(self.params, self.lut, tokens, lengths, rows,
                                      max_len=max_len)
    return logits, state if window is None else state.replace(engram=window)

  def host_step_rows(self, token, state: DecodeState) -> tuple[dict[int, jax.Array], DecodeState]:
    """Host mode: rows of the next position for token [B] and the state with the token
    pushed onto its (NumPy) window."""
    compressed = self.lut_np[np.asarray(token)]
    ngram, window = state.engram.push(compressed)
    rows = {lid: r[:, -1:] for lid, r in self.host_rows(ngram).items()}
    return rows, state.replace(engram=window)

  def step(self, token, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Feeds one token [B] per sequence at its next position; returns (logits float32
    [B, V], the new state). `state.cache` is donated: do not reuse it."""
    token = jnp.asarray(token, jnp.int32)
    if token.shape != state.lengths.shape:
      raise ValueError(f"token must have shape [B] = {state.lengths.shape}, got {token.shape}")
    if self.table_placement == "host":
      rows, state = self.host_step_rows(token, state)
      logits, new = self._step_jit(self.params, self.lut, token, state.cache, None, rows)
      return logits, new.replace(engram=state.engram)
    window = state.engram
    return self._step_jit(self.params, self.lut, token, state.cache, window, None)


__all__ = ["TABLE_PLACEMENTS", "Decoder"]
