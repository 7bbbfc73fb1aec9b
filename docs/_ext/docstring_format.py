"""Reads this code base's docstrings as they are written: Google style, plain-text blocks.

The docstrings are written for `help()` and an editor: a summary line, prose, `Args:` (and
`Attributes:`) entries with indented continuation lines, and indented blocks of formulas,
shapes or option tables directly under the line that introduces them, without the blank
lines reStructuredText wants:

    Shapes: hidden h [B, T, G, D], row ids [B, T, H]:
      e = concat_h table[offset_h + row_h]      [B, T, d_mem]
      alpha = sigmoid(sign(s) sqrt(|s|))

Before napoleon reads the sections (priority 400 < its 500), every such indented block
outside an `Args:`-style section becomes a literal block (shown as written, monospace), so
that `*`, `|s|` or `_` in a formula are not taken for markup and the alignment survives.
Prose, `code` (rendered as literal, `default_role`) and Sphinx roles are left as they are.
"""

from __future__ import annotations

import re

# Sections whose entries napoleon parses itself ("name: text" + deeper continuation lines).
FIELD_SECTIONS = {"args", "arguments", "parameters", "params", "attributes", "keyword args", "other parameters"}
OTHER_SECTIONS = {"returns", "return", "raises", "yields", "yield", "example", "examples", "note", "notes", "warning"}
_SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]*?)(?:\s*\([^)]*\))?:\s*$")


def _section(line: str) -> str | None:
  """The lower-case name of a napoleon section header line, else None."""
  m = _SECTION.match(line)
  name = m.group(1).strip().lower() if m else None
  return name if name in FIELD_SECTIONS | OTHER_SECTIONS else None


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


_LIST_ITEM = re.compile(r"^(\s*)([-*+]|\d+[.)]|\(\w+\))\s+")
_SUFFIXED_LITERAL = re.compile(r"(`+[^`\s][^`]*`+)(?=\w)")


def _continues_item(prev: str, line: str) -> bool:
  """Whether `line` is the wrapped continuation of the list item `prev` ("- a\n  b")."""
  m = _LIST_ITEM.match(prev)
  return bool(m) and _indent(line) == m.end()


def literal_blocks(lines: list[str]) -> list[str]:
  """The docstring's lines with each unannounced indented block turned into a literal block.

  A block is a run of lines indented deeper than the line above it (directly, or across
  blank lines: the prose paragraph before it), outside `Args:`-style sections and not the
  continuation of a list item. Outside literal blocks, a `literal` directly followed by
  letters (`Param`s) gets the escaped space reStructuredText needs there.
  """
  out: list[str] = []
  in_fields = False
  field_indent = 0
  i = 0
  while i < len(lines):
    line = lines[i]
    section = _section(line)
    if section:
      in_fields = section in FIELD_SECTIONS
      field_indent = _indent(line)
      out.append(line)
      i += 1
      continue
    if in_fields and line.strip() and _indent(line) <= field_indent:
      in_fields = False  # dedented out of the section
    last = next((j for j in range(len(out) - 1, -1, -1) if out[j].strip()), None)
    prev = out[last] if last is not None else ""
    deeper = bool(line.strip() and prev.strip() and _indent(line) > _indent(prev))
    if (
      deeper
      and not in_fields
      and not _section(prev)
      and not prev.rstrip().endswith("::")
      and not _continues_item(prev, line)
      and not _LIST_ITEM.match(line)
    ):
      base = _indent(prev)
      block = []
      while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        block.append(lines[i])
        i += 1
      while block and not block[-1].strip():
        block.pop()
      out[last] = prev.rstrip() + (":" if prev.rstrip().endswith(":") else " ::")
      del out[last + 1 :]
      out.append("")
      out.extend(block)
      out.append("")
      continue
    out.append(_SUFFIXED_LITERAL.sub(r"\1\\ ", line))
    i += 1
  return out


def _process(app, what, name, obj, options, lines):  # noqa: ANN001 -- autodoc's signature
  lines[:] = literal_blocks(list(lines))


def setup(app):  # noqa: ANN001, ANN201 -- the Sphinx extension entry point
  from sphinx.ext import napoleon

  app.setup_extension("sphinx.ext.napoleon")
  # napoleon reads a property's or constant's first line "Width of one row (d_h): H*d" as
  # "TYPE: description"; here those docstrings are prose, so napoleon skips them.
  for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
    if listener.handler is napoleon._process_docstring:
      app.disconnect(listener.id)

  def napoleon_but_attributes(app, what, name, obj, options, lines):  # noqa: ANN001
    if what not in ("attribute", "property", "data"):
      napoleon._process_docstring(app, what, name, obj, options, lines)

  app.connect("autodoc-process-docstring", _process, priority=400)
  app.connect("autodoc-process-docstring", napoleon_but_attributes, priority=500)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
