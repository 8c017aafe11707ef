# gpudeck — two commands on a fresh machine: `make run` and `make test`.
# Everything is installed into .venv from uv.lock by uv, which itself lives in .tools/.

UV_VERSION := 0.13.8
PYTHON ?= python3
UV := .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin
MEMBERS := $(wildcard protos/pyproject.toml services/*/pyproject.toml graphql/pyproject.toml)

.PHONY: run test lint lint-fix protos protos-check bench sync lock clean

run: $(VENV)/.synced
	@$(BIN)/gpudeck up --demo

test: $(VENV)/.synced
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.synced
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy src protos/generate.py services/*/src graphql/src

lint-fix: $(VENV)/.synced
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: $(VENV)/.synced
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python protos/generate.py

protos-check: $(VENV)/.synced
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python protos/generate.py --check

bench: $(VENV)/.synced
	$(BIN)/python -m bench $(BENCH_ARGS)

sync: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install -q "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) uv.lock pyproject.toml $(MEMBERS)
	$(UV) sync --frozen --all-packages --python $(PYTHON)
	touch $@

lock: $(UV)
	$(UV) lock --python $(PYTHON)

clean:
	rm -rf .venv .tools .gpudeck .pytest_cache .mypy_cache .ruff_cache
