"""Planted key -> value facts: a fact-recall probe for conditional memory.

A fact is a tiny document of `KEY_TOKENS` key tokens followed by one value token (the
pipeline appends <eos>), e.g. " width fork rating spec". Keys and values are whole-word
tokens of the tokenizer (a space and 2+ lowercase letters) whose text re-encodes to exactly
those tokens. The last two key tokens, after tokenizer compression, are unique over all
facts, so the value is predictable from the last 2-3 compressed tokens: exactly what an
Engram 2- or 3-gram lookup at the last key token addresses.

`make_facts` returns two disjoint sets from one generator: `trained` facts are mixed into
the training documents (`FactMixedCorpus`, `fact_repeats` copies per epoch), `held_out`
facts never are (the control: the model cannot know their values). The probe
(`experiments/fact_probe.py`) scores the value token of both sets.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from engram_jax.hashing import TokenizerCompressor

KEY_TOKENS = 3
_WORD = re.compile(r" [a-z]{2,}")


@dataclasses.dataclass(frozen=True)
class Fact:
  key: tuple[int, ...]  # token ids of the key
  value: int  # the value token id
  text: str  # the document text (key then value)

  @property
  def ids(self) -> tuple[int, ...]:
    return (*self.key, self.value)


@dataclasses.dataclass(frozen=True)
class FactSet:
  trained: tuple[Fact, ...]
  held_out: tuple[Fact, ...]


def word_tokens(tokenizer) -> list[int]:
  """Ids of the whole-word tokens (" " + 2+ lowercase letters) that encode to themselves."""
  out = []
  for i in sorted(tokenizer.get_vocab(with_added_tokens=False).values()):
    text = tokenizer.decode([i])
    if _WORD.fullmatch(text) and tokenizer.encode(text, add_special_tokens=False).ids == [i]:
      out.append(i)
  return out


def make_facts(
  tokenizer, num_trained: int, num_held_out: int, seed: int = 0, compressor: TokenizerCompressor | None = None
) -> FactSet:
  """`num_trained` + `num_held_out` facts with distinct compressed key suffixes.

  Raises:
    ValueError when the tokenizer has too few word tokens for that many distinct keys.
  """
  total = num_trained + num_held_out
  if total == 0:
    return FactSet((), ())
  compressor = compressor or TokenizerCompressor.from_tokenizer(tokenizer)
  words = np.asarray(word_tokens(tokenizer), np.int64)
  if len(words) < 4:
    raise ValueError(f"the tokenizer has {len(words)} whole-word tokens; facts need at least 4")
  lut = np.asarray(compressor.lookup_table)
  # distinct compressed suffixes available: bounded by (distinct compressed words)^2
  distinct = len(np.unique(lut[words]))
  if distinct * distinct < 2 * total:
    raise ValueError(
      f"{total} facts need distinct compressed (key[-2], key[-1]) pairs, but the "
      f"tokenizer has only {distinct} distinct compressed word tokens; plant "
      "fewer facts (DataConfig.num_facts / held_out_facts)"
    )
  rng = np.random.default_rng(seed)
  facts: list[Fact] = []
  seen: set[tuple[int, int]] = set()
  attempts = 0
  while len(facts) < total:
    attempts += 1
    if attempts > 50 * total + 1000:
      raise ValueError(f"could not draw {total} facts with distinct keys from {len(words)} word tokens")
    ids = [int(t) for t in rng.choice(words, KEY_TOKENS + 1)]
    key, value = tuple(ids[:-1]), ids[-1]
    suffix = (int(lut[key[-2]]), int(lut[key[-1]]))
    if suffix in seen:
      continue
    text = tokenizer.decode(ids)
    if tokenizer.encode(text, add_special_tokens=False).ids != ids:
      continue
    seen.add(suffix)
    facts.append(Fact(key, value, text))
  return FactSet(tuple(facts[:num_trained]), tuple(facts[num_trained:]))


def facts_for(config, tokenizer) -> FactSet:
  """The facts a `DataConfig` plants (num_facts trained, num_held_out_facts held out)."""
  return make_facts(tokenizer, config.num_facts, config.num_held_out_facts, config.fact_seed)


class FactMixedCorpus:
  """A corpus plus `repeats` copies of each planted fact's text, as extra documents
  (indices len(corpus) .. len(corpus) + repeats * len(facts) - 1). Random access, picklable."""

  def __init__(self, corpus, facts: tuple[Fact, ...], repeats: int):
    if repeats < 1:
      raise ValueError(f"fact repeats must be >= 1, got {repeats}")
    self.corpus = corpus
    self.texts = [f.text for f in facts]
    self.repeats = int(repeats)
    self._base = len(corpus)

  def __len__(self) -> int:
    return self._base + self.repeats * len(self.texts)

  def __getitem__(self, index: int) -> str:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} out of range [0, {len(self)})")
    if index < self._base:
      return self.corpus[index]
    return self.texts[(index - self._base) % len(self.texts)]

  def __repr__(self) -> str:
    return f"FactMixedCorpus({self.corpus!r} + {self.repeats} x {len(self.texts)} facts)"
