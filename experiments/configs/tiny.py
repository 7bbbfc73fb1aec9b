"""Tiny configs: a few minutes per model on 2 CPU cores (the default of `make train`).

Variants (``--config=experiments/configs/tiny.py:VARIANT``):
  moe     the MoE backbone: sets the total and active parameter budget.
  engram  Engram + MoE at the same total and active budget (the accounting helper moves
          1 - rho of the sparse parameters from routed experts into Engram slots).
  dense   a dense backbone with the MoE's active FFN width (iso-FLOP, fewer parameters).

The backbone is `common.base_config`'s (hidden 64, 4 blocks, 16 experts top-2 + 1 shared,
Engram at block 1 with orders 2-3, rho 0.8) plus one leading dense block and 2
hyper-connection branches. Seeds: `seed` initialises the model, `data.seed` orders the
training documents (separate settings, both 0; `make train` pairs the two variants on
both). Validation: 128k scored tokens drawn from every validation file, the same for every
model.
"""

from experiments.configs.common import PILOTED_TABLE, derive, update


def get_config(variant: str = "engram"):
  c = derive(variant, PILOTED_TABLE)
  update(c, "model", num_dense_layers=1, hc_mult=2, sinkhorn_iters=10)
  update(c, "data", seq_len=128, batch_size=16, bpe_vocab_size=2048, eval_tokens=131_072)
  update(c, "data", tokenizer_train_bytes=3_000_000, max_bytes=12_000_000, tokenizer_dir="runs/tokenizers/tiny")
  update(c, "train", total_steps=300, warmup_steps=30, learning_rate=3e-3)
  return update(c, "train", eval_every=100, checkpoint_every=100, log_every=10)
