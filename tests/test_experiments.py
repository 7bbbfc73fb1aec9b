"""Smoke tests of the paper-reproduction experiments and of the model options they use.

The option tests check behaviour on a tiny model; the experiment tests check that every
script's runs build valid configs and that one experiment runs end to end (a few steps)
and resumes from its saved results.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax.hashing import layer_table_sizes
from engram_jax.layers.engram import Engram
from engram_jax.models.config import ModelConfig
from engram_jax.models.transformer import Transformer
from engram_jax.train import TrainConfig
from engram_jax.train.optimizer import ENGRAM_TABLE, make_optimizer, parameter_labels
from experiments import (
  ablations,
  allocation_sweep,
  controls,
  fact_probe,
  memory_scaling,
  run_all,
  sweep_lib,
)
from experiments.configs import micro

B, T = 2, 12


def _engram(**kw) -> Engram:
  cfg = ModelConfig.tiny("engram_moe").engram
  with nnx.use_eager_sharding(False):
    return Engram(cfg, 1, 32, 2, table_sizes=layer_table_sizes(cfg)[1], rngs=nnx.Rngs(0), **kw)


def _inputs(module: Engram, seed: int = 0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, module.hc_mult, module.hidden_size)), jnp.float32)
  rows = jnp.asarray(np.stack([rng.integers(0, s, (B, T)) for s in module.table_sizes], -1), jnp.int32)
  return hidden, rows


# ------------------------------------------------------------------------ model options
def test_gate_none_is_all_ones_and_has_no_key_projection():
  m = _engram(gate="none")
  hidden, rows = _inputs(m)
  y, alpha = m(hidden, rows, return_gates=True)
  np.testing.assert_array_equal(np.asarray(alpha), 1.0)
  assert not hasattr(m, "key_kernel")
  value = m.lookup(rows) @ m.value_kernel[...] + m.value_bias[...]
  np.testing.assert_allclose(
    np.asarray(y), np.asarray(jnp.broadcast_to(value[:, :, None], y.shape)), rtol=1e-5, atol=1e-5
  )  # conv is zero-initialized: Y = u = v


def test_no_short_conv_ignores_the_conv():
  full, plain = _engram(), _engram(short_conv=False)
  full.conv_kernel[...] = jnp.full(full.conv_kernel.shape, 0.5)
  hidden, rows = _inputs(full)
  y_full, alpha = full(hidden, rows, return_gates=True)
  y_plain = plain(hidden, rows)
  u = alpha[..., None] * (full.lookup(rows) @ full.value_kernel[...] + full.value_bias[...])[:, :, None]
  np.testing.assert_allclose(np.asarray(y_plain), np.asarray(u), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(y_full), np.asarray(y_plain))
  assert not hasattr(plain, "conv_kernel")


def test_single_branch_shares_one_output_across_streams():
  m = _engram(multi_branch=False)
  assert m.key_kernel.shape[0] == 1 and m.conv_kernel.shape[1] == 1
  m.conv_kernel[...] = jnp.full(m.conv_kernel.shape, 0.3)
  hidden, rows = _inputs(m)
  y = m(hidden, rows)
  np.testing.assert_array_equal(np.asarray(y[:, :, 0]), np.asarray(y[:, :, 1]))
  # the gate depends on the mean stream only
  swapped = hidden[:, :, ::-1]
  np.testing.assert_allclose(np.asarray(m(swapped, rows)), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert m.init_conv_state(B).shape[2] == 1


def test_fold_rows_one_slot_per_head_forgets_the_ngram():
  m = _engram(fold_rows=1)
  assert m.table.shape[0] == m.config.num_heads
  hidden, rows = _inputs(m)
  _, other = _inputs(m, seed=1)
  np.testing.assert_allclose(np.asarray(m(hidden, rows)), np.asarray(m(hidden, other)), rtol=1e-6)
  full = _engram()
  assert not np.allclose(np.asarray(full(hidden, rows)), np.asarray(full(hidden, other)))
  with pytest.raises(ValueError, match="fold_rows"):
    _engram(fold_rows=0)


def test_input_average_mode_adds_ngrams_to_the_input_only():
  cfg = ModelConfig.tiny("engram_moe", engram_mode="input_average")
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
  assert all(b.engram is None for b in model.blocks)
  sizes = layer_table_sizes(cfg.engram)[1]
  assert model.input_ngrams[0].table.shape == (sum(sizes), cfg.engram.head_dim)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  rows = lambda s: {
    1: jnp.asarray(np.stack([np.random.default_rng(s).integers(0, p, (B, T)) for p in sizes], -1), jnp.int32)
  }
  forward = nnx.jit(lambda m, r: m(tokens, r)[0])  # one compile instead of eager ops
  a, b = forward(model, rows(1)), forward(model, rows(2))
  assert np.isfinite(np.asarray(a)).all() and not np.allclose(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="input_average"):
    model(tokens)
  with pytest.raises(ValueError, match="engram_mode"):
    ModelConfig.tiny("engram_moe", engram_mode="average")


def test_freeze_engram_tables_keeps_the_random_init():
  cfg = ModelConfig.tiny("engram_moe")
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  labels = jax.tree.leaves(parameter_labels(params))
  tx, _ = make_optimizer(TrainConfig(freeze_engram_tables=True, warmup_steps=0), params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(lambda p, g: tx.update(g, tx.init(p), p))(params, grads)
  for label, u in zip(labels, jax.tree.leaves(updates)):
    if label == ENGRAM_TABLE:
      assert float(jnp.abs(u).max()) == 0.0
    else:
      assert float(jnp.abs(u).max()) > 0.0
  assert ENGRAM_TABLE in labels
  assert optax.global_norm(updates) > 0


# ------------------------------------------------------------------------ experiments
def test_every_experiment_builds_valid_configs():
  c = sweep_lib.with_overrides(micro.get_config(), steps=10)
  args = run_all.plan(c, secondary_rhos=[1.0, 0.6])
  vs = run_all.ordered_variants(c, args)
  keys = [v.key() for v in vs]
  assert len(keys) == len(set(keys))
  names = {v.name for v in vs}
  # shared runs appear once: the full model of the ablations is the sweep's rho = 0.8 run
  assert "abl-full-h48-s0" not in names and "alloc-h48-rho0.80-s0" in names
  sweep = allocation_sweep.variants(c, [1.0, 0.8, 0.4], [1.0, 1.5], [0, 1])
  assert len(sweep) == 3 * 3
  moe, engram = sweep[0].model, sweep[1].model
  assert moe.engram is None and engram.engram is not None
  assert engram.moe.num_experts < moe.moe.num_experts
  assert {v.model.hidden_size for v in sweep} == {48, 72}
  abl = {v.info["ablation"]: v for v in ablations.variants(c, list(ablations.ABLATIONS), [0])}
  assert not abl["no_multi_branch"].model.engram_multi_branch
  assert abl["no_gate"].model.engram_gate == "none"
  assert not abl["no_short_conv"].model.engram_short_conv
  assert not abl["no_compression"].config.engram.compress_tokens
  assert abl["add_4gram"].model.engram.max_ngram_size == 4
  ctl = {w: controls.variant(c, w, 0) for w in controls.CONTROLS}
  assert ctl["one_slot_per_head"].model.engram_fold_rows == 1
  assert ctl["frozen_random_table"].config.train.freeze_engram_tables
  mem = memory_scaling.variants(c, [256, 4096], [256], 0)
  assert [v.info["mode"] for v in mem] == ["none", "engram", "engram", "input_average"]
  assert mem[1].model.moe.num_experts == mem[0].model.moe.num_experts  # backbone fixed
  with pytest.raises(ValueError, match="unknown ablation"):
    ablations.variant(c, "no_table", 0)


def _smoke_config(tmp_path):
  c = micro.get_config()
  c.model.update(hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, ffn_hidden=32, vocab_size=512, num_layers=2)
  c.moe.update(num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=8)
  c.engram.update(n_embed_per_ngram=8, n_head_per_ngram=2)
  c.allocation.active_rtol = 0.5
  c.data.update(
    seq_len=16,
    batch_size=8,
    bpe_vocab_size=512,
    tokenizer_train_bytes=100_000,
    max_bytes=200_000,
    num_eval_batches=1,
    tokenizer_dir=str(tmp_path / "tok"),
    num_facts=6,
    held_out_facts=6,
    fact_repeats=4,
  )
  return c


@pytest.mark.e2e
def test_memory_scaling_runs_end_to_end_and_resumes(tmp_path):
  c = _smoke_config(tmp_path)
  work = tmp_path / "exp"
  out = memory_scaling.run(c, str(work), [4], [4], 0, steps=2)
  rows = out["rows"]
  assert [r["mode"] for r in rows] == ["none", "engram", "input_average"]
  assert all(np.isfinite(r["val_loss"]) and r["steps"] == 2 for r in rows)
  # equal slots: the baseline holds exactly Engram's table rows, without Engram's blocks
  assert rows[1]["params_engram_table"] == rows[2]["params_engram_table"] > 0
  assert rows[0]["params_engram_table"] == 0
  saved = json.loads((work / "memory_scaling" / "results.json").read_text())
  assert len(saved["rows"]) == 3 and (work / "memory_scaling" / "memory_scaling.png").is_file()
  assert saved["meta"]["missing_runs"] == []
  # every run is scored on the same sequences: paired differences against the MoE alone
  paired = {tuple(p["group"]): p for p in saved["meta"]["paired"]}
  assert set(paired) == {("none", 0), ("engram", 4), ("input_average", 4)}
  assert paired[("none", 0)]["diff_mean"] == 0.0 and paired[("none", 0)]["is_reference"]
  d = paired[("engram", 4)]["per_seed"][0]
  assert d["diff"] == pytest.approx(rows[1]["val_loss"] - rows[0]["val_loss"], abs=1e-9)
  assert 0 < d["se_tokens"] < rows[1]["val_loss_se"] + rows[0]["val_loss_se"]
  # the fact probe ran on every run: seen and held-out facts scored
  assert all(r["fact_probe"]["num_seen"] == 6 and np.isfinite(r["fact_probe"]["unseen_ce"]) for r in rows)
  # the CLI's path (a saved run) gives the in-memory figures
  saved_probe = fact_probe.probe_checkpoint(rows[1]["run_dir"])
  assert saved_probe["seen_ce"] == pytest.approx(rows[1]["fact_probe"]["seen_ce"], rel=1e-5)
  assert saved_probe["unseen_ce"] == pytest.approx(rows[1]["fact_probe"]["unseen_ce"], rel=1e-5)
  again = memory_scaling.run(c, str(work), [4], [4], 0, steps=2)
  assert all(r["reused"] for r in again["rows"])
  assert [r["val_loss"] for r in again["rows"]] == [r["val_loss"] for r in rows]


def test_run_keys_ignore_later_options_at_their_defaults():
  # Recorded runs stay valid when an option is added later: at its default it leaves the key
  # unchanged; any other value makes a new run.
  c = micro.get_config()
  variant = ablations.variants(c, [], [0])[0]
  base = variant.key()
  for block, fields in sweep_lib.KEY_NEUTRAL_DEFAULTS.items():
    if block != "model":
      continue
    for name, default in fields.items():
      same = dataclasses.replace(variant, model=variant.model.replace(**{name: default}))
      assert same.key() == base, name
  other = dataclasses.replace(variant, model=variant.model.replace(engram_sharded_lookup="xla"))
  assert other.key() != base
