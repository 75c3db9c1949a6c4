PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.test-deps: requirements.txt requirements-test.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
