# One command for everything tests need: system packages, a virtualenv, then lint + the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test deps venv lint run clean

test: deps lint
	$(BIN)/pytest -q

deps: venv
	@bash scripts/install-system-deps.sh

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@bash scripts/install-system-deps.sh --python-only
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

lint: venv
	$(BIN)/ruff check src tests $(wildcard bench scripts)

run: venv
	$(BIN)/wardgate start

clean:
	rm -rf $(VENV) wardgate-data .pytest_cache .ruff_cache
