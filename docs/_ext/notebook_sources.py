"""Puts the notebooks into the site, with outputs when the notebook tests have produced them.

The notebooks live in notebooks/NN_name.py (jupytext percent files, no outputs in git).
`tests/test_notebooks.py` executes each and writes the executed copy, outputs included, to
runs/notebooks/NN_name.ipynb. At `builder-inited` this extension writes
docs/notebooks/NN_name.ipynb (git-ignored) for every source:

- the executed copy, when there is one and its cells are exactly the source's cells (same
  order, same text): the page shows the outputs of that run;
- else the converted source without outputs, with a note under its title, and the build log
  says which notebooks have no outputs and how to get them (`make docs-notebooks`, which runs
  the notebook tests first).

myst-nb renders them with `nb_execution_mode = "off"`: the docs build executes nothing.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "notebooks"
EXECUTED = ROOT / "runs" / "notebooks"
TARGET = ROOT / "docs" / "notebooks"


def _cells(nb) -> list[tuple[str, str]]:  # noqa: ANN001 -- an nbformat NotebookNode
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def notebook_for(source: Path, executed_dir: Path = EXECUTED):
  """(notebook to render, whether it has the outputs of a run of exactly this source)."""
  import jupytext
  import nbformat

  nb = jupytext.read(source)
  executed = executed_dir / f"{source.stem}.ipynb"
  if executed.exists():
    ran = nbformat.read(executed, as_version=4)
    if _cells(ran) == _cells(nb):
      return ran, True
  nb.cells.insert(1, nbformat.v4.new_markdown_cell(NO_OUTPUTS_NOTE))
  return nb, False


#: Shown under the title of a notebook rendered without outputs.
NO_OUTPUTS_NOTE = (
  "```{note}\n"
  "This page shows the notebook without its outputs: it has not run since its source last "
  "changed (`tests/test_notebooks.py` writes the executed copies the site shows; "
  "`make docs-notebooks` runs the notebooks and rebuilds the site).\n"
  "```"
)


def write_notebooks(target: Path = TARGET, executed_dir: Path = EXECUTED) -> tuple[list[str], list[str]]:
  """Writes target/NN_name.ipynb for every notebook; returns (with outputs, without)."""
  import nbformat

  target.mkdir(parents=True, exist_ok=True)
  with_outputs, without = [], []
  sources = sorted(SOURCES.glob("[0-9][0-9]_*.py"))
  for source in sources:
    nb, ran = notebook_for(source, executed_dir)
    (with_outputs if ran else without).append(source.stem)
    path = target / f"{source.stem}.ipynb"
    text = nbformat.writes(nb)
    if not path.exists() or path.read_text() != text:  # unchanged files keep Sphinx's cache
      path.write_text(text)
  stems = {s.stem for s in sources}
  for stale in target.glob("*.ipynb"):
    if stale.stem not in stems:
      stale.unlink()
  return with_outputs, without


def setup(app):  # noqa: ANN001, ANN201 -- the Sphinx extension entry point
  from sphinx.util import logging

  logger = logging.getLogger(__name__)

  def builder_inited(app):
    with_outputs, without = write_notebooks()
    if with_outputs:
      logger.info(f"notebooks with outputs from {EXECUTED.relative_to(ROOT)}: {', '.join(with_outputs)}")
    if without:
      logger.info(
        f"notebooks rendered without outputs (no matching executed copy in {EXECUTED.relative_to(ROOT)}; "
        f"`make docs-notebooks` runs them first): {', '.join(without)}"
      )

  app.connect("builder-inited", builder_inited)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
