"""Generation: KV-cached decoding with Engram reproduces the full forward at every position
(device hashing and host tables, hc_mult 1 and 2, prompts of different lengths), device
hashing of the decode window equals host hashing, and generate() is greedy-consistent,
deterministic and stops at eos."""

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
from engram_jax.models.transformer import Transformer
from engram_jax.offload import HostTable

T = 12                        # tokens per sequence
PROMPT_LENGTHS = (3, 7, 1)    # prefilled together (right-padded to 7)
KNOWN_IDS = 100
_SETUPS = {}


class Setup(NamedTuple):
  config: ModelConfig
  model: Transformer
  compressor: TokenizerCompressor
  hasher: NgramHasher
  tokens: np.ndarray      # int32 [3, T] in [0, KNOWN_IDS)
  full: np.ndarray        # full-forward logits [3, T, V]


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
  logits, state = decoder.prefill(prompts, lengths, max_len=t + 4)
  got = np.full(tokens.shape + (logits.shape[-1],), np.nan, np.float32)
  for i in range(b):
    got[i, :lengths[i]] = np.asarray(logits[i, :lengths[i]])
  for s in range(t - int(lengths.min())):
    pos = lengths + s                                  # each sequence's own next position
    feed = tokens[np.arange(b), np.minimum(pos, t - 1)]
    step_logits, state = decoder.step(feed, state)
    for i in range(b):
      if pos[i] < t:
        got[i, pos[i]] = np.asarray(step_logits[i])
  np.testing.assert_array_equal(np.asarray(state.lengths), lengths + t - lengths.min())
  return got


_DECODERS, _GENERATORS = {}, {}


def decoder_for(hc_mult, placement):
  """One Decoder per setup (its jitted functions compile once); host ones read explicit
  HostTables so tests can swap them."""
  if (hc_mult, placement) not in _DECODERS:
    s = setup(hc_mult)
    tables = None
    if placement == "host":
      tables = {1: HostTable(np.asarray(s.model.blocks[1].engram.table[...]))}
    _DECODERS[hc_mult, placement] = Decoder(s.model, s.hasher, s.compressor,
                                            table_placement=placement, host_tables=tables)
  return _DECODERS[hc_mult, placement]


def generator_for(placement):
  if placement not in _GENERATORS:
    s = setup(2)
    _GENERATORS[placement] = Generator(s.model, s.hasher, s.compressor,
                                       table_placement=placement)
  return _GENERATORS[placement]


@pytest.mark.parametrize("placement", ["device", "host"])
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_decode_logits_match_full_forward(hc_mult, placement):
  s = setup(hc_mult)
  got = teacher_forced_logits(decoder_for(hc_mult, placement), s.tokens)
  np.testing.assert_allclose(got, s.full, atol=1e-4, rtol=1e-4)


def test_host_tables_are_used_and_model_copy_holds_no_table():
  config, model, compressor, hasher, tokens, full = setup(1)
  decoder = decoder_for(1, "host")
  placeholder = decoder.params["blocks"][1]["engram"]["table"][...]
  assert placeholder.shape == (1, config.engram.head_dim)
  # Other host rows give other logits: the rows really come from the host table.
  table = decoder.host_tables[1]
  try:
    decoder.host_tables[1] = HostTable(table.numpy()[::-1].copy())
    assert np.abs(teacher_forced_logits(decoder, tokens) - full).max() > 1e-2
  finally:
    decoder.host_tables[1] = table
  np.testing.assert_allclose(teacher_forced_logits(decoder, tokens), full, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="host table of layer 1 has shape"):
    Decoder(model, hasher, compressor, table_placement="host",
            host_tables={1: HostTable(table.numpy()[:-1])})


def test_decode_window_hashing_on_device_equals_host():
  config, _, compressor, hasher, tokens, _ = setup(1)
  n = config.engram.max_ngram_size
  compressed = compressor(tokens)
  expected = hasher.hash(compressed)                    # [B, T, H] per layer
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
      host.window, np.asarray(EngramDecodeState.after_prompt(
          jax.numpy.asarray(compressed), lengths, n, hasher.pad_id).window))
  # A 1-token prompt: the window is the pad id then the token.
  assert host.window[2].tolist() == [hasher.pad_id, compressed[2, 0]]


@pytest.mark.parametrize("placement", ["device", "host"])
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
    seqs[i, :len(prompt) + new] = prompt + cont
  rows = {l: r.astype(np.int32) for l, r in hasher.hash(compressor(seqs)).items()}
  logits = np.asarray(_forward(model, seqs, rows))[..., :KNOWN_IDS]
  for i, (prompt, cont) in enumerate(zip(prompts, result.tokens)):
    np.testing.assert_array_equal(logits[i, len(prompt) - 1:len(prompt) + new - 1].argmax(-1), cont)
  # Stop at eos: sequence 0's third token as eos cuts it there; the others stop at their
  # first occurrence of it or run to the budget.
  eos = result.tokens[0][2]
  stopped = gen(prompts, max_new_tokens=new, sampling=greedy, eos_id=eos)
  for full_cont, cont in zip(result.tokens, stopped.tokens):
    cut = full_cont.index(eos) + 1 if eos in full_cont else len(full_cont)
    assert cont == full_cont[:cut]
  assert stopped.tokens[0] == result.tokens[0][:result.tokens[0].index(eos) + 1]


def test_sampled_generate_same_on_device_and_host_deterministic_in_vocab():
  prompts = [[i, 2 * i + 1] for i in range(8)]
  # Near-uniform draws: ids the tokenizer does not know (>= 100) would show up if allowed.
  kw = {"max_new_tokens": 8, "sampling": SamplingConfig(temperature=100.0), "seed": 3}
  device = generator_for("device")(prompts, **kw)
  host = generator_for("host")(prompts, **kw)
  assert device.tokens == host.tokens
  assert generator_for("device")(prompts, **kw).tokens == device.tokens
  assert generator_for("device")(prompts, **{**kw, "seed": 4}).tokens != device.tokens
  ids = np.concatenate(device.tokens)
  assert ids.size == 64 and ids.max() < KNOWN_IDS and len(set(ids.tolist())) > 30
  assert device.tokens_per_second > 0 and device.prefill_tokens_per_second > 0


def test_generate_rejects_bad_input():
  config, model, compressor, hasher, _, _ = setup(1)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(model, hasher, compressor, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"token id 100 outside the vocabulary \[0, 100\)"):
    generate(model, hasher, compressor, [[1, KNOWN_IDS]], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, hasher, compressor, [[1]], max_new_tokens=0)
  with pytest.raises(TypeError, match="SamplingConfig"):
    generate(model, hasher, compressor, [[1]], max_new_tokens=1, sampling={"top_k": 5})
  with pytest.raises(ValueError, match="eos_id"):
    generate(model, hasher, compressor, [[1]], max_new_tokens=2, eos_id=-1)
  with pytest.raises(ValueError, match="NgramHasher and TokenizerCompressor"):
    Decoder(model)
  with pytest.raises(ValueError, match="table_placement"):
    Decoder(model, hasher, compressor, table_placement="disk")
  with pytest.raises(ValueError, match="not the model's"):
    Decoder(model, NgramHasher(config.engram.replace(seed=1), 97), compressor)


def test_generate_without_engram():
  config = ModelConfig.tiny("moe", num_layers=2)
  model = Transformer(config, rngs=nnx.Rngs(0))
  prompts = [[5, 6, 7], [9]]
  result = generate(model, None, None, prompts, max_new_tokens=3,
                    sampling=SamplingConfig(greedy=True))
  seqs = np.asarray([prompts[0] + result.tokens[0], prompts[1] + result.tokens[1] + [0, 0]])
  logits = np.asarray(model(seqs)[0])       # right padding never reaches earlier positions
  for i, (prompt, cont) in enumerate(zip(prompts, result.tokens)):
    np.testing.assert_array_equal(logits[i, len(prompt) - 1:len(prompt) + 2].argmax(-1), cont)
  with pytest.raises(ValueError, match="needs a model with Engram"):
    Decoder(model, table_placement="host")
