"""Sphinx configuration of the engram-jax documentation (Sphinx + MyST + myst-nb).

Build: `make docs` (strict: -W --keep-going, nitpicky). Nothing is downloaded and no notebook
is executed during the build: the notebooks are rendered from the executed copies that
`tests/test_notebooks.py` writes into runs/notebooks/ when those match the sources, else
from the jupytext sources without outputs (see `_ext/notebook_sources.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout's engram_jax / pallas_kernels, not an installed copy
sys.path.insert(0, str(DOCS / "_ext"))

project = "engram-jax"
author = "engram-jax developers"
copyright = "engram-jax developers"  # noqa: A001 -- Sphinx's name
release = "0.1.0"

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "docstring_format",
  "public_api",
  "notebook_sources",
]

exclude_patterns = ["_build", "README_landing.md", "results/**", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}

# -- strictness ------------------------------------------------------------------------------
nitpicky = True
# Types of the libraries below us are not linked (no intersphinx: the build downloads nothing);
# every engram_jax / pallas_kernels name must resolve.
nitpick_ignore_regex = [
  ("py:.*", r"(jax|jaxlib|flax|nnx|np|numpy|optax|orbax|ocp|grain|chex|jnp|ml_collections|tokenizers|absl)(\..*)?"),
  ("py:.*", r"(Array|ArrayLike|PRNGKey|PyTree|DTypeLike|Mesh|NamedSharding|PartitionSpec|Sharding|Tokenizer)"),
  ("py:.*", r"(typing|collections|pathlib|os|concurrent|threading|dataclasses|enum|abc|types|io|logging)\..*"),
  ("py:.*", r"(Path|Callable|Iterator|Iterable|Sequence|Mapping|MutableMapping|Literal|Any|Self|TypeAlias|NamedTuple)"),
  ("py:.*", r"(np\.|numpy\.|jax\.|nnx\.).*"),
  ("py:class", r"[A-Z][A-Za-z]*Kind|[A-Z][A-Za-z]*Impl|ShardedLookup|TableSharding|GateKind"),
  # Type variables of PEP 695 generics (`def shard_state[A](state: A, ...) -> A`) and type
  # aliases (`engram_jax.sharding.MeshAxes = str | tuple[str, ...] | None`): not objects.
  ("py:class", r"A|MeshAxes"),
  # In a public signature (`engram_jax.data.build_corpus`) but not exported by engram_jax.data.
  ("py:class", r"engram_jax\.data\.sources\.DocumentSet"),
]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
suppress_warnings = ["myst.header"]  # guides start at "##" headings moved from the README

# -- autodoc ---------------------------------------------------------------------------------
# Flax NNX modules are built by a metaclass whose __call__(*args, **kwargs) would stand in for
# every module's __init__ signature; skip it the way autodoc skips enum's (Sphinx 9.1 pinned).
from sphinx.ext.autodoc._dynamic import _signatures  # noqa: E402

_signatures._METACLASS_CALL_BLACKLIST = _signatures._METACLASS_CALL_BLACKLIST | {
  "flax.nnx.pytreelib.PytreeMeta.__call__"
}

autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_mock_imports: list[str] = []
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Only "Args:" is parsed into fields; the other sections are free text in this code base
# ("Returns: {layer_id: np.int64 [B, T, H]} ...", "Raises: ValueError naming the field"), so
# they render as written instead of being read as types to cross-reference.
napoleon_custom_sections = ["Returns", "Raises", "Yields", ("Attributes", "params_style")]
# Docstrings write `name` for code (Markdown habit): render it as literal text.
default_role = "literal"
add_module_names = False
python_use_unqualified_type_names = True

# Literal blocks of the docstrings are formulas and tables, not Python.
highlight_language = "text"

# -- notebooks (myst-nb) ---------------------------------------------------------------------
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "remove"  # log noise of the run (absl, orbax, JAX warnings); a failing cell fails the test instead

# -- HTML -----------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "engram-jax"
html_static_path = ["_static"]
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
