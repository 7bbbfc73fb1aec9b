"""Executes every notebook in notebooks/ (jupytext percent sources) on a fresh kernel.

Each `notebooks/NN_name.py` is converted with jupytext and run top to bottom with nbclient
on a `python3` kernel of THIS interpreter (jupyter_client replaces the kernel spec's
`python` with `sys.executable`; the first cell checks it), with notebooks/ as the working
directory and one CPU device. A failing cell fails the test with its traceback. The
notebooks are skipped, with the reason, only when no kernel can be started at all.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 600  # a hung cell fails the test; the notebooks aim at < 60 s in all
# Executed copies (outputs included) for the documentation site: docs/_ext/notebook_sources.py
# renders them when their cells match the source's. runs/ is git-ignored.
EXECUTED_DIR = ROOT / "runs" / "notebooks"

jupytext = pytest.importorskip("jupytext", reason="jupytext is not installed (pip install -e .[notebooks])")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e .[notebooks])")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e .[notebooks])")


def kernel_env() -> dict[str, str]:
  """The test process's environment for the kernel, on the CPU, with one device.

  The test suite forces 8 virtual CPU devices for the sharding tests; the notebooks are
  single-device walkthroughs and only get slower with 8.
  """
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # silences a debugger warning at kernel start
  env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  return env


@pytest.fixture(scope="session")
def kernel_available() -> None:
  """Skips (with the reason) if a python3 kernel of this interpreter cannot start."""
  from jupyter_client.manager import KernelManager

  km = KernelManager(kernel_name="python3")
  try:
    km.start_kernel(env=kernel_env())
    kc = km.client()
    kc.start_channels()
    try:
      kc.wait_for_ready(timeout=120)
    finally:
      kc.stop_channels()
  except Exception as e:  # noqa: BLE001 -- any failure to start means "no kernel here"
    pytest.skip(f"cannot start a python3 Jupyter kernel for {sys.executable}: {type(e).__name__}: {e}")
  finally:
    if km.has_kernel:
      km.shutdown_kernel(now=True)


def _interpreter_check_cell():
  import nbformat

  return nbformat.v4.new_code_cell(
    "import sys\n"
    f"assert sys.prefix == {sys.prefix!r}, "
    f"f'kernel runs {{sys.executable}}, not the test interpreter {sys.executable}'"
  )


def _cpu_seconds_cell():
  import nbformat

  return nbformat.v4.new_code_cell(
    "import resource\n"
    "_r = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(f'kernel cpu seconds: {_r.ru_utime + _r.ru_stime:.1f}')"
  )


def save_executed(nb, target: Path) -> None:
  """Writes the executed notebook without the two cells this test added (first and last)."""
  import copy

  import nbformat

  out = copy.deepcopy(nb)
  out.cells = out.cells[1:-1]
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.with_suffix(".ipynb.tmp")
  nbformat.write(out, tmp)
  tmp.replace(target)  # atomic: a docs build never reads half a notebook


def test_notebooks_exist_as_jupytext_sources_only():
  assert [p.stem for p in NOTEBOOKS] == [
    "01_hashing_and_compression",
    "02_engram_in_a_model",
    "03_offload_and_prefetch",
    "04_reuse_in_your_model",
    "05_distributed_tables",
  ]
  assert not list(NOTEBOOK_DIR.glob("*.ipynb")), (
    "commit notebooks as jupytext percent .py files only (outputs stay out of git)"
  )
  for path in NOTEBOOKS:
    nb = jupytext.read(path)
    kinds = {cell.cell_type for cell in nb.cells}
    assert kinds == {"markdown", "code"}, f"{path.name}: cell types {kinds}"
    assert nb.metadata["kernelspec"]["name"] == "python3", path.name
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), (
      f"{path.name} must open with a markdown title"
    )
    for cell in nb.cells:
      assert not cell.get("outputs"), f"{path.name} stores outputs"


@pytest.mark.e2e
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_available):
  nb = jupytext.read(path)
  nb.cells.insert(0, _interpreter_check_cell())
  nb.cells.append(_cpu_seconds_cell())
  client = nbclient.NotebookClient(
    nb,
    kernel_name="python3",
    timeout=CELL_TIMEOUT_S,
    allow_errors=False,
    resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  start = time.perf_counter()
  client.execute(env=kernel_env())
  seconds = time.perf_counter() - start
  cpu = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", [])).strip()
  print(f"{path.name}: {seconds:.1f}s wall, {cpu}")  # wall time depends on the machine's load

  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(cell.get("execution_count") for cell in code), "a code cell did not run"
  errors = [o for cell in code for o in cell.get("outputs", []) if o.output_type == "error"]
  assert not errors, errors
  save_executed(nb, EXECUTED_DIR / f"{path.stem}.ipynb")
  # Every notebook shows what it computed (printed figures or plots), not just silence.
  shown = [
    o for cell in code for o in cell.get("outputs", []) if o.output_type in ("stream", "display_data", "execute_result")
  ]
  assert len(shown) >= 3, f"{path.name} produced {len(shown)} outputs"
