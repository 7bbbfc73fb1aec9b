"""EngramConfig validation names the problem."""

import pytest

from engram_jax import EngramConfig


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(vocab_sizes=(100,), max_ngram_size=3), "needs one per order"),
    (dict(max_ngram_size=1, vocab_sizes=()), "max_ngram_size must be an int >= 2"),
    (dict(vocab_sizes=(100, 1)), r"vocab_sizes\[1\] \(order 3\) must be >= 2"),
    (dict(n_embed_per_ngram=30, n_head_per_ngram=8), "multiple of n_head_per_ngram"),
    (dict(n_head_per_ngram=0), r"n_head_per_ngram must be an int >= 1, got 0"),
    (dict(layer_ids=(2, 2)), "must be unique"),
    (dict(layer_ids=(0, 3)), "allow_layer_zero"),
    (dict(layer_ids=()), "empty"),
    (dict(layer_ids=(-1,)), ">= 0"),
    (dict(pad_id=-1), "pad_id"),
    (dict(kernel_size=0), "kernel_size"),
  ],
)
def test_invalid_configs_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    EngramConfig(**kwargs)


def test_derived_sizes_and_dict_roundtrip():
  cfg = EngramConfig(
    vocab_sizes=[1000, 2000],
    max_ngram_size=3,
    n_embed_per_ngram=64,
    n_head_per_ngram=4,
    layer_ids=[0, 2],
    allow_layer_zero=True,
  )
  assert cfg.layer_ids == (0, 2) and cfg.vocab_sizes == (1000, 2000)
  assert (cfg.num_heads, cfg.head_dim, cfg.memory_dim) == (8, 16, 128)
  assert EngramConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown fields"):
    EngramConfig.from_dict({**cfg.to_dict(), "bogus": 1})
  assert hash(cfg) == hash(EngramConfig.from_dict(cfg.to_dict()))


def test_every_config_from_dict_names_unknown_fields():
  from engram_jax.data import DataConfig
  from engram_jax.models import ModelConfig
  from engram_jax.train import TrainConfig

  for cls, cfg in (
    (ModelConfig, ModelConfig.tiny("engram_moe")),
    (TrainConfig, TrainConfig()),
    (DataConfig, DataConfig()),
  ):
    assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=rf"{cls.__name__}.from_dict: unknown fields \['bogus'\]"):
      cls.from_dict({**cfg.to_dict(), "bogus": 1})
