# Two entry points for a fresh clone, with nothing activated: `make repro` (install + whole
# pipeline) and `make test` (install + whole test suite). Both are idempotent.
# VENV names the virtual environment to create or use (`make repro VENV=/path/to/venv`).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A user with a GPU gets the CUDA build torch's index picks; CI pre-installs the CPU build.
TORCH ?= torch>=2.4
export DVC_NO_ANALYTICS := 1
# DVC runs each stage as `python stages/<name>.py` with the PATH it was given: the venv's bin
# first on PATH makes that `python` the venv's, as `source $(VENV)/bin/activate` would.
ACTIVATED := PATH="$(abspath $(VENV))/bin:$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"

.PHONY: install repro test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

repro: install
	$(ACTIVATED) $(VENV)/bin/dvc repro

test: install
	$(ACTIVATED) $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/tokenizer.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/generate.py

clean-venv:
	rm -rf $(VENV)
