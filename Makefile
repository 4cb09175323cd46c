# `make run`: install into .venv and run one ablation arm on CPU. `make test`: install and test.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/lora_jax/cocohd_oproj_fc2
CONFIG ?= configs/cocohd_oproj_fc2.py:runlocal

.PHONY: run test lint install install-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements/cpu.lock | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements/cpu.lock
	touch $@

$(VENV)/.test: requirements/test.lock requirements/cpu.lock requirements/launch.lock | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements/test.lock
	$(PY) -m pip install -q -r requirements/launch.lock
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-test: $(VENV)/.test

run: install
	$(PY) main.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: install-test
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile --durations=15 tests

lint: install-test
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .
