"""experiments/generate.py refuses bad flag values with an error naming the flag, and the
serving benchmark (experiments/bench/serve.py) runs end to end on a micro preset, its
greedy tokens identical across device, host and cached tables."""

import dataclasses

import pytest
from absl import app

from experiments import generate as generate_cli
from experiments.bench import serve

GOOD = dict(max_new_tokens=4, temperature=0.8, top_k=0, top_p=1.0, repeat=1, prompts=["def main("])


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("max_new_tokens", 0, "--max_new_tokens must be >= 1, got 0"),
    ("temperature", -0.5, "--temperature must be a finite number >= 0, got -0.5"),
    ("temperature", float("inf"), "--temperature must be a finite"),
    ("top_k", -1, "--top_k must be >= 0"),
    ("top_p", 0.0, r"--top_p must lie in \(0, 1\], got 0.0"),
    ("top_p", 1.01, r"--top_p must lie in \(0, 1\], got 1.01"),
    ("repeat", 0, "--repeat must be >= 1"),
    ("prompts", ["ok", ""], "--prompt number 1 is empty"),
  ],
)
def test_generate_cli_rejects_bad_flags(field, value, match):
  generate_cli.check_generation_flags(**GOOD)  # the good values pass
  with pytest.raises(app.UsageError, match=match):
    generate_cli.check_generation_flags(**{**GOOD, field: value})


def test_serve_benchmark_micro_preset_runs_with_identical_tokens(capsys):
  cpu = serve.PRESETS["cpu"]
  micro = dataclasses.replace(
    cpu,
    num_sequences=3,
    prompt_min=2,
    prompt_max=9,
    new_tokens=4,
    repeats=2,
    backbone=dict(
      vocab_size=64,
      hidden_size=32,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
      ffn_hidden=64,
      num_dense_layers=1,
    ),
    engram=dataclasses.replace(cpu.engram, vocab_sizes=(101, 103), layer_ids=(1,)),
  )
  summary = serve.serve_one(micro, "moe", "cpu")  # raises SystemExit if tokens differ
  assert set(summary) == {"device", "host", "cached"}
  out = capsys.readouterr().out
  assert "host_in_loop" in out and "cached_in_loop" in out and "goal (cpu)" in out
