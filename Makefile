# Two commands on a fresh Linux machine with Python 3.11+:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: run test install install-test loadtest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml loadtests/pyproject.toml | $(BIN)/python
	@avail=$$(df -Pk . | awk 'NR==2 {print int($$4/1048576)}'); \
	  if [ "$$avail" -lt 14 ]; then echo "warning: $$avail GiB free here; the test install needs about 14 GiB at its peak (11 GiB stay)" >&2; fi
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,vllm]' -e ./loadtests
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## Start gateway + worker + embedded Redis on http://127.0.0.1:8000 (tiny demo model unless SR3D_MODEL is set)
run: install
	$(BIN)/sr3d serve

## Install everything (vLLM 0.24 CPU half included) and run the whole test suite
test: install-test
	$(BIN)/python -m pytest -q -ra

## A short load run against a service started for it (JSON + PNG under bench-out/)
loadtest: install-test
	$(BIN)/sr3d bench service --out bench-out/service

clean:
	rm -rf $(VENV) var .pytest_cache bench-out
