# Two commands matter: `make run` (the server on the embedded default) and `make test` (everything).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
INTEROP := tests/interop
INTEROP_STAMP := $(INTEROP)/node_modules/.installed-stamp

.PHONY: run test lint typecheck pytest interop proto clean

run: $(STAMP)
	$(BIN)/mailslot serve

test: $(STAMP) $(INTEROP_STAMP) lint typecheck pytest interop

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(INTEROP_STAMP): $(INTEROP)/package.json $(INTEROP)/package-lock.json
	cd $(INTEROP) && npm ci --no-audit --no-fund
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q -rs

interop: $(STAMP) $(INTEROP_STAMP)
	cd $(INTEROP) && npm test

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --pyi_out=src src/mailslot/protocol/*.proto

clean:
	rm -rf $(VENV) $(INTEROP)/node_modules
