# engram-jax: the two commands. Each bootstraps .venv from requirements-lock.txt when missing.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test test-e2e train experiments lint clean gpu-check gpu-compile docs docs-notebooks

venv:
	@bash scripts/bootstrap_venv.sh

# lint-imports (the layering contract in pyproject.toml, under a second) runs before the tests.
# The whole programs (notebooks, the GPU-check smoke run, an experiment end to end: about 6 CPU
# minutes) are marked e2e and run by `make test-e2e`, outside the 10-minute suite.
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" JAX_PLATFORMS=cpu
test: venv
	$(VENV)/bin/lint-imports
	$(TEST_ENV) $(PY) -m pytest -n 2 -m "not e2e" --durations=25 tests

test-e2e: venv
	$(TEST_ENV) $(PY) -m pytest -n 2 -m e2e --durations=10 tests

train: venv
	$(PY) -m experiments.compare --workdir=runs/default

experiments: venv
	$(PY) -m experiments.run_all --workdir=runs/experiments

# One formatter (ruff format: 2-space indent, line length 120, pyproject.toml) and the linters.
lint: venv
	$(PY) -m ruff format --check engram_jax pallas_kernels experiments tests docs/conf.py docs/_ext
	$(PY) -m ruff check engram_jax pallas_kernels experiments tests docs/conf.py docs/_ext
	$(VENV)/bin/lint-imports

# The documentation site (Sphinx + MyST + myst-nb) into docs/_build/html. Strict: any warning
# (a broken cross-reference, a public name without a docstring, a dead internal link) fails
# it. -E: a fresh environment every time, so no warning hides in a cached page. Notebooks are
# shown with the outputs of their last test run (runs/notebooks/); docs-notebooks reruns them.
DOCS_FLAGS ?= -b html -n -W --keep-going -E -j 1
docs: venv
	JAX_PLATFORMS=cpu $(PY) -m sphinx $(DOCS_FLAGS) -d docs/_build/doctrees docs docs/_build/html
	@echo "site: docs/_build/html/index.html"

docs-notebooks: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -p no:xdist tests/test_notebooks.py
	$(MAKE) docs

# On a machine with one GPU (< 6 min on an H200). Uses .venv when there is one, else the
# system python3 (the GPU image as is: no venv is created); override with GPU_PY=...
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_OUT ?= runs/gpu_check
gpu-check:
	$(GPU_PY) -m experiments.gpu_check --out=$(GPU_CHECK_OUT)

# No GPU needed: compiles both Mosaic GPU kernels for an H200 (sm_90a) through ptxas. Installs
# requirements-gpu-compile.txt (240 MB of wheels: CUDA plugin + ptxas) into $(GPU_COMPILE_DIR) once.
GPU_COMPILE_DIR ?= .gpu_compile
gpu-compile: venv
	@test -f $(GPU_COMPILE_DIR)/.installed || ($(PY) -m pip install --no-deps --target $(GPU_COMPILE_DIR) \
	    -r requirements-gpu-compile.txt && touch $(GPU_COMPILE_DIR)/.installed)
	JAX_PLATFORMS=cpu PYTHONPATH=$(GPU_COMPILE_DIR):. $(PY) -m pytest -p no:xdist -q \
	    tests/test_gpu_check.py -k "compile_sm90 or parse_ptxas"

clean:
	rm -rf $(VENV) runs .jax_cache docs/_build docs/notebooks/*.ipynb
