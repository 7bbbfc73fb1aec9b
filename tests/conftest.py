"""Shared fixtures: the golden data of the reference implementation."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

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
