"""The documentation site: the strict build (`make docs`) and the checks it relies on.

`test_strict_docs_build` runs the same Sphinx build as `make docs` (warnings are errors,
nitpicky cross-references, a fresh environment) into a temporary folder: a broken
cross-reference, a dead internal link, a docstring reStructuredText cannot read or a public
name without a docstring summary fails it. The other tests pin the pieces that build relies
on (the public-name check, the docstring reader, the notebook outputs) on tiny inputs.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

pytest.importorskip("sphinx", reason="sphinx is not installed (pip install -e .[docs])")
pytest.importorskip("myst_nb", reason="myst-nb is not installed (pip install -e .[docs])")

import docstring_format  # noqa: E402 -- docs/_ext, on the path above
import notebook_sources  # noqa: E402
import public_api  # noqa: E402


@pytest.mark.slow
def test_strict_docs_build(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # the docs import the library; one CPU device is enough
  cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-n", "-W", "--keep-going", "-E", "-j", "1", "-q"]
  cmd += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  print(f"strict docs build: {time.perf_counter() - start:.1f}s wall")
  assert proc.returncode == 0, f"make docs would fail:\n{proc.stderr[-8000:]}"
  assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-8000:]

  html = tmp_path / "html"
  hashing = (html / "api" / "hashing.html").read_text()
  # Documented under the package that exports it, with the summary in the table.
  assert 'id="engram_jax.hashing.NgramHasher"' in hashing
  assert "Host-side multi-layer, multi-head n-gram hasher" in hashing
  assert 'id="engram_jax.hashing.NgramHasher.hash"' in hashing
  # A constant documented by its #: comment.
  assert 'id="engram_jax.hashing.device_hash.INVALID_ROW"' in hashing
  # Every API module has a section on some page.
  pages = "".join(p.read_text() for p in (html / "api").glob("*.html"))
  for modname in public_api.API_MODULES:
    assert f'id="module-{modname}"' in pages, modname
  for stem in [p.stem for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))]:
    assert (html / "notebooks" / f"{stem}.html").exists(), stem
  for guide in ("hashing", "engram_layer", "training", "offload", "distributed", "generation", "reliability"):
    assert (html / "guides" / f"{guide}.html").exists(), guide


def _module(tmp_path, monkeypatch, name: str, source: str):
  (tmp_path / f"{name}.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  sys.modules.pop(name, None)
  return importlib.import_module(name)


def test_public_names_without_docstring_are_reported(tmp_path, monkeypatch):
  _module(
    tmp_path,
    monkeypatch,
    "docs_probe_all",
    '"""Probe."""\n'
    '__all__ = ["documented", "bare", "Thing", "LIMIT", "UNDOCUMENTED"]\n'
    "#: The limit.\n"
    "LIMIT = 3\n"
    "UNDOCUMENTED = 4\n"
    'def documented():\n  """Does it."""\n'
    "def bare():\n  pass\n"
    "def _private():\n  pass\n"
    "class Thing:\n"
    '  """A thing."""\n'
    '  def ok(self):\n    """Fine."""\n'
    "  def bare_method(self):\n    pass\n"
    "  @property\n  def size(self):\n    return 1\n"
    '  def __call__(self, x):\n    """x [B] -> [B]."""\n',
  )
  missing = public_api.missing_docstrings(("docs_probe_all",))
  assert missing == [
    "docs_probe_all.bare",
    "docs_probe_all.Thing.bare_method",
    "docs_probe_all.Thing.size",
    "docs_probe_all.UNDOCUMENTED",
  ]
  pending = {"docs_probe_all.bare", "docs_probe_all.Thing.bare_method", "docs_probe_all.documented"}
  problems = public_api.docstring_problems(("docs_probe_all",), pending=pending)
  assert problems == [
    "public name without a docstring summary: docs_probe_all.Thing.size",
    "public name without a docstring summary: docs_probe_all.UNDOCUMENTED",
    "_pending_docstrings.txt lists docs_probe_all.documented, which is documented (or gone) now: remove it",
  ]


def test_module_without_all_exposes_what_it_defines(tmp_path, monkeypatch):
  _module(
    tmp_path,
    monkeypatch,
    "docs_probe_defs",
    '"""Probe."""\nfrom os.path import join\nimport math\nLIMIT: int = 3\n_HIDDEN = 1\n'
    'def f():\n  """F."""\nclass C:\n  """C."""\n',
  )
  assert public_api.public_names("docs_probe_defs") == ["f", "C", "LIMIT"]


def test_every_api_module_imports_and_the_pending_list_only_names_real_objects():
  for modname in public_api.API_MODULES:
    assert public_api.public_names(modname), f"{modname} exposes no public name"
  qualified = {q for m in public_api.API_MODULES for q, _, _ in public_api.iter_public(m)}
  stale = sorted(public_api.read_pending() - qualified)
  assert not stale, f"docs/_pending_docstrings.txt names objects that do not exist: {stale}"


def test_indented_blocks_become_literal_blocks_but_fields_and_lists_do_not():
  doc = [
    "Shapes:",
    "  e = concat_h table[offset_h + row_h]   [B, T, d_mem]",
    "  alpha = sigmoid(sign(s) sqrt(|s|))",
    "The gate, then",
    "",
    "  u = alpha * v",
    "",
    "- a list item that",
    "  wraps",
    "",
    "Args:",
    "  x: the input, an `nnx.Param`s tree",
    "    continued.",
    "Returns:",
    "  [B, T] ids.",
  ]
  assert docstring_format.literal_blocks(doc) == [
    "Shapes::",
    "",
    "  e = concat_h table[offset_h + row_h]   [B, T, d_mem]",
    "  alpha = sigmoid(sign(s) sqrt(|s|))",
    "",
    "The gate, then ::",
    "",
    "  u = alpha * v",
    "",
    "- a list item that",
    "  wraps",
    "",
    "Args:",
    "  x: the input, an `nnx.Param`\\ s tree",
    "    continued.",
    "Returns:",
    "  [B, T] ids.",
  ]


def test_notebooks_render_the_executed_copy_only_when_its_cells_match(tmp_path, monkeypatch):
  import jupytext
  import nbformat

  source = tmp_path / "src" / "01_probe.py"
  source.parent.mkdir()
  source.write_text("# %% [markdown]\n# # Probe\n\n# %%\nprint(1 + 1)\n")
  executed = tmp_path / "executed"
  executed.mkdir()
  ran = jupytext.read(source)
  ran.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="2\n")]
  ran.cells[1].execution_count = 1
  nbformat.write(ran, executed / "01_probe.ipynb")

  nb, with_outputs = notebook_sources.notebook_for(source, executed)
  assert with_outputs and nb.cells[1].outputs[0].text == "2\n"

  source.write_text("# %% [markdown]\n# # Probe\n\n# %%\nprint(2 + 2)\n")  # edited since the run
  nb, with_outputs = notebook_sources.notebook_for(source, executed)
  assert not with_outputs and not any(c.get("outputs") for c in nb.cells)
  assert nb.cells[1].source == notebook_sources.NO_OUTPUTS_NOTE  # says so under the title
  assert nb.cells[2].source == "print(2 + 2)"

  monkeypatch.setattr(notebook_sources, "SOURCES", source.parent)
  target = tmp_path / "site"
  assert notebook_sources.write_notebooks(target, executed) == ([], ["01_probe"])
  assert [p.name for p in target.glob("*.ipynb")] == ["01_probe.ipynb"]


def _landing_page() -> Path:
  """The landing page draft until it replaces README.md, then README.md."""
  draft = DOCS / "README_landing.md"
  return draft if draft.exists() else ROOT / "README.md"


def test_landing_page_flax_quick_start_runs():
  import math
  import re

  import numpy as np

  text = _landing_page().read_text()
  blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
  (code,) = [b for b in blocks if "class MyLM" in b]
  namespace: dict = {}
  exec(compile(code, "README quick start", "exec"), namespace)  # noqa: S102 -- the README's own code
  loss = float(namespace["loss"])
  assert abs(loss - math.log(256)) < 0.5, loss  # an untrained 256-way softmax
  table_grad = np.asarray(namespace["grads"]["engram"]["table"][...])
  assert np.abs(table_grad).sum() > 0, "the Engram table got no gradient"
  assert namespace["ids"].shape == (4, 33, namespace["cfg"].num_heads)


def test_landing_page_links_resolve():
  import re

  page = _landing_page()
  links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
  assert links
  # Written for the repository root, where it will be README.md.
  missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
  assert not missing, f"{page.name} links to missing files: {missing}"
