"""Analytic parameter / FLOP accounting against real models and hand arithmetic; the solver."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from engram_jax.models.accounting import allocate, count_params, flops_per_token
from engram_jax.models.config import ModelConfig
from engram_jax.models.transformer import Transformer


def _real_param_count(config):
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("family", ["dense", "moe", "engram_moe", "engram_dense"])
@pytest.mark.parametrize("hc_mult", [1, 4])
@pytest.mark.parametrize("tie", [False, True])
def test_count_equals_real_parameters(family, hc_mult, tie):
  config = ModelConfig.tiny(family, hc_mult=hc_mult, tie_embeddings=tie)
  assert count_params(config).total == _real_param_count(config)


# The tiny Engram+MoE model, by hand: V=128, D=32, L=3 blocks (block 0 dense, 1-2 MoE),
# H=4, Hkv=2, hd=8, F=64; MoE E=8, S=1, k=2, Fe=16; Engram at block 1, N=3, K=2,
# n_embed=16 -> d_h=8, 4 heads, d_mem=32, conv taps 4, G=1; untied head.
#   embedding 128*32 = 4096, head 4096, final norm 32
#   attention per block 32*4*8 (q) + 32*4*8 (o) + 2*32*2*8 (k, v) = 3072, x3 = 9216
#   block norms 2*32 x3 = 192; dense FFN (block 0) 3*32*64 = 6144
#   per MoE block: router 32*8 = 256, routed 3*8*32*16 = 12288, shared 3*32*16 = 1536
#   Engram non-table: value 32*32+32 = 1056, key 32*32+32 = 1056, norms 3*32 = 96,
#     conv 4*32 = 128 -> 2336; table: primes for nominal (61, 53) walked order 2 then 3:
#     order 2 from 60: 61, 67; order 3 from 52: 53, 59 -> 240 rows * 8 = 1920
HAND_ENGRAM_MOE = {
  "embedding": 4096,
  "head": 4096,
  "attention": 9216,
  "dense_ffn": 6144,
  "router": 512,
  "shared_experts": 3072,
  "routed_experts": 24576,
  "engram_other": 2336,
  "engram_table": 1920,
}


def test_hand_computed_counts():
  c = count_params(ModelConfig.tiny("engram_moe"))
  for key, value in HAND_ENGRAM_MOE.items():
    assert c.breakdown[key] == value, key
  assert c.breakdown["norms"] == 32 + 192
  # total: 4096+4096+224+9216+6144+512+3072+24576+2336+1920 = 56192
  assert c.total == 56192
  # active: head 4096 + norms 224 + attention 9216 + dense 6144 + 2*(256+1536) routers and
  # shared + 2*2*1536 top-2 routed + 2336 Engram non-table + 32 looked-up table params
  #   = 4096+224+9216+6144+3584+6144+2336+32 = 31776
  assert c.active == 31776
  # sparse: routed inactive 2*6*1536 = 18432 + table inactive 1920-32 = 1888 -> 20320
  assert c.sparse == 20320
  assert c.rho == pytest.approx(18432 / 20320)


def test_flops_per_token_by_hand():
  config = ModelConfig.tiny("dense")
  # matmul params: head 4096 + attention 9216 + dense FFN 3 blocks * 6144 = 31744
  # attention scores: 4 * L=3 * T=16 * H=4 * hd=8 = 6144
  assert flops_per_token(config, 16) == 2 * 31744 + 6144
  assert count_params(config).active == 31744 + 32 + 192  # plus norm scales
  with pytest.raises(ValueError, match="seq_len"):
    flops_per_token(config, 0)


# Allocation cases, by hand, on the tiny Engram+MoE base (numbers from the case above):
#   P0 = params with E = top_k = 2 and no Engram
#      = 4096+4096+224+9216+6144 + 2*(router 64 + routed 3072 + shared 1536) = 33120
#   w = 3*D*Fe*L_moe = 3*32*16*2 = 3072 (routed params per expert), r = D*L_moe = 64 (router)
#   Engram non-table params Pe = 2336, looked-up table params a = d_mem = 32
BASE = ModelConfig.tiny("engram_moe")


def test_allocate_rho_one_is_pure_moe():
  # total 77024 = P0 + 14*(w + r) = 33120 + 14*3136 -> E = 2 + 14 = 16, no Engram.
  # active: 4096+224+9216+6144 + 2*(32*16 + 1536 + 3072) = 29920
  a = allocate(BASE, 77024, 29920, 1.0)
  assert a.num_experts == 16 and a.slots_per_head == 0
  assert a.config.engram is None and a.config.moe.num_experts == 16
  assert a.counts.total == 77024 and a.counts.active == 29920 and a.counts.rho == 1.0


def test_allocate_half_to_engram():
  # budget B = total - P0 - Pe = 72736 - 33120 - 2336 = 37280
  # E = 2 + rho (B - a) / (w + rho r) = 2 + 0.5 * 37248 / (3072 + 32) = 2 + 6 = 8
  # table params = B - 6*(w + r) = 37280 - 18816 = 18464 -> 18464 / (d_h 8 * 4 heads) = 577
  # check: routed inactive 6*3072 = 18432 = table inactive 18464 - 32, so rho = 0.5.
  a = allocate(BASE, 72736, 31776, 0.5)
  assert a.num_experts == 8 and a.slots_per_head == 577
  assert a.config.engram.vocab_sizes == (577, 577)
  # Real head sizes are distinct primes from 577 up: 577, 587 (order 2), 593, 599
  # (order 3): 48 rows above nominal, 48*8 = 384 params more than the target.
  assert a.counts.total == 72736 + 384
  assert a.counts.active == 31776
  assert a.counts.rho == pytest.approx(18432 / (18432 + 18464 + 384 - 32))
  assert a.counts.total == _real_param_count(a.config)


def test_allocate_all_to_engram_and_errors():
  a = allocate(BASE, 72736, 31776, 0.0)
  assert a.num_experts == 2 and a.counts.rho == 0.0
  # table params = 37280 -> 37280 / 32 = 1165 slots per head
  assert a.slots_per_head == 1165
  with pytest.raises(ValueError, match="below the smallest model"):
    allocate(BASE, 30000, 31776, 0.5)
  with pytest.raises(ValueError, match="active budget"):
    allocate(BASE, 72736, 20000, 0.5)
  with pytest.raises(ValueError, match="rho"):
    allocate(BASE, 72736, 31776, 1.5)
  with pytest.raises(ValueError, match="engram is None"):
    allocate(ModelConfig.tiny("moe"), 72736, 31776, 0.5)
  with pytest.raises(ValueError, match="slots per Engram head"):
    allocate(BASE, 33120 + 2336 + 40, 31776, 0.5)
  with pytest.raises(ValueError, match="MoE"):
    allocate(ModelConfig.tiny("dense"), 72736, 31776, 1.0)


def test_counts_scale_like_the_paper_setup():
  # An Engram-27B-like layout: orders {2,3}, 8 heads per order, d_mem 1280 -> 5.7B table
  # params from 2,262,400 nominal rows per head at two layers (ENGRAM_SPEC §5).
  engram = dataclasses.replace(
    BASE.engram,
    vocab_sizes=(2_262_400, 2_262_400),
    n_embed_per_ngram=640,
    n_head_per_ngram=8,
    layer_ids=(2, 15),
  )
  config = BASE.replace(num_layers=30, hidden_size=2560, engram=engram)
  table = count_params(config).engram_table_total
  assert 5.7e9 <= table <= 5.8e9


@pytest.mark.parametrize("hc_mult", [1, 2])
@pytest.mark.parametrize(
  "options",
  [
    {"engram_gate": "none"},
    {"engram_short_conv": False},
    {"engram_multi_branch": False},
    {"engram_fold_rows": 1},
    {"engram_mode": "input_average"},
    {"engram_row_multiple": 64},
    {"engram_gate": "none", "engram_short_conv": False, "engram_multi_branch": False},
  ],
)
def test_ablation_options_are_counted_exactly(hc_mult, options):
  from engram_jax.train.state import build_model

  cfg = ModelConfig.tiny("engram_moe", hc_mult=hc_mult, **options)
  abstract = nnx.eval_shape(lambda: build_model(cfg, 0))
  real = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count_params(cfg).total == real
