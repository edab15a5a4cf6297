# shadowproxy — the few commands a developer and CI need. Each target is a few lines.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install run test lint pytest test-faults clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install  ## two demo models + the proxy on SQLite, a little traffic, then keeps serving
	$(VENV)/bin/shadowproxy demo

lint: install
	$(VENV)/bin/ruff check shadowproxy tests bench
	$(VENV)/bin/ruff format --check shadowproxy tests bench
	$(VENV)/bin/mypy --strict shadowproxy
	$(VENV)/bin/lint-imports

pytest: install deploy-tools
	$(VENV)/bin/pytest -q

test: lint pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .import_linter_cache

-include deploy/deploy.mk
-include bench/bench.mk
