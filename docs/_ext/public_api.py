"""The API reference of engram-jax and the check that every public name is documented.

`API_MODULES` is the public surface: every package's `__all__`, and for a public module
without `__all__` its top-level classes, functions and UPPER_CASE constants defined there.
A public class's public methods, properties and `__call__` defined in the class count too.

- ``{engram-api} MODULE`` (a directive) renders one module: a summary table (name and first
  docstring line) and the autodoc entries of its public names, documented under MODULE
  (`engram_jax.hashing.NgramHasher`; autodoc adds the defining path as `:canonical:`, so
  annotations naming `engram_jax.hashing.ngram.NgramHasher` resolve to it).
- At `builder-inited`, every public name without a docstring whose first line is a summary
  is a warning (an error under -W, as `make docs` builds), unless it is listed in
  docs/_pending_docstrings.txt (a temporary list; an entry that got its docstring is a
  warning too, so the list only shrinks). Constants are documented by a `#:` comment
  above their assignment (Sphinx's attribute doc comments), in the module that defines them.
- A module of `API_MODULES` that no page renders is a warning at the end of the build.

`public_names` and `missing_docstrings` are importable without Sphinx running
(tests/test_docs.py uses them).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any, Iterator

API_MODULES: tuple[str, ...] = (
  "engram_jax.config",
  "engram_jax.hashing",
  "engram_jax.hashing.device_hash",
  "pallas_kernels",
  "pallas_kernels.reference",
  "engram_jax.distributed",
  "engram_jax.distributed.host_shards",
  "engram_jax.offload",
  "engram_jax.layers.engram",
  "engram_jax.layers.attention",
  "engram_jax.layers.moe",
  "engram_jax.layers.ffn",
  "engram_jax.layers.norms",
  "engram_jax.layers.rope",
  "engram_jax.layers.hyper_connections",
  "engram_jax.layers.params",
  "engram_jax.layers.table_init",
  "engram_jax.models",
  "engram_jax.models.offloaded",
  "engram_jax.models.host_init",
  "engram_jax.sharding",
  "engram_jax.data",
  "engram_jax.train",
  "engram_jax.train.trainer",
  "engram_jax.train.host_trainer",
  "engram_jax.inference",
  "engram_jax.interop",
)

PENDING_FILE = Path(__file__).resolve().parents[1] / "_pending_docstrings.txt"
_CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")


# -- the public surface ----------------------------------------------------------------------
def _defined_here(module: types.ModuleType, name: str, obj: Any) -> bool:
  return getattr(obj, "__module__", None) == module.__name__


def _assigned_constants(module: types.ModuleType) -> list[str]:
  """UPPER_CASE names assigned at the top level of the module's source, in source order."""
  try:
    source = inspect.getsource(module)
  except (OSError, TypeError):
    return []
  names = re.findall(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=\n]*)?=", source, flags=re.M)
  return list(dict.fromkeys(names))


def public_names(modname: str) -> list[str]:
  """The public names of one API module: `__all__`, else what the module defines."""
  module = importlib.import_module(modname)
  explicit = getattr(module, "__all__", None)
  if explicit is not None:
    names = [n for n in explicit if not n.startswith("__")]
    return [n for n in names if not isinstance(getattr(module, n), types.ModuleType)]
  names = []
  for name, obj in vars(module).items():
    if name.startswith("_") or isinstance(obj, types.ModuleType):
      continue
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and _defined_here(module, name, obj):
      names.append(name)
  names += [n for n in _assigned_constants(module) if n in vars(module) and n not in names]
  return names


def class_members(cls: type) -> list[str]:
  """Public methods, properties and `__call__` defined in the class itself (not inherited)."""
  out = []
  for name, value in vars(cls).items():
    if name.startswith("_") and name != "__call__":
      continue
    if isinstance(value, (classmethod, staticmethod)):
      value = value.__func__
    if inspect.isfunction(value) or isinstance(value, property):
      out.append(name)
  return out


def _summary(doc: str | None) -> str:
  """The first line of a docstring (what the check requires: a one-line summary)."""
  lines = (doc or "").strip().splitlines()
  return lines[0].strip() if lines else ""


def _table_summary(doc: str | None) -> str:
  """The summary shown in a module's table: the first sentence of the first paragraph."""
  paragraph = []
  for line in (doc or "").strip().splitlines():
    if not line.strip() or (paragraph and line.startswith(" ")):
      break
    paragraph.append(line.strip())
  text = " ".join(paragraph)
  m = re.search(r"(?<=[.!?])\s", text)
  return text[: m.start()] if m else text


def _attr_doc(modname: str, name: str) -> list[str] | None:
  """The `#:` doc comment (or docstring after the assignment) of a module-level name."""
  from sphinx.pycode import ModuleAnalyzer, PycodeError

  try:
    analyzer = ModuleAnalyzer.for_module(modname)
    analyzer.analyze()
  except PycodeError:
    return None
  doc = analyzer.attr_docs.get(("", name))
  return list(doc) if doc else None


def constant_doc(modname: str, name: str) -> tuple[str, list[str]] | None:
  """(defining module, doc lines) of a constant re-exported by `modname`, or None."""
  module = importlib.import_module(modname)
  obj = getattr(module, name)
  candidates = [modname] + sorted(
    m
    for m, mod in list(sys.modules.items())
    if m.startswith(modname + ".") and mod is not None and getattr(mod, name, _MISSING) is obj
  )
  for cand in candidates:
    doc = _attr_doc(cand, name)
    if doc and any(line.strip() for line in doc):
      return cand, doc
  return None


_MISSING = object()


def iter_public(modname: str) -> Iterator[tuple[str, Any, str]]:
  """(qualified name, object, kind) of every public name and public class member."""
  module = importlib.import_module(modname)
  for name in public_names(modname):
    obj = getattr(module, name)
    if inspect.isclass(obj):
      kind = "exception" if issubclass(obj, BaseException) else "class"
      yield f"{modname}.{name}", obj, kind
      for member in class_members(obj):
        yield f"{modname}.{name}.{member}", vars(obj)[member], "member"
    elif callable(obj):
      yield f"{modname}.{name}", obj, "function"
    else:
      yield f"{modname}.{name}", obj, "data"


def missing_docstrings(modules: tuple[str, ...] = API_MODULES) -> list[str]:
  """Qualified public names that have no docstring with a one-line summary."""
  missing = []
  for modname in modules:
    for qualname, obj, kind in iter_public(modname):
      if kind == "data":
        found = constant_doc(modname, qualname.rsplit(".", 1)[1])
        ok = bool(found and _summary("\n".join(found[1])))
      else:
        if isinstance(obj, (classmethod, staticmethod)):
          obj = obj.__func__
        doc = obj.__doc__ if not isinstance(obj, property) else (obj.fget.__doc__ if obj.fget else None)
        ok = bool(_summary(doc))
      if not ok:
        missing.append(qualname)
  return missing


def read_pending(path: Path = PENDING_FILE) -> set[str]:
  """Names listed in docs/_pending_docstrings.txt (one a line; '#' starts a comment)."""
  if not path.exists():
    return set()
  names = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
  return {n for n in names if n}


def docstring_problems(modules: tuple[str, ...] = API_MODULES, pending: set[str] | None = None) -> list[str]:
  """Missing docstrings not in the pending list, and pending entries that are documented now."""
  pending = read_pending() if pending is None else pending
  missing = missing_docstrings(modules)
  problems = [f"public name without a docstring summary: {n}" for n in missing if n not in pending]
  done = sorted(pending - set(missing))
  problems += [f"{PENDING_FILE.name} lists {n}, which is documented (or gone) now: remove it" for n in done]
  return problems


# -- Sphinx ----------------------------------------------------------------------------------
def _rst_escape(text: str) -> str:
  from docstring_format import literal_blocks

  return literal_blocks([text.replace("*", r"\*").replace("|", r"\|")])[0]


def module_rst(modname: str) -> list[str]:
  """The reStructuredText of one module's reference section."""
  module = importlib.import_module(modname)
  names = public_names(modname)
  lines = [f".. automodule:: {modname}", "   :no-members:", "", f".. currentmodule:: {modname}", ""]
  if names:
    lines += [".. list-table::", "   :widths: 30 70", ""]
    for name in names:
      obj = getattr(module, name)
      if inspect.isclass(obj) or callable(obj):
        summary = _table_summary(obj.__doc__)
      else:
        found = constant_doc(modname, name)
        summary = _table_summary("\n".join(found[1])) if found else ""
      lines += [f"   * - :py:obj:`~{modname}.{name}`", f"     - {_rst_escape(summary) or ' '}"]
    lines.append("")
  for name in names:
    obj = getattr(module, name)
    if inspect.isclass(obj):
      directive = "autoexception" if issubclass(obj, BaseException) else "autoclass"
      lines += [f".. {directive}:: {name}", "   :members:", "   :special-members: __call__", ""]
    elif inspect.isfunction(obj) or callable(obj):
      lines += [f".. autofunction:: {name}", ""]
    else:
      found = constant_doc(modname, name)
      value = repr(obj)
      if len(value) > 80:
        value = value[:77] + "..."
      lines += [f".. py:data:: {name}", f"   :value: {value}", ""]
      lines += ["   " + line if line.strip() else "" for line in (found[1] if found else [])]
      lines.append("")
  return lines


def setup(app):  # noqa: ANN001, ANN201 -- the Sphinx extension entry point
  from docutils import nodes
  from docutils.statemachine import StringList
  from sphinx.util import logging
  from sphinx.util.docutils import SphinxDirective

  logger = logging.getLogger(__name__)

  class EngramApi(SphinxDirective):
    """``{engram-api} MODULE``: the reference section of one API module."""

    required_arguments = 1

    def run(self):
      modname = self.arguments[0]
      if modname not in API_MODULES:
        raise self.error(f"{modname} is not in API_MODULES (docs/_ext/public_api.py)")
      rendered = getattr(self.env, "engram_api_rendered", set())
      rendered.add(modname)
      self.env.engram_api_rendered = rendered
      node = nodes.section()
      node.document = self.state.document
      content = StringList(module_rst(modname), source=f"<engram-api {modname}>")
      self.state.nested_parse(content, self.content_offset, node, match_titles=True)
      return node.children

  def check_docstrings(app):
    for problem in docstring_problems():
      logger.warning(problem, type="engram", subtype="docstring")

  def check_rendered(app, env):
    rendered = getattr(env, "engram_api_rendered", set())
    for modname in API_MODULES:
      if modname not in rendered:
        logger.warning(f"API module {modname} is rendered by no page (add an engram-api directive)")

  def merge(app, env, docnames, other):
    env.engram_api_rendered = getattr(env, "engram_api_rendered", set()) | getattr(other, "engram_api_rendered", set())

  def purge(app, env, docname):
    pass  # the set only grows within one build; a clean build (make docs) starts empty

  app.add_directive("engram-api", EngramApi)
  app.connect("builder-inited", check_docstrings)
  app.connect("env-check-consistency", check_rendered)
  app.connect("env-merge-info", merge)
  app.connect("env-purge-doc", purge)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
