"""Generation: KV-cached decoding with Engram reproduces the full forward at every position
(device tables, host tables read inside the compiled loop, a hot-row cache in front of host
tables, and the NumPy fallback; hc_mult 1 and 2, prompts of different lengths), device
hashing of the decode window equals host hashing, and generate() is greedy-consistent,
deterministic, the same on every placement and stops at eos."""

from typing import NamedTuple

import jax
import numpy as np
import pytest
from flax import nnx

from engram_jax import NgramHasher, TokenizerCompressor
from engram_jax.inference import (
  Decoder,
  EngramDecodeState,
  Generator,
  SamplingConfig,
  generate,
)
from engram_jax.models.config import ModelConfig
from engram_jax.models.offloaded import model_stores
from engram_jax.models.transformer import Transformer
from engram_jax.offload import HostTable, HotRowCache

T = 12  # tokens per sequence
PROMPT_LENGTHS = (3, 7, 1)  # prefilled together (right-padded to 7)
KNOWN_IDS = 100
_SETUPS = {}


class Setup(NamedTuple):
  config: ModelConfig
  model: Transformer
  compressor: TokenizerCompressor
  hasher: NgramHasher
  tokens: np.ndarray  # int32 [3, T] in [0, KNOWN_IDS)
  full: np.ndarray  # full-forward logits [3, T, V]


@nnx.jit
def _forward(model, tokens, rows):
  return model(tokens, rows)[0]


def setup(hc_mult):
  """A tiny Engram+MoE model with a non-zero conv kernel (so the conv state matters), a
  compressor that merges ids (the tokenizer knows 100 of the model's 128 ids; they
  compress to 97) and its hasher. One per hc_mult per module."""
  if hc_mult not in _SETUPS:
    config = ModelConfig.tiny("engram_moe", hc_mult=hc_mult, num_layers=2)
    model = Transformer(config, rngs=nnx.Rngs(hc_mult))
    engram = model.blocks[1].engram
    engram.conv_kernel[...] = 0.5 * jax.random.normal(jax.random.key(7), engram.conv_kernel.shape)
    compressor = TokenizerCompressor(np.arange(KNOWN_IDS) % 97)
    hasher = NgramHasher(config.engram, compressor.num_compressed)
    tokens = np.random.default_rng(hc_mult).integers(0, KNOWN_IDS, (3, T)).astype(np.int32)
    rows = {l: r.astype(np.int32) for l, r in hasher.hash(compressor(tokens)).items()}
    full = np.asarray(_forward(model, tokens, rows))
    _SETUPS[hc_mult] = Setup(config, model, compressor, hasher, tokens, full)
  return _SETUPS[hc_mult]


def teacher_forced_logits(decoder, tokens):
  """Prefill each sequence's prompt (batched, right-padded), then feed the true next
  tokens one at a time; returns logits [B, T, V] assembled per position."""
  b, t = tokens.shape
  lengths = np.asarray(PROMPT_LENGTHS, np.int32)
  p = int(lengths.max())
  prompts = np.where(np.arange(p)[None] < lengths[:, None], tokens[:, :p], 0)
  logits, state = decoder.prefill(prompts, lengths, max_len=2 * t)
  got = np.full(tokens.shape + (logits.shape[-1],), np.nan, np.float32)
  for i in range(b):
    got[i, : lengths[i]] = np.asarray(logits[i, : lengths[i]])
  for s in range(t - int(lengths.min())):
    pos = lengths + s  # each sequence's own next position
    feed = tokens[np.arange(b), np.minimum(pos, t - 1)]
    step_logits, state = decoder.step(feed, state)
    for i in range(b):
      if pos[i] < t:
        got[i, pos[i]] = np.asarray(step_logits[i])
  np.testing.assert_array_equal(np.asarray(state.lengths), lengths + t - lengths.min())
  return got


_DECODERS, _GENERATORS = {}, {}


PLACEMENTS = ("device", "host", "cached", "host_python")
PATHS = {"device": "device_loop", "host": "host_in_loop", "cached": "cached_in_loop", "host_python": "host_python_loop"}


def table_of(model, layer=1):
  return np.asarray(model.blocks[layer].engram.table[...])


def placement_kwargs(model, placement):
  """Decoder / Generator keyword arguments of a test placement: "host" reads a
  HostTable(method="compute_on") in place, "cached" keeps every third row on the device
  (so steps mix hits and misses), "host_python" is the NumPy fallback."""
  if placement == "device":
    return {}
  table = np.asarray(model.blocks[1].engram.table[...])
  if placement == "host_python":
    return {"stores": model_stores(model, {1: HostTable(table)}), "host_decode": "python"}
  host = HostTable(table, method="compute_on")
  if placement == "host":
    return {"stores": model_stores(model, {1: host}), "host_decode": "in_loop"}
  cache = HotRowCache(host, np.arange(0, table.shape[0], 3))
  return {"stores": model_stores(model, {1: cache}), "miss_fraction": 0.75}


def decoder_for(hc_mult, placement):
  """One Decoder per setup (its jitted functions compile once)."""
  if (hc_mult, placement) not in _DECODERS:
    s = setup(hc_mult)
    _DECODERS[hc_mult, placement] = Decoder(s.model, s.hasher, s.compressor, **placement_kwargs(s.model, placement))
  return _DECODERS[hc_mult, placement]


def generator_for(placement, hc_mult=2):
  if (hc_mult, placement) not in _GENERATORS:
    s = setup(hc_mult)
    _GENERATORS[hc_mult, placement] = Generator(s.model, s.hasher, s.compressor, **placement_kwargs(s.model, placement))
  return _GENERATORS[hc_mult, placement]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_decode_logits_match_full_forward(hc_mult, placement):
  s = setup(hc_mult)
  decoder = decoder_for(hc_mult, placement)
  assert decoder.decode_path == PATHS[placement]
  got = teacher_forced_logits(decoder, s.tokens)
  np.testing.assert_allclose(got, s.full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("placement", ["host", "cached", "host_python"])
def test_host_tables_are_used_and_model_copy_holds_no_table(placement):
  config, model, compressor, hasher, tokens, full = setup(1)
  decoder = decoder_for(1, placement)
  placeholder = decoder.params["blocks"][1]["engram"]["table"][...]
  assert placeholder.shape == (1, config.engram.head_dim)
  # Other host rows give other logits: the rows really come from the host table (and, for
  # "cached", the misses from host memory and the hits from the device cache).
  if placement == "host_python":
    table = decoder.host_tables[1]
    swap = lambda: decoder.host_tables.__setitem__(1, HostTable(table.numpy()[::-1].copy()))
    restore = lambda: decoder.host_tables.__setitem__(1, table)
  else:
    operands = dict(decoder.tables[1])
    assert operands["host"].sharding.memory_kind in ("pinned_host", "unpinned_host")

    def swap():
      flipped = np.asarray(operands["host"])[::-1].copy()
      decoder.tables[1]["host"] = jax.device_put(flipped, operands["host"].sharding)

    restore = lambda: decoder.tables[1].update(operands)
  try:
    swap()
    assert np.abs(teacher_forced_logits(decoder, tokens) - full).max() > 1e-2
    if placement == "cached":  # host table restored, device cache rows zeroed
      restore()
      decoder.tables[1]["hot_rows"] = operands["hot_rows"] * 0
      assert np.abs(teacher_forced_logits(decoder, tokens) - full).max() > 1e-2
  finally:
    restore()
  np.testing.assert_allclose(teacher_forced_logits(decoder, tokens), full, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match=r"host table of Engram layer 1 has \d+ rows, its row index \d+"):
    Decoder(model, hasher, compressor, stores=model_stores(model, {1: HostTable(table_of(model)[:-1])}))


def test_in_loop_decode_is_one_program_reading_host_memory():
  """The host-table decode loop is a single compiled while loop whose table operand lives
  in host memory and whose gather runs on the host (compute_on), with no host callback."""
  s = setup(2)
  gen = generator_for("host")
  dec = gen.decoder
  tokens, lengths = dec.pad_prompts([[1, 2, 3], [4]])
  token, state = dec._prefill_jit(
    dec.params, dec.lut, np.pad(tokens, ((0, 0), (0, 13))), lengths, None, max_len=24, tables=dec.tables
  )
  text = gen._loop.lower(
    dec.params,
    dec.lut,
    token[:, 0].argmax(-1).astype(np.int32),
    state,
    jax.random.key(0),
    dec.tables,
    steps=3,
    sampling=SamplingConfig(greedy=True),
    vocab_limit=dec.vocab_limit,
    eos_id=None,
  ).as_text()
  assert "stablehlo.while" in text
  assert "pinned_host" in text or "unpinned_host" in text
  assert '_xla_compute_type = "host"' in text  # the gather runs on the host (compute_on)
  assert "callback" not in text  # no Python round trip per token
  del s


def test_decode_window_hashing_on_device_equals_host():
  config, _, compressor, hasher, tokens, _ = setup(1)
  n = config.engram.max_ngram_size
  compressed = compressor(tokens)
  expected = hasher.hash(compressed)  # [B, T, H] per layer
  lengths = np.asarray(PROMPT_LENGTHS, np.int32)
  state = EngramDecodeState.after_prompt(jax.numpy.asarray(compressed), lengths, n, hasher.pad_id)

  @jax.jit
  def push_and_hash(state, token):
    ngram, state = state.push(token)
    return {l: r[:, -1] for l, r in hasher.hash_jax(ngram).items()}, state

  rng = np.arange(3)
  for s in range(T - int(lengths.max())):
    pos = lengths + s
    rows, state = push_and_hash(state, compressed[rng, pos])
    for layer, r in rows.items():
      np.testing.assert_array_equal(np.asarray(r), expected[layer][rng, pos])
  # The host (NumPy) window agrees.
  host = EngramDecodeState.after_prompt(compressed, lengths, n, hasher.pad_id)
  assert isinstance(host.window, np.ndarray)
  np.testing.assert_array_equal(
    host.window,
    np.asarray(EngramDecodeState.after_prompt(jax.numpy.asarray(compressed), lengths, n, hasher.pad_id).window),
  )
  # A 1-token prompt: the window is the pad id then the token.
  assert host.window[2].tolist() == [hasher.pad_id, compressed[2, 0]]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_greedy_generate_follows_full_forward_and_stops_at_eos(placement):
  _, model, compressor, hasher, tokens, _ = setup(2)
  prompts = [tokens[i, :n].tolist() for i, n in enumerate(PROMPT_LENGTHS)]
  gen = generator_for(placement)
  greedy = SamplingConfig(greedy=True)
  new = T - max(PROMPT_LENGTHS)
  result = gen(prompts, max_new_tokens=new, sampling=greedy)
  assert [len(t) for t in result.tokens] == [new] * 3
  assert result.decode_steps == new - 1 and result.prompt_tokens == sum(PROMPT_LENGTHS)
  assert gen(prompts, max_new_tokens=new, sampling=greedy).tokens == result.tokens
  # Every generated token is the argmax, over the ids the tokenizer knows, of the full
  # forward over prompt + continuation (right-padded to T: padding never reaches earlier
  # positions).
  seqs = np.zeros((3, T), np.int32)
  for i, (prompt, cont) in enumerate(zip(prompts, result.tokens)):
    seqs[i, : len(prompt) + new] = prompt + cont
  rows = {l: r.astype(np.int32) for l, r in hasher.hash(compressor(seqs)).items()}
  logits = np.asarray(_forward(model, seqs, rows))[..., :KNOWN_IDS]
  for i, (prompt, cont) in enumerate(zip(prompts, result.tokens)):
    np.testing.assert_array_equal(logits[i, len(prompt) - 1 : len(prompt) + new - 1].argmax(-1), cont)
  # Stop at eos: sequence 0's third token as eos cuts it there; the others stop at their
  # first occurrence of it or run to the budget.
  eos = result.tokens[0][2]
  stopped = gen(prompts, max_new_tokens=new, sampling=greedy, eos_id=eos)
  for full_cont, cont in zip(result.tokens, stopped.tokens):
    cut = full_cont.index(eos) + 1 if eos in full_cont else len(full_cont)
    assert cont == full_cont[:cut]
  assert stopped.tokens[0] == result.tokens[0][: result.tokens[0].index(eos) + 1]


@pytest.mark.parametrize("hc_mult", [1, 2])
def test_greedy_tokens_and_host_traffic_equal_across_placements(hc_mult):
  """Batched prompts of different lengths: every placement yields the device-table tokens;
  the host paths report the rows they copied (B*H per step and layer for "host", fewer
  for "cached", whose hits the cache serves)."""
  s = setup(hc_mult)
  prompts = [s.tokens[i, :n].tolist() for i, n in enumerate(PROMPT_LENGTHS)] + [[5, 9, 11, 2]]
  kw = {"max_new_tokens": 9, "sampling": SamplingConfig(greedy=True)}
  results = {p: generator_for(p, hc_mult)(prompts, **kw) for p in PLACEMENTS}
  for p, r in results.items():
    assert r.decode_path == PATHS[p]
    assert r.tokens == results["device"].tokens, p
  per_step = len(prompts) * s.config.engram.num_heads  # one Engram layer
  head_bytes = s.config.engram.head_dim * 4
  for p in ("host", "host_python"):
    assert results[p].host_rows_read == 8 * per_step
    assert results[p].host_bytes_per_token == s.config.engram.num_heads * head_bytes
  cached = results["cached"]
  assert cached.cache_lookups == 8 * per_step and 0 < cached.cache_hits < cached.cache_lookups
  assert cached.host_rows_read < 8 * per_step
  assert results["device"].host_rows_read == 0


def test_sampled_generate_same_on_device_and_host_deterministic_in_vocab():
  prompts = [[i, 2 * i + 1] for i in range(8)]
  # Near-uniform draws: ids the tokenizer does not know (>= 100) would show up if allowed.
  kw = {"max_new_tokens": 8, "sampling": SamplingConfig(temperature=100.0), "seed": 3}
  device = generator_for("device")(prompts, **kw)
  for placement in ("host", "cached", "host_python"):
    assert generator_for(placement)(prompts, **kw).tokens == device.tokens, placement
  assert generator_for("device")(prompts, **kw).tokens == device.tokens
  assert generator_for("device")(prompts, **{**kw, "seed": 4}).tokens != device.tokens
  ids = np.concatenate(device.tokens)
  assert ids.size == 64 and ids.max() < KNOWN_IDS and len(set(ids.tolist())) > 30
  assert device.tokens_per_second > 0 and device.prefill_tokens_per_second > 0


def test_generate_rejects_bad_input():
  config, model, compressor, hasher, _, _ = setup(1)
  gen = generator_for("device", 1)
  bad_calls = [
    (([[1], []],), {}, "prompt 1 is empty"),
    (([],), {}, "prompts is empty"),
    (("hello",), {}, "prompts must be a list"),
    (([[1], "ab"],), {}, "prompt 1 must be a flat list"),
    (([[1, 2.5]],), {}, "prompt 0 must be a flat list of int"),
    (([[1, KNOWN_IDS]],), {}, r"token id 100 outside the vocabulary \[0, 100\)"),
    (([[-1]],), {}, r"token id -1 outside the vocabulary"),
    (([[1]],), {"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
    (([[1]],), {"max_new_tokens": 2.0}, "max_new_tokens must be a positive int, got 2.0"),
    (([[1]],), {"max_new_tokens": True}, "max_new_tokens must be a positive int, got True"),
    (([[1]],), {"eos_id": -1}, "eos_id -1 is outside the vocabulary"),
    (([[1]],), {"eos_id": KNOWN_IDS}, r"eos_id 100 is outside the vocabulary \[0, 100\)"),
    (([[1]],), {"eos_id": 1.0}, "eos_id 1.0 is outside"),
    (([[1]],), {"seed": "a"}, "seed must be an int"),
  ]
  for args, kw, match in bad_calls:
    with pytest.raises(ValueError, match=match):
      gen(*args, **{"max_new_tokens": 2, **kw})
  with pytest.raises(TypeError, match="SamplingConfig"):
    generate(model, hasher, compressor, [[1]], max_new_tokens=1, sampling={"top_k": 5})
  for field, value, match in [
    ("temperature", -1.0, "temperature must be a finite number >= 0"),
    ("temperature", float("inf"), "temperature must be a finite"),
    ("temperature", float("nan"), "temperature must be a finite"),
    ("temperature", True, "temperature"),
    ("top_k", -2, "top_k must be an int >= 0"),
    ("top_k", 1.5, "top_k must be an int >= 0"),
    ("top_p", 0.0, r"top_p must lie in \(0, 1\], got 0.0"),
    ("top_p", 1.5, r"top_p must lie in \(0, 1\], got 1.5"),
    ("top_p", float("nan"), "top_p must lie in"),
    ("greedy", 1, "greedy must be a bool"),
  ]:
    with pytest.raises(ValueError, match=match):
      SamplingConfig(**{field: value})
  # Prompt + new tokens past the generator's max_len; the decoder's cache never overflows.
  capped = Generator(model, hasher, compressor, max_len=8)
  with pytest.raises(
    ValueError,
    match=r"prompt 1 has 5 tokens: with max_new_tokens=4 it "
    r"would reach 9 > max_len=8",
  ):
    capped([[1, 2], [1, 2, 3, 4, 5]], max_new_tokens=4)
  assert len(capped([[1, 2], [1, 2, 3, 4, 5]], max_new_tokens=3).tokens[1]) == 3
  with pytest.raises(ValueError, match="max_len must be None or an int >= 2"):
    Generator(model, hasher, compressor, max_len=0)
  decoder = decoder_for(1, "device")
  _, state = decoder.prefill(np.asarray([[1, 2]]), np.asarray([2]), max_len=3)
  _, state = decoder.step(np.asarray([3]), state)
  with pytest.raises(ValueError, match="sequence 0 fills its cache of 3 slots"):
    decoder.step(np.asarray([3]), state)
  with pytest.raises(ValueError, match=r"token id 120 is outside the vocabulary \[0, 100\)"):
    decoder.step(np.asarray([120]), state)
  with pytest.raises(ValueError, match="NgramHasher and TokenizerCompressor"):
    Decoder(model)
  with pytest.raises(ValueError, match=r"stores has layers \[5\] that are not the model's Engram layers"):
    Decoder(model, hasher, compressor, stores={5: model_stores(model, {1: HostTable(table_of(model))})[1]})
  with pytest.raises(ValueError, match="host_decode must be one of"):
    Decoder(model, hasher, compressor, host_decode="gpu", stores=placement_kwargs(model, "host")["stores"])
  with pytest.raises(ValueError, match="not the model's"):
    Decoder(model, NgramHasher(config.engram.replace(seed=1), 97), compressor)


def test_generate_without_engram():
  config = ModelConfig.tiny("moe", num_layers=2)
  model = Transformer(config, rngs=nnx.Rngs(0))
  prompts = [[5, 6, 7], [9]]
  result = generate(model, None, None, prompts, max_new_tokens=3, sampling=SamplingConfig(greedy=True))
  seqs = np.asarray([prompts[0] + result.tokens[0], prompts[1] + result.tokens[1] + [0, 0]])
  logits = np.asarray(model(seqs)[0])  # right padding never reaches earlier positions
  for i, (prompt, cont) in enumerate(zip(prompts, result.tokens)):
    np.testing.assert_array_equal(logits[i, len(prompt) - 1 : len(prompt) + 2].argmax(-1), cont)
  with pytest.raises(ValueError, match=r"stores has layers \[1\] that are not the model's Engram layers \[\]"):
    Decoder(model, stores={1: None})


def _variant_setup(**overrides):
  """A tiny Engram model with ModelConfig overrides, its hasher and compressor (as `setup`)."""
  config = ModelConfig.tiny("engram_moe", num_layers=2, **overrides)
  model = Transformer(config, rngs=nnx.Rngs(3))
  compressor = TokenizerCompressor(np.arange(KNOWN_IDS) % 97)
  return config, model, compressor, NgramHasher(config.engram, compressor.num_compressed)


@pytest.mark.parametrize("placement", ["host", "cached", "host_python"])
def test_host_decoding_with_row_multiple_matches_device_tables(placement):
  """engram_row_multiple pads the table with rows no id addresses: the host / cached
  decoders take the padded table (the model's own, or as a HostTable) and decode exactly
  as the device-table reference."""
  config, model, compressor, hasher = _variant_setup(engram_row_multiple=64)
  assert model.blocks[1].engram.num_rows > hasher.total_rows(1)  # really padded
  tokens = np.random.default_rng(5).integers(0, KNOWN_IDS, (3, T)).astype(np.int32)
  rows = {l: r.astype(np.int32) for l, r in hasher.hash(compressor(tokens)).items()}
  full = np.asarray(_forward(model, tokens, rows))
  decoder = Decoder(model, hasher, compressor, **placement_kwargs(model, placement))
  np.testing.assert_allclose(teacher_forced_logits(decoder, tokens), full, atol=1e-4, rtol=1e-4)


def test_numpy_decoding_with_fold_rows_matches_device_tables(placement="host_python"):
  """engram_fold_rows: the NumPy decode path maps hashed ids through the layer's `RowIndex`
  (fold, offsets) as the in-loop paths do (tests/test_row_stores.py), so it decodes exactly
  as the device tables."""
  config, model, compressor, hasher = _variant_setup(engram_fold_rows=3)
  tokens = np.random.default_rng(6).integers(0, KNOWN_IDS, (3, T)).astype(np.int32)
  rows = {l: r.astype(np.int32) for l, r in hasher.hash(compressor(tokens)).items()}
  full = np.asarray(_forward(model, tokens, rows))
  decoder = Decoder(model, hasher, compressor, **placement_kwargs(model, placement))
  np.testing.assert_allclose(teacher_forced_logits(decoder, tokens), full, atol=1e-4, rtol=1e-4)
