"""Shared fixtures: the golden data of the reference implementation."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from xdist.scheduler import LoadScopeScheduling

# The tests run tiny programs, so XLA's compile time dominates them: LLVM optimisation level 0
# compiles about 3x faster (same programs and results, slower machine code). `make test` sets
# the same flags.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process (or subprocess) with `devices` virtual CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAG}"


# 8 virtual CPU devices for the sharding tests, unless the caller chose otherwise.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache: many tests (and the training subprocesses they start,
# which inherit the environment) compile the same tiny programs again in fresh Trainers; a
# hit skips XLA's compile. Keyed by the program, jax version and flags, so never stale.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Modules whose tests share an expensive module-scoped fixture or `functools.cache` (a trained
# run, a built model, a tokenizer, a fitted reference): under `pytest -n N` (xdist's default
# `--dist load`) each runs whole on one worker, so that setup is built once, not once per worker
# that draws one of its tests. Every other test is scheduled on its own.
SHARED_SETUP_MODULES = frozenset(
  {
    "test_attention.py",
    "test_compression.py",
    "test_data_pipeline.py",
    "test_data_tokenizer.py",
    "test_disk_table.py",
    "test_engram_sharded_lookup.py",
    "test_eval_protocol.py",
    "test_offload_host_rows.py",
    "test_offload_model.py",
    "test_offload_training.py",
    "test_row_stores.py",
    "test_run_safety.py",
    "test_train.py",
    "test_train_offload.py",
    "test_train_sparse_tables.py",
  }
)


class SharedSetupScheduling(LoadScopeScheduling):
  """xdist scheduling: the tests of a `SHARED_SETUP_MODULES` module form one work unit, every
  other test is a unit of its own. Units go out largest first (xdist's loadscope order), so the
  single tests even out the workers at the end."""

  def _split_scope(self, nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return module if Path(module).name in SHARED_SETUP_MODULES else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`pytest -n N` (dist "load", the default): `SharedSetupScheduling`. An explicit other
  `--dist` keeps xdist's own scheduler."""
  if config.getvalue("dist") == "load":
    return SharedSetupScheduling(config, log)
  return None


TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


def _require(path: Path) -> Path:
  if not path.exists():
    pytest.fail(f"golden test data missing: {path} (expected ../shared/testdata beside the repo)")
  return path


@pytest.fixture(scope="session")
def testdata_dir() -> Path:
  return _require(TESTDATA)


def load_golden(stem: str):
  """(npz arrays, json metadata) of a golden file pair in ../shared/testdata."""
  arrays = np.load(_require(TESTDATA / f"{stem}.npz"))
  meta = json.loads(_require(TESTDATA / f"{stem}.json").read_text())
  return arrays, meta


def engram_config_from_meta(meta: dict):
  from engram_jax import EngramConfig

  return EngramConfig(
    vocab_sizes=meta["engram_vocab_size"],
    max_ngram_size=meta["max_ngram_size"],
    n_embed_per_ngram=meta["n_embed_per_ngram"],
    n_head_per_ngram=meta["n_head_per_ngram"],
    layer_ids=meta["layer_ids"],
    pad_id=meta["pad_id"],
    seed=meta["seed"],
    kernel_size=meta.get("kernel_size", 4),
    allow_layer_zero=True,
  )
