"""The built-in corpus and the stable train/validation split. Standard library only.

The default corpus is the running interpreter's own standard library (`*.py` under
`sysconfig.get_paths()["stdlib"]`, ~32 MB with tests, ~12 MB without): it exists on every
fresh machine and needs no download. Files are keyed by their path relative to the stdlib
root, so the corpus and its split are identical on every machine with the same Python.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

#: Name of the training split (`split_of` assigns every document to one split).
TRAIN = "train"
#: Name of the validation split.
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)

_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Installed third-party code, build configuration and platform-specific generated modules
# (_sysconfigdata_<abi>_<platform>.py) differ between machines: never part of the corpus.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SKIP_PREFIXES = ("_sysconfigdata", "config-")


def stable_hash(key: str) -> int:
  """64-bit hash of a string that is the same in every process and on every machine.

  Python's `hash()` of a str is salted per process (PYTHONHASHSEED); this is BLAKE2b.
  """
  return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def split_of(key: str, validation_fraction: float) -> str:
  """TRAIN or VALIDATION for a document key: validation iff its hash falls in the lowest
  `validation_fraction` of the 64-bit range."""
  return VALIDATION if stable_hash(key) < validation_fraction * 2.0**64 else TRAIN


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = True, root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
  """Non-empty `*.py` files of the standard library, sorted: [(relative key, path)].

  Args:
    include_tests: keep the `test`/`tests`/`idle_test` packages (~20 MB of the ~32 MB).
    root: the stdlib directory; defaults to the running interpreter's.
  """
  root = Path(root) if root is not None else stdlib_root()
  if not root.is_dir():
    raise ValueError(f"standard library directory {root} does not exist")
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = Path(dirpath).relative_to(root)
    dirnames[:] = sorted(
      d
      for d in dirnames
      if d not in _SKIP_DIRS and not d.startswith(_SKIP_PREFIXES) and (include_tests or d not in _TEST_DIRS)
    )
    for name in filenames:
      if not name.endswith(".py") or name.startswith(_SKIP_PREFIXES):
        continue
      path = Path(dirpath) / name
      if path.stat().st_size == 0:  # the many empty __init__.py files carry no text
        continue
      out.append(((rel_dir / name).as_posix(), path))
  out.sort(key=lambda kv: kv[0])
  return out
