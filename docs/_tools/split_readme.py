"""Moves the reference sections of the long README.md into the site's guides (docs/guides/).

One-time tool for the switch to the landing-page README (issue 18): it splits README.md at
its `## ` headings, writes each section to its guide (headings promoted one level, links
rewritten for their new place), and prints the sections it did not place. Run it on the
final long README, check `make docs`, then replace README.md with docs/README_landing.md;
after that the guides are the home of this text and are edited directly.

    .venv/bin/python docs/_tools/split_readme.py            # writes docs/guides/*.md
    .venv/bin/python docs/_tools/split_readme.py --check    # exit 1 if a guide would change
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDES = ROOT / "docs" / "guides"

# README `## ` heading (prefix match) -> (guide file, its title or None to keep the heading).
SECTIONS: list[tuple[str, str, str | None]] = [
  ("The two commands", "quickstart.md", "Getting started: the two commands"),
  ("Contents", "architecture.md", "Package layout and layering"),
  ("Hashing and tokenizer compression", "hashing.md", None),
  ("The Engram layer", "engram_layer.md", None),
  ("Backbone", "backbone.md", None),
  ("Data pipeline", "data.md", None),
  ("Training", "training.md", "Training and checkpoints"),
  ("Pallas kernels", "kernels.md", None),
  ("GPU status", "kernels.md", None),
  ("Host-resident tables", "offload.md", None),
  ("Generation", "generation.md", None),
  ("Distributed", "distributed.md", None),
  ("Results", "results.md", None),
  ("Notebooks", None, None),  # docs/notebooks/index.md is written by hand
  ("Reliability", "reliability.md", "Reliability guarantees"),
  ("Tests", "testing.md", None),
]

# Links of the README, as they read from a page in docs/guides/.
LINKS: list[tuple[str, str]] = [
  ("(docs/results/", "(../results/"),
  ("(docs/RESULTS.md)", "(../RESULTS.md)"),
  ("(docs/DISTRIBUTED.md)", "(../DISTRIBUTED.md)"),
  ("(docs/DISK_TIER.md)", "(../DISK_TIER.md)"),
  ("(pallas_kernels/README.md)", "(kernels.md#the-kernel-package-pallas-kernels-readme-md)"),
  ("(#reliability-inputs)", "(reliability.md#inputs)"),
  ("(#reliability)", "(reliability.md)"),
  ("(#gpu-status)", "(kernels.md#gpu-status)"),
]

# Appended to a guide after its moved sections.
EXTRA = {
  "distributed.md": ["", "```{toctree}", ":maxdepth: 1", "", "../DISTRIBUTED", "```"],
  "offload.md": ["", "```{toctree}", ":maxdepth: 1", "", "../DISK_TIER", "```"],
  "results.md": ["", "```{toctree}", ":maxdepth: 1", "", "../RESULTS", "```"],
  "testing.md": [
    "",
    "## The documentation build",
    "",
    "`make docs` builds this site into `docs/_build/html` with Sphinx, MyST and myst-nb",
    "(pinned in `requirements-lock.txt`, the `docs` extra of `pyproject.toml`). It is strict:",
    "`-W --keep-going -n -E`, so a broken cross-reference to an `engram_jax` or `pallas_kernels`",
    "name, a dead link between pages, a docstring that reStructuredText cannot read, or a",
    "public name without a docstring summary fails it (names of jax, numpy, flax and the other",
    "libraries below us are not linked: the build downloads nothing). `tests/test_docs.py` runs",
    "the same build in `make test` (about 16 s of CPU) and pins its checks on tiny inputs.",
    "",
    "- **Public names** (`docs/_ext/public_api.py`): each package's `__all__`, and for a public",
    "  module without one its classes, functions and UPPER_CASE constants, plus the public",
    "  methods, properties and `__call__` of every public class. A constant is documented by a",
    "  `#:` comment above its assignment. `docs/_pending_docstrings.txt` is a temporary list of",
    "  names still waiting for their docstring; an entry that got one fails the build until it",
    "  is removed, so the list only shrinks.",
    "- **Docstrings** are read as written (`docs/_ext/docstring_format.py`): Google-style `Args:`",
    "  and `Attributes:` entries, `Returns:` and `Raises:` as free text, and every indented",
    "  block under a line (formulas, shapes, option tables) shown as a literal block.",
    "- **Notebooks** are rendered with the outputs of their last test run: `tests/test_notebooks.py`",
    "  writes the executed copies to `runs/notebooks/`, and the build uses a copy only when its",
    "  cells are exactly the source's (`docs/_ext/notebook_sources.py`); the build executes",
    "  nothing. `make docs-notebooks` runs the notebooks, then builds.",
  ],
  "kernels.md": [
    "",
    "## The kernel package (`pallas_kernels/README.md`)",
    "",
    "```{include} ../../pallas_kernels/README.md",
    ":heading-offset: 2",
    ":start-line: 1",
    "```",
  ],
}


def split(readme: str) -> tuple[list[str], dict[str, list[str]]]:
  """(the README's opening lines, {`## ` heading: its lines}) outside fenced code."""
  head: list[str] = []
  sections: dict[str, list[str]] = {}
  current = head
  fence = None
  for line in readme.splitlines():
    m = re.match(r"^\s*(`{3,}|~{3,})", line)
    if m:
      fence = None if fence and m.group(1).startswith(fence) else (fence or m.group(1))
    if fence is None and line.startswith("## "):
      current = sections.setdefault(line[3:].strip(), [])
    current.append(line)
  return head, sections


def to_guide(lines: list[str], title: str | None, promote: bool = True) -> list[str]:
  """Headings one level up when `promote` (outside code), links rewritten, optional new title."""
  out = []
  fence = None
  for line in lines:
    m = re.match(r"^\s*(`{3,}|~{3,})", line)
    if m:
      fence = None if fence and m.group(1).startswith(fence) else (fence or m.group(1))
    if fence is None and promote and re.match(r"^#{2,6} ", line):
      line = line[1:]
    if fence is None:
      for old, new in LINKS:
        line = line.replace(old, new)
    out.append(line)
  if title:
    out[0] = f"# {title}"
  return out


def guides(readme: str) -> tuple[dict[str, str], list[str]]:
  """{guide file: text}, and the README sections no entry of SECTIONS places."""
  _, sections = split(readme)
  files: dict[str, list[str]] = {}
  placed = set()
  for prefix, name, title in SECTIONS:
    for heading, lines in sections.items():
      if heading.startswith(prefix) and heading not in placed:
        placed.add(heading)
        if name is None:
          continue
        first = name not in files
        body = to_guide(lines, title if first else None, promote=first)
        files.setdefault(name, []).extend(body if first else ["", *body])
  for name, extra in EXTRA.items():
    if name in files:
      files[name].extend(extra)
  texts = {name: "\n".join(lines).rstrip() + "\n" for name, lines in files.items()}
  return texts, [h for h in sections if h not in placed]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
  parser.add_argument("--check", action="store_true", help="exit 1 if a guide differs from the README's section")
  args = parser.parse_args(argv)
  texts, unplaced = guides(args.readme.read_text())
  for heading in unplaced:
    print(f"not placed: ## {heading}", file=sys.stderr)
  changed = [n for n, t in texts.items() if not (GUIDES / n).exists() or (GUIDES / n).read_text() != t]
  if args.check:
    for n in changed:
      print(f"differs: docs/guides/{n}")
    return 1 if changed or unplaced else 0
  GUIDES.mkdir(parents=True, exist_ok=True)
  for name, text in texts.items():
    (GUIDES / name).write_text(text)
    print(f"wrote docs/guides/{name} ({len(text.splitlines())} lines)")
  return 1 if unplaced else 0


if __name__ == "__main__":
  sys.exit(main())
