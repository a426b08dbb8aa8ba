# One entry point. `make run` starts the service on the embedded store; `make test`
# runs every test, starting PostgreSQL/PostGIS and Redis first where it can.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || ls -1 $$HOME/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -n 1)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint generate bench services clean

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or set PYTHON=" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/tracking serve $(ARGS)

services:
	bash scripts/test_services.sh

test: $(STAMP) services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

generate: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy tracking_grpc

clean:
	rm -rf $(VENV)
