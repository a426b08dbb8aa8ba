# One entry point. `make run` starts the service on the embedded store; `make test`
# runs every test, starting PostgreSQL/PostGIS and Redis first where it can.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || ls -1 $$HOME/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -n 1)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The load tool's Node.js device driver (bench/load.py --device-driver node); the
# tests run it, `make run` does not need it.
NODE_DRIVER := bench/node_driver
NODE_STAMP := $(NODE_DRIVER)/node_modules/.installed-stamp

.PHONY: run test lint generate services clean node-driver

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or set PYTHON=" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(NODE_STAMP): $(NODE_DRIVER)/package.json $(NODE_DRIVER)/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: the load tool's node device driver (and its tests) need Node.js and npm" >&2; exit 1; }
	cd $(NODE_DRIVER) && npm ci --ignore-scripts --no-audit --no-fund
	touch $(NODE_STAMP)

node-driver: $(NODE_STAMP)

run: $(STAMP)
	$(BIN)/tracking serve $(ARGS)

services:
	bash scripts/test_services.sh

test: $(STAMP) $(NODE_STAMP) services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

generate: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(NODE_DRIVER)/node_modules
