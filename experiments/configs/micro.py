"""Micro configs: about a minute per model on 2 CPU cores (the CPU-sized experiments).

Variants (``--config=experiments/configs/micro.py:VARIANT``) as in `tiny.py`. All micro runs
share the tokenizer cached in runs/tokenizers/micro, so they see the same validation tokens.
The model: hidden 48, 3 blocks (1 dense + 2 fine-grained MoE blocks: 2 shared + top-4 of 32
routed experts of width 16, so rho can move in steps of ~3.6%), 2 hyper-connection branches,
Engram at block 1 with orders 2-3 (2 heads of width 8 each, d_mem 32).

Seeds and validation tokens as in `tiny.py`; the sweeps set both seeds per replicate, so
variants are paired on init and data. 256 planted facts (plus 256 held out) for the
fact-recall probe.
"""

from experiments.configs.common import PILOTED_TABLE, derive, update


def get_config(variant: str = "engram"):
  c = derive(variant, PILOTED_TABLE)
  update(c, "model", vocab_size=1024, hidden_size=48, num_layers=3, head_dim=12, ffn_hidden=192)
  update(c, "model", num_dense_layers=1, hc_mult=2, sinkhorn_iters=5)
  update(c, "moe", num_experts=32, num_shared_experts=2, top_k=4, expert_hidden=16)
  update(c, "engram", n_embed_per_ngram=16)
  update(c, "data", seq_len=64, batch_size=16, bpe_vocab_size=1024, eval_tokens=131_072, num_facts=256)
  update(c, "data", fact_repeats=64, tokenizer_train_bytes=2_000_000, max_bytes=6_000_000)
  update(c, "data", tokenizer_dir="runs/tokenizers/micro")
  update(c, "train", total_steps=300, warmup_steps=30, learning_rate=3e-3, progress_bar=False)
  return update(c, "train", eval_every=300, checkpoint_every=0, log_every=25)
