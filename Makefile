# engram-jax: the two commands. Each bootstraps .venv from requirements-lock.txt when missing.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test train experiments lint clean

venv:
	@bash scripts/bootstrap_venv.sh

# lint-imports (the layering contract in pyproject.toml, under a second) runs before the tests.
test: venv
	$(VENV)/bin/lint-imports
	XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
	    JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 tests

train: venv
	$(PY) -m experiments.compare --workdir=runs/default

experiments: venv
	$(PY) -m experiments.run_all --workdir=runs/experiments

lint: venv
	$(PY) -m ruff check engram_jax pallas_kernels experiments tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs .jax_cache
