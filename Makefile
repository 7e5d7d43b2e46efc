# Two commands do all the set-up on a fresh Debian machine:
#   make run    builds and runs the example (creates .venv, installs what it needs)
#   make test   runs the test suite (creates .venv, installs test dependencies)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test venv clean

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "installing python3-venv (apt)"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

run: venv
	@bash scripts/run-example.sh

test: venv
	@bash scripts/test.sh

clean:
	rm -rf $(VENV) .pytest_cache
