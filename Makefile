VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: docs setup demo test test-unit test-integration test-lab lint check bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m orchestrator demo

test: setup
	$(PYTEST) -q -m "not lab"

test-unit: setup
	$(PYTEST) -q tests/unit

test-integration: setup
	$(PYTEST) -q -m integration

# Real QEMU guests under namespaced libvirt daemons (root; installs the lab packages).
test-lab:
	VMHA_LAB=1 bash scripts/setup.sh
	$(PYTEST) -q -m lab tests/lab

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Lint first (fast), then every test.
check: lint test

bench: setup
	mkdir -p results
	$(PY) -m bench.lease_loss --trials 50 --out results/bench-lease-loss.json

# Regenerate docs/cli/*.md from real runs against a local cluster.
docs: setup
	$(PY) scripts/gen_cli_docs.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache results
