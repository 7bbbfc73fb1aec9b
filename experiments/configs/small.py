"""Small configs for one GPU (about 100M total parameters; minutes to an hour on an H200).

Same variants as `tiny.py`. The backbone follows the paper's shape at small scale: one
leading dense block, DeepSeek-V3 MoE (2 shared + top-6 routed), 4 hyper-connection
branches, Engram at blocks 1 and 5 with orders 2-3; tables split evenly over up to 1024
tensor shards (`engram_row_multiple`) and the reference table init std (not piloted at this
scale). Engram's value/key projections (d_mem x D x (1 + G) per layer) add ~6% active
parameters at this width: the MoE twin is matched on total parameters and within 8% on
active ones (`allocation.active_rtol`).
"""

from experiments.configs.common import derive, update


def get_config(variant: str = "engram"):
  c = derive(variant)
  update(c, "model", vocab_size=16384, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64)
  update(c, "model", ffn_hidden=2048, num_dense_layers=1, hc_mult=4, dtype="bfloat16")
  update(c, "model", engram_row_multiple=1024, engram_table_init_std=1.0)
  update(c, "moe", num_experts=48, num_shared_experts=2, top_k=6, expert_hidden=256)
  update(c, "engram", n_embed_per_ngram=256, n_head_per_ngram=8, layer_ids=(1, 5))
  update(c, "allocation", active_rtol=0.08)
  update(c, "data", seq_len=1024, batch_size=32, bpe_vocab_size=16384, num_workers=4, eval_tokens=1_048_576)
  update(c, "data", tokenizer_dir="runs/tokenizers/small", tokenizer_train_bytes=30_000_000)
  update(c, "train", total_steps=5000, warmup_steps=200, learning_rate=1e-3)
  return update(c, "train", eval_every=500, checkpoint_every=500, log_every=50)
