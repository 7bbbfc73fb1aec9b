#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 from this machine and installs the pinned set.
# Re-runs the install only when requirements-lock.txt or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.installed"

find_python() {
  local cand
  # 3.12 first: the GPU machine runs Python 3.12.3.
  for cand in "python3.12" "PYENV_VERSION=3.12.1 python3.12" "python3.13" "PYENV_VERSION=3.13.0 python3.13" "python3"; do
    if env $cand -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  if ! PY=$(find_python); then
    echo "error: engram-jax needs Python >= 3.12 (JAX 0.11 requires it); none found." >&2
    echo "       tried python3.12, python3.13, PYENV_VERSION=3.12.1 python3.12, python3." >&2
    echo "       Install one (e.g. 'pyenv install 3.12') and re-run." >&2
    exit 1
  fi
  echo "creating $VENV with: $PY ($(env $PY --version))"
  env $PY -m venv "$VENV"
fi

if [ ! -f "$STAMP" ] || [ requirements-lock.txt -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --quiet -r requirements-lock.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  touch "$STAMP"
fi
