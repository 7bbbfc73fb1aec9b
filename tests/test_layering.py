"""The import-linter contracts in pyproject.toml: kept by the code, and broken by an upward import."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("engram_jax", "pallas_kernels", "experiments")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
  # lint-imports reads cwd/pyproject.toml and finds the packages under cwd (first on sys.path)
  env = {**os.environ, "PYTHONPATH": str(cwd)}
  return subprocess.run(
    [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
  )


def copy_tree(dst: Path) -> None:
  shutil.copy(ROOT / "pyproject.toml", dst)
  for pkg in PACKAGES:
    shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def test_the_code_keeps_the_contracts():
  result = lint_imports(ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
  "importer, imported, broken",
  [
    # a layer importing one above it
    ("engram_jax/layers/norms.py", "engram_jax.models.transformer", "layers"),
    # kernel-level offload importing training (the old offload <-> train cycle)
    ("engram_jax/offload/sparse_adam.py", "engram_jax.train.steps", "layers"),
    # a cycle inside one package, hidden in a function (lazy imports count)
    ("engram_jax/data/sources.py", "engram_jax.data.pipeline", "no import cycle"),
  ],
)
def test_an_upward_import_or_cycle_breaks_the_build(tmp_path, importer, imported, broken):
  copy_tree(tmp_path)
  with open(tmp_path / importer, "a") as f:
    f.write(f"\n\ndef _late():\n  import {imported}  # noqa\n")
  result = lint_imports(tmp_path)
  assert result.returncode != 0
  broken_section = result.stdout.split("Broken contracts")[-1]
  assert broken in broken_section
  module = importer.removesuffix(".py").replace("/", ".")
  # the layers contract names modules in full, the cycle report relative to their package
  assert module in broken_section or f".{module.rsplit('.', 1)[1]} -> " in broken_section
