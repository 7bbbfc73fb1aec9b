"""Every run-config field can be set from the command line (issue 14, defect 6): None- and
tuple-valued fields included, through `experiments.train`'s flag parsing."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from experiments.configs import common
from tests.conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]
CONFIG = f"{REPO}/experiments/configs/tiny.py:engram"


def _parse(*overrides: str):
  """Parses overrides as `experiments.train` does (its --config flag), in a fresh flag set."""
  argv = ["train", f"--config={CONFIG}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "run config", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_none_and_tuple_fields_parse_from_the_command_line():
  c = _parse(
    "--config.data.sources=text:/data/*.txt,jsonl:/x/*.jsonl:body",
    "--config.data.eval_sources=text:/val/*.txt",
    "--config.data.tokenizer_path=/tok/tokenizer.json",
    "--config.data.max_documents=100",
    "--config.data.max_bytes=None",
    "--config.train.keep_best_by=val_loss",
    "--config.engram.layer_ids=1,2",
    "--config.engram.vocab_sizes=(500, 700)",
  )
  data = common.data_config(c)
  assert data.sources == ("text:/data/*.txt", "jsonl:/x/*.jsonl:body")
  assert data.eval_sources == ("text:/val/*.txt",)
  assert (data.tokenizer_path, data.max_documents, data.max_bytes) == ("/tok/tokenizer.json", 100, None)
  assert common.train_config(c).keep_best_by == "val_loss"
  engram = common.engram_config(c)
  assert engram.layer_ids == (1, 2) and engram.vocab_sizes == (500, 700)
  assert common.model_config(_parse("--config.model.engram_fold_rows=1")).engram_fold_rows == 1
  # repeated flags append
  assert _parse("--config.data.sources=stdlib", "--config.data.sources=text:/d/*.txt").data.sources == (
    "stdlib",
    "text:/d/*.txt",
  )


def _example_value(value, kind):
  if kind is tuple:
    return "1,2" if value and isinstance(value[0], int) else ("0.5,0.75" if value else "a,b")
  return {bool: "true", int: "3", float: "0.5", str: "x"}.get(kind, "x")


def test_every_field_of_every_block_can_be_overridden():
  c = common.base_config("engram")
  overrides, expected = [], {}
  for block in ("model", "moe", "engram", "allocation", "data", "train", "mesh"):
    for name in c[block]:
      ref = c[block].get_ref(name)
      kind = ref.get_type()
      text = _example_value(ref.get(), kind)
      overrides.append(f"--config.{block}.{name}={text}")
      expected[(block, name)] = text
  parsed = _parse(*overrides)  # the bug: UnsupportedOperationError for NoneType / list fields
  for (block, name), text in expected.items():
    got = parsed[block][name]
    assert got is not None, (block, name)
    if isinstance(got, tuple):
      assert ",".join(str(v) for v in got) == text, (block, name)
    elif not isinstance(got, bool):
      assert str(got) == text or float(got) == float(text), (block, name, got)


def test_bad_override_value_names_the_field():
  with pytest.raises(flags.IllegalFlagValueError, match="config.data.max_documents"):
    _parse("--config.data.max_documents=many")
  with pytest.raises(ValueError, match=r"DataConfig.max_documents.*-3"):
    common.data_config(_parse("--config.data.max_documents=-3"))


def test_config_files_override_only_fields_the_base_has():
  c = common.derive("moe", common.PILOTED_TABLE)
  assert c.model.engram_table_init_std == 0.1 and c.train.engram_lr_multiplier == 20.0
  assert common.update(c, "data", seq_len=32) is c and c.data.seq_len == 32
  with pytest.raises(ValueError, match=r"config.data has no fields \['seq_length'\]"):
    common.update(c, "data", seq_length=32)
  with pytest.raises(ValueError, match="unknown config block 'optimizer'"):
    common.derive("moe", {"optimizer": {"lr": 1.0}})
  assert "seq_length" not in c.data and "optimizer" not in c


def _write_corpus(root: Path) -> None:
  rng = random.Random(0)
  words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(400)]
  for split, n in (("train", 12), ("val", 3)):
    (root / split).mkdir(parents=True)
    for i in range(n):
      (root / split / f"doc{i}.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(200))
      )


# The README's example (section "Configs"): a micro model on your own text files.
README_FLAGS = [
  "--config.data.sources=text:{data}/train/*.txt",
  "--config.data.eval_sources=text:{data}/val/*.txt",
  "--config.data.max_bytes=None",
  "--config.data.tokenizer_dir=None",
  "--config.train.total_steps=2",
  "--config.train.warmup_steps=1",
  "--config.train.eval_every=2",
  "--config.data.num_eval_batches=2",
  "--config.train.progress_bar=False",
]
MICRO = [
  "--config.model.vocab_size=512",
  "--config.model.hidden_size=32",
  "--config.model.num_layers=2",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=1",
  "--config.model.ffn_hidden=64",
  "--config.model.hc_mult=1",
  "--config.moe.num_experts=8",
  "--config.moe.expert_hidden=32",
  "--config.engram.n_embed_per_ngram=16",
  "--config.allocation.active_rtol=0.2",
  "--config.data.seq_len=32",
  "--config.data.batch_size=4",
  "--config.data.bpe_vocab_size=512",
  "--config.data.tokenizer_train_bytes=150000",
  "--config.train.checkpoint_every=1000",
]


def test_train_on_own_text_files_from_the_command_line(tmp_path):
  _write_corpus(tmp_path / "data")
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    f"--config={CONFIG}",
    f"--workdir={tmp_path / 'run'}",
    *[f.format(data=tmp_path / "data") for f in README_FLAGS],
    *MICRO,
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["status"] == "completed" and summary["step"] == 2
  meta = json.loads((tmp_path / "run" / "meta.json").read_text())
  assert str(tmp_path / "data" / "train") in json.dumps(meta)  # it trained on our files


@pytest.mark.parametrize(
  "module, args, last_line",
  [
    (
      "experiments.compare",
      ["--variants=engram,foo"],
      r"ValueError: --variants: unknown variant 'foo'; choose from \('dense', 'moe', 'engram'\)",
    ),
    (
      "experiments.compare",
      ["--variants=moe", "--config.data.seq_len=0"],
      "ValueError: DataConfig.seq_len must be an int >= 1, got 0",
    ),
    ("experiments.train", ["--config.mesh.tensor=0"], "ValueError: config.mesh.tensor must be an int >= 1, got 0"),
    (
      "experiments.train",
      ["--config.data.sources=text:/nonexistent/*.txt"],
      "ValueError: source 'text:/nonexistent/\\*.txt': no files match '/nonexistent/\\*.txt'",
    ),
    ("experiments.evaluate", ["--checkpoint={tmp}/none"], "FileNotFoundError: load_run: no checkpoint under .*none"),
  ],
)
def test_entry_points_end_bad_input_with_a_clear_last_line(tmp_path, module, args, last_line):
  import re

  cmd = [sys.executable, "-m", module]
  if module != "experiments.evaluate":
    cmd += [f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}"]
  cmd += [a.format(tmp=tmp_path) for a in args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert re.fullmatch(last_line, last), out.stderr[-2000:]
