"""Micro configs: about a minute per model on 2 CPU cores (the CPU-sized experiments).

Variants (``--config=experiments/configs/micro.py:VARIANT``) as in `tiny.py`. All micro runs
share the tokenizer cached in runs/tokenizers/micro, so they see the same validation tokens.
The model: hidden 48, 3 blocks (1 dense + 2 fine-grained MoE blocks: 2 shared + top-4 of 32
routed experts of width 16, so rho can move in steps of ~3.6%), 2 hyper-connection branches,
Engram at block 1 with orders 2-3 (2 heads of width 8 each, d_mem 32).

Seeds: `seed` initialises the model, `data.seed` orders the training documents; the sweeps
set both per replicate, so variants are paired on init and data. Validation: 128k scored
tokens drawn from every validation file (`DataConfig.eval_set="chunks"`), the same for
every model. 256 planted facts (plus 256 held out) for the fact-recall probe.
"""

from experiments.configs import common


def get_config(variant: str = "engram"):
  c = common.base_config(variant)
  c.model.update(
    vocab_size=1024,
    hidden_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    ffn_hidden=192,
    num_dense_layers=1,
    hc_mult=2,
    sinkhorn_iters=5,
  )
  c.moe.update(num_experts=32, num_shared_experts=2, top_k=4, expert_hidden=16)
  c.engram.update(max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=(1,))
  c.allocation.rho = 0.8
  c.data.update(
    seq_len=64,
    batch_size=16,
    bpe_vocab_size=1024,
    tokenizer_train_bytes=2_000_000,
    max_bytes=6_000_000,
    eval_tokens=131_072,
    tokenizer_dir="runs/tokenizers/micro",
    num_facts=256,
    fact_repeats=64,
  )
  # Engram table: init std 0.1 (reference 1.0) and Adam at 20x the lr (library default 5x):
  # the micro pilot in docs/RESULTS.md (paired, -0.064 +/- 0.003 nats against the reference values).
  c.model.engram_table_init_std = 0.1
  c.train.engram_lr_multiplier = 20.0
  c.seed = 0  # model init
  c.data.seed = 0  # training-data order
  c.train.update(
    total_steps=300,
    warmup_steps=30,
    learning_rate=3e-3,
    eval_every=300,
    checkpoint_every=0,
    log_every=25,
    progress_bar=False,
  )
  return c
