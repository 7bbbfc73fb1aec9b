"""`Decoder`: jitted prefill and one-token decode of a `Transformer`, with Engram rows for
each new position hashed on device and gathered from device tables, host-memory tables or
a device cache of hot rows in front of host tables.

Shapes (B sequences, P padded prompt length, V vocab, N max n-gram order, H Engram heads,
d_h head width, S cache slots):
  prompts   int [B, P] raw ids, right-padded; lengths int [B] (>= 1)
  token     int [B]    the token fed at each sequence's next position
  logits    float32 [B, P, V] (prefill) / [B, V] (step)

Table placements (from the row stores, `Decoder(stores=)`) and the decode path each one
runs (`decode_path`):
  "device"  -> "device_loop". Everything stays on the accelerator. The raw -> compressed id
            table (int32 [V]) is a device array; a step compresses the new token, appends
            it to the `EngramDecodeState` window and hashes the [B, N] row with
            `NgramHasher.hash_jax` (exact 64-bit arithmetic in uint32 limbs).
  "host"    -> "host_in_loop" (default). The tables are jax.Arrays in host memory
            (`pinned_host`, see `engram_jax.offload.host_rows`), passed to the compiled
            prefill / decode loop as operands; the device copy of the model holds a
            [1, d_h] placeholder per table. A step hashes on device as above, moves the
            B*H int32 row ids to host memory, gathers the rows under
            compute_on("device_host") and copies B*H*d_h values to the device, all inside
            the same `lax.while_loop` as the device path: no Python per token.
            -> "host_python_loop" (fallback, `host_decode="python"`, or "auto" on a device
            without a host memory kind / tables past 2^31 rows): the sampled ids go to the
            host each step, are hashed with NumPy (`NgramHasher.hash`), their rows gathered
            with NumPy (`HostTable.gather`) and copied to the device, one dispatch per token.
            A `DiskTable` (disk placement) always takes this path ("auto"), through its
            bounded DRAM cache ("in_loop" refuses it); so does a "cached" layer in front
            of one, whose hot rows then come from its device cache and only the misses
            from the file.
  "cached"  -> "cached_in_loop". Each named layer's `HotRowCache` rows (int32 ids sorted,
            rows [C, d_h]) are device operands; a step looks ids up in the cache on device
            (searchsorted) and reads only the misses from the host table, compacted into a
            static buffer of `miss_capacity` rows (a step with more misses reads all B*H
            rows instead, `lax.cond`), so the rows equal a table gather.
Prefill in the in-loop paths: the row ids of the whole prompt are hashed on device and the
host gather is issued in the same program as the forward; it depends only on the tokens,
not on blocks 0 .. first Engram layer - 1, so XLA may run it while they compute
(experiments/bench/serve.py prints whether it did: prefill time against the gather alone).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.hashing import NgramHasher, TokenizerCompressor
from engram_jax.inference.decode_state import DecodeState, EngramDecodeState
from engram_jax.models import engram_table_layer
from engram_jax.models.transformer import DecodeCache, Transformer
from engram_jax.offload import HostTable
from engram_jax.offload import host_rows as host_rows_lib
from engram_jax.offload.disk_table import DiskTable
from engram_jax.offload.indexing import INT32_MAX
from engram_jax.offload.row_store import CachedRowStore, RowStore

log = logging.getLogger(__name__)

#: Choices of `Decoder(host_decode=)`: "auto" (in the compiled loop when the backend can read
#: host rows there), "in_loop" (insist on it), "python" (the per-token NumPy path).
HOST_DECODES = ("auto", "in_loop", "python")
#: The decode loops a `Decoder` may run (`Decoder.decode_path`).
DECODE_PATHS = ("device_loop", "host_in_loop", "cached_in_loop", "host_python_loop")


def _zero_stats() -> dict[str, jax.Array]:
  return {"lookups": jnp.int32(0), "hits": jnp.int32(0), "host_rows": jnp.int32(0)}


class Decoder:
  """Prefill and decode steps for one model (jitted once per shape).

  Args:
    model: the `Transformer` (read once: later changes to it are not seen).
    hasher: the model's `NgramHasher` (required iff the model has Engram layers).
    compressor: the `TokenizerCompressor` the hasher was built for.
    stores: {layer: row store} (`engram_jax.offload.row_store`; e.g. `OffloadedEngram.stores`,
      `LoadedRun.stores`, or `models.offloaded.model_stores(model, {layer: HostTable |
      HotRowCache})`). None or only device stores: "device" placement. Host stores:
      "host", with any cached store: "cached" (the other layers read their host table
      only); a device layer of such a decoder reads a host copy of the model's table. A
      host layer may have a size-0 placeholder table in `model` (`split_tables`,
      `build_offloaded`, `load_run(tables="host")`). For the in-loop paths a
      HostTable(method="compute_on") is read in place; a NumPy one is copied once into
      host memory.
    host_decode: "auto" (the in-loop path when the device has a host memory kind and
      every table's row ids fit int32, else the NumPy path, logged), "in_loop" or
      "python" (the NumPy per-token fallback; "host" only). `decode_path` says which runs.
    miss_fraction: "cached": rows read from the host per step and layer are at most
      ceil(miss_fraction * B * H) (a step with more misses reads all B * H).
  """

  def __init__(
    self,
    model: Transformer,
    hasher: NgramHasher | None = None,
    compressor: TokenizerCompressor | None = None,
    *,
    stores: Mapping[int, RowStore] | None = None,
    host_decode: str = "auto",
    miss_fraction: float = 0.5,
  ):
    if not isinstance(model, Transformer):
      raise TypeError(f"Decoder needs a Transformer, got {type(model).__name__}")
    if host_decode not in HOST_DECODES:
      raise ValueError(f"host_decode must be one of {HOST_DECODES}, got {host_decode!r}")
    if not isinstance(miss_fraction, (int, float)) or not 0.0 < miss_fraction <= 1.0:
      raise ValueError(f"miss_fraction must lie in (0, 1], got {miss_fraction!r}")
    config = model.config
    self.config = config
    self.hasher = hasher
    self.compressor = compressor
    self.layer_ids = config.engram_layer_ids
    self.miss_fraction = float(miss_fraction)
    stores = dict(stores or {})
    unknown = sorted(set(stores) - set(self.layer_ids))
    if unknown:
      raise ValueError(f"stores has layers {unknown} that are not the model's Engram layers {list(self.layer_ids)}")
    graphdef, params = nnx.split(model)
    self.graphdef = graphdef
    self.host_tables: dict[int, HostTable] = {}
    self.hot_caches = {l: s.cache for l, s in stores.items() if isinstance(s, CachedRowStore)}
    on_host = sorted(l for l, s in stores.items() if s.on_host)
    self.table_placement = "cached" if self.hot_caches else "host" if on_host else "device"
    # In-program operands of the in-loop paths: {layer: {"host": table in host memory,
    # and for cached layers "hot_ids" int32 [C], "hot_rows" [C, d_h] on the device}}.
    self.tables: dict[int, dict[str, jax.Array]] | None = None
    self.decode_path = "device_loop"
    if config.engram is None:
      self.lut = None
      self.lut_np = None
    else:
      self._check_hashing(config, hasher, compressor)
      # Ids the tokenizer does not know (model vocab padding) hash as the pad id;
      # `generate` never samples them.
      lut = np.full(max(config.vocab_size, compressor.vocab_size), hasher.pad_id, np.int32)
      lut[: compressor.vocab_size] = compressor.lookup_table
      self.lut_np = lut
      self.lut = jnp.asarray(lut)
      self.row_index = {b.layer: b.engram.row_index for b in model.blocks if b.engram is not None}
      if not on_host:
        self._check_device_tables(model)
      else:
        self.host_tables = self._host_tables(model, {l: stores[l].table for l in on_host})
        self.decode_path = self._choose_path(self.table_placement, host_decode)
        if self.decode_path != "host_python_loop":
          self.tables = self._program_tables()
        # The device copy of the model keeps a [1, d_h] stand-in for every table: the
        # forward reads rows from engram_rows only.
        params = jax.tree_util.tree_map_with_path(
          lambda p, v: v.replace(jnp.zeros((1,) + v.shape[1:], v.dtype)) if engram_table_layer(p) is not None else v,
          params,
          is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    log.info("Decoder: table placement %s, decode path %s", self.table_placement, self.decode_path)
    self.params = params
    self._prefill_jit = jax.jit(self.prefill_fn, static_argnames=("max_len",))
    self._step_jit = jax.jit(self.step_fn, donate_argnames=("cache",))

  # ----------------------------------------------------------------------------- checks
  @staticmethod
  def _check_hashing(config, hasher, compressor) -> None:
    if hasher is None or compressor is None:
      raise ValueError(
        f"model has Engram layers {config.engram_layer_ids}: pass its NgramHasher and TokenizerCompressor"
      )
    if hasher.config != config.engram:
      raise ValueError(f"hasher config {hasher.config} is not the model's {config.engram}")
    if compressor.num_compressed != hasher.compressed_vocab_size:
      raise ValueError(
        f"compressor has {compressor.num_compressed} compressed ids, the hasher was built "
        f"for {hasher.compressed_vocab_size}"
      )

  @staticmethod
  def _check_device_tables(model) -> None:
    split = [b.layer for b in model.blocks if b.engram is not None and b.engram.table.get_value().shape[0] == 0]
    if split:
      raise ValueError(
        f"the model's Engram tables of layers {split} are size-0 placeholders "
        "(the tables are in host memory): pass their host row stores, stores={layer: store}"
      )

  def _host_tables(self, model, tables: dict[int, HostTable]) -> dict[int, HostTable]:
    """The host stores' tables plus a host copy of every device layer's table."""
    for b in model.blocks:
      if b.engram is None or b.layer in tables:
        continue
      value = b.engram.table.get_value()
      if value.shape[0] == 0:
        raise ValueError(
          f"Engram layer {b.layer}'s table in the model is a size-0 placeholder: pass its host row store"
        )
      tables[b.layer] = HostTable(np.asarray(value))
    return tables

  def _choose_path(self, placement: str, host_decode: str) -> str:
    device = next(iter(self.host_tables.values())).device
    ok, why = host_rows_lib.can_read_in_program(device)
    big = sorted(l for l, t in self.host_tables.items() if t.num_rows - 1 > INT32_MAX)
    reason = None if ok else why
    if big:
      reason = f"host tables of layers {big} have row ids past int32"
    on_disk = sorted(l for l, t in self.host_tables.items() if isinstance(t, DiskTable))
    if on_disk:  # read through their DRAM cache by NumPy, never copied whole into host memory
      reason = f"host tables of layers {on_disk} are DiskTables (memory-mapped files)"
    if placement == "cached" and host_decode != "python" and not reason:
      return "cached_in_loop"
    if host_decode == "python":
      return "host_python_loop"
    if reason:
      if host_decode == "in_loop":
        raise ValueError(f"host_decode='in_loop' is not possible: {reason}")
      log.warning("host-table decode falls back to the per-token NumPy path: %s", reason)
      return "host_python_loop"
    return "host_in_loop"

  def _program_tables(self) -> dict[int, dict[str, jax.Array]]:
    out = {}
    for lid, table in self.host_tables.items():
      out[lid] = {"host": host_rows_lib.host_memory_table(table)}
      if lid in self.hot_caches:
        out[lid]["hot_ids"], out[lid]["hot_rows"] = host_rows_lib.hot_arrays(self.hot_caches[lid])
    return out

  @property
  def vocab_limit(self) -> int:
    """Ids that may be fed or sampled: the model's vocabulary, cut to the tokenizer's."""
    if self.compressor is None:
      return self.config.vocab_size
    return min(self.config.vocab_size, self.compressor.vocab_size)

  @property
  def row_bytes(self) -> int:
    """Bytes of one table row (d_h values): host -> device traffic per row read."""
    if not self.host_tables:
      return 0
    t = next(iter(self.host_tables.values()))
    return int(t.dim * np.dtype(t.dtype).itemsize)

  def pad_prompts(self, prompts) -> tuple[np.ndarray, np.ndarray]:
    """list of B token lists -> (tokens int32 [B, P] right-padded with 0, lengths int32 [B])."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
      raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
      raise ValueError("prompts is empty: need at least one prompt")
    for i, p in enumerate(prompts):
      if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
        raise ValueError(f"prompt {i} must be a flat list of int token ids, got {p!r:.80}")
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
        raise ValueError(f"prompt {i} has token id {int(ids[bad][0])} outside the vocabulary [0, {self.vocab_limit})")
      tokens[i, : len(ids)] = ids
    return tokens, lengths

  # ---------------------------------------------------------------------- host-side rows
  def host_rows(self, compressed: np.ndarray) -> dict[int, jax.Array]:
    """NumPy path: compressed ids int [B, T] -> {layer: device rows [B, T, H, d_h]}.

    Positions before the row start read the pad id, so a [B, N] window gives the exact
    rows of its last position.
    """
    hashed = self.hasher.hash(compressed)
    flat = {lid: self.row_index[lid].flat_np(ids, f"Engram layer {lid}") for lid, ids in hashed.items()}
    # a cached layer reads its hot rows from the device cache, only the misses from its table
    return {
      lid: self.hot_caches[lid].lookup(f) if lid in self.hot_caches else self.host_tables[lid].gather(f)
      for lid, f in flat.items()
    }

  def program_rows(self, tables, engram_ids: dict[int, jax.Array]) -> tuple[dict[int, jax.Array], dict[str, jax.Array]]:
    """Traceable: per-head row ids {layer: int32 [B, T, H]} -> ({layer: device rows
    [B, T, H * d_h]} read from `tables` (`self.tables`), stats {"lookups", "hits",
    "host_rows"} int32 summed over layers)."""
    rows, stats = {}, _zero_stats()
    for lid, ids in engram_ids.items():
      t = tables[lid]
      # Per-head bounds before the offset (`RowIndex.flat_jnp`, as the layer's): an invalid id
      # (-1 from `hash_jax` for an out-of-vocabulary window) reads row 0 and its head's rows
      # become NaN, never a neighbouring head's row. In-loop row ids were checked to fit int32.
      flat, valid = self.row_index[lid].flat_jnp(ids)
      if "hot_ids" in t:
        capacity = max(1, int(np.ceil(self.miss_fraction * flat.size)))
        r, s = host_rows_lib.gather_cached_rows(t["hot_ids"], t["hot_rows"], t["host"], flat, capacity)
      else:
        r = host_rows_lib.gather_host_rows(t["host"], flat)
        n = jnp.int32(flat.size)
        s = {"lookups": n, "hits": jnp.int32(0), "host_rows": n}
      r = jnp.where(valid[..., None], r, jnp.nan).astype(r.dtype)
      rows[lid] = r.reshape(ids.shape[:2] + (-1,))
      stats = {k: stats[k] + s[k] for k in stats}
    return rows, stats

  # ---------------------------------------------------------------- traced (jit-able)
  def _forward(self, params, tokens, cache, segment_ids=None, engram_ids=None, engram_rows=None):
    """engram_ids {layer: [B, T, H]} (device tables) or engram_rows {layer: per-head rows
    [B, T, H, d_h]} (merged to [B, T, d_mem] here)."""
    model = nnx.merge(self.graphdef, params)
    merged = None if engram_rows is None else {lid: r.reshape(r.shape[:2] + (-1,)) for lid, r in engram_rows.items()}
    logits, aux = model(tokens, engram_ids, segment_ids=segment_ids, engram_rows=merged, cache=cache)
    return logits, aux["cache"]

  def prefill_fn(self, params, lut, tokens, lengths, rows, *, max_len, tables=None):
    """Traceable prefill (use inside jit): params = `self.params`, lut = `self.lut`,
    tokens int [B, P] right-padded, lengths int [B], rows None (hashing on device) or
    {layer: [B, P, H, d_h]} (NumPy path), tables None or `self.tables` (in-loop host
    reads). Returns (logits [B, P, V], DecodeState)."""
    b, p = tokens.shape
    model_cache = nnx.merge(self.graphdef, params).init_cache(b, max_len)
    segment_ids = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
    engram_ids, window = None, None
    if self.config.engram is not None and rows is None:
      compressed = jnp.take(lut, tokens, axis=0)
      engram_ids = self.hasher.hash_jax(compressed)
      window = EngramDecodeState.after_prompt(
        compressed, lengths, self.config.engram.max_ngram_size, self.hasher.pad_id
      )
      if tables is not None:
        # Depends on the tokens only: free to overlap the blocks before the first Engram layer.
        rows, _ = self.program_rows(tables, engram_ids)
        engram_ids = None
    logits, cache = self._forward(params, tokens, model_cache, segment_ids, engram_ids, rows)
    return logits, DecodeState(cache=cache, engram=window)

  def step_core(self, params, lut, token, cache: DecodeCache, window, rows, tables=None):
    """`step_fn` plus the step's host-read stats (None without in-program host reads)."""
    engram_ids, new_window, stats = None, None, None
    if self.config.engram is not None and rows is None:
      ngram, new_window = window.push(jnp.take(lut, token, axis=0))
      engram_ids = {lid: r[:, -1:] for lid, r in self.hasher.hash_jax(ngram).items()}
      if tables is not None:
        rows, stats = self.program_rows(tables, engram_ids)
        engram_ids = None
    logits, cache = self._forward(params, token[:, None], cache, None, engram_ids, rows)
    return logits[:, 0], DecodeState(cache=cache, engram=new_window), stats

  def step_fn(self, params, lut, token, cache: DecodeCache, window, rows, tables=None):
    """Traceable decode step: token int [B]; window the device `EngramDecodeState`
    (rows None; with tables = `self.tables` the rows are read from host memory) or None
    with rows {layer: [B, 1, H, d_h]} (NumPy path). Returns (logits [B, V], DecodeState)."""
    logits, state, _ = self.step_core(params, lut, token, cache, window, rows, tables)
    return logits, state

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
    bad = (tokens < 0) | (tokens >= self.vocab_limit)
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"token id {int(tokens[pos])} at {pos} is outside the vocabulary [0, {self.vocab_limit})")
    rows, window = None, None
    if self.decode_path == "host_python_loop":
      compressed = self.lut_np[tokens]
      rows = self.host_rows(compressed)
      window = EngramDecodeState.after_prompt(
        compressed, lengths, self.config.engram.max_ngram_size, self.hasher.pad_id
      )
    logits, state = self._prefill_jit(self.params, self.lut, tokens, lengths, rows, max_len=max_len, tables=self.tables)
    return logits, state if window is None else state.replace(engram=window)

  def host_step_rows(self, token, state: DecodeState) -> tuple[dict[int, jax.Array], DecodeState]:
    """NumPy path: rows of the next position for token [B] and the state with the token
    pushed onto its (NumPy) window."""
    compressed = self.lut_np[np.asarray(token)]
    ngram, window = state.engram.push(compressed)
    rows = {lid: r[:, -1:] for lid, r in self.host_rows(ngram).items()}
    return rows, state.replace(engram=window)

  def step(self, token, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Feeds one token [B] per sequence at its next position; returns (logits float32
    [B, V], the new state). `state.cache` is donated: do not reuse it."""
    token_np = np.asarray(token)
    if token_np.shape != state.lengths.shape:
      raise ValueError(f"token must have shape [B] = {state.lengths.shape}, got {token_np.shape}")
    bad = (token_np < 0) | (token_np >= self.vocab_limit)
    if bad.any():
      raise ValueError(f"token id {int(token_np[bad][0])} is outside the vocabulary [0, {self.vocab_limit})")
    full = np.asarray(state.lengths) >= state.cache.kv[0].max_len
    if full.any():
      raise ValueError(
        f"sequence {int(np.argmax(full))} fills its cache of "
        f"{state.cache.kv[0].max_len} slots: prefill with a larger max_len"
      )
    token = jnp.asarray(token_np, jnp.int32)
    if self.decode_path == "host_python_loop":
      rows, state = self.host_step_rows(token, state)
      logits, new = self._step_jit(self.params, self.lut, token, state.cache, None, rows)
      return logits, new.replace(engram=state.engram)
    return self._step_jit(self.params, self.lut, token, state.cache, state.engram, None, tables=self.tables)


__all__ = ["DECODE_PATHS", "HOST_DECODES", "Decoder"]
