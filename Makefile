# Each target creates or reuses .venv and installs what it needs from pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-all bench lint install

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,hf]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow and not tpu and not gpu" --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/logprobs.py
	@if $(PY) -c "import trl" 2>/dev/null; then $(PY) benchmarks/dpo_vs_trl.py; \
	else echo "make bench: trl is not installed (pip install -e '.[bench]'): benchmarks/dpo_vs_trl.py skipped"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxalign tests tools benchmarks configs launch
	$(VENV)/bin/ruff format --check jaxalign tests tools benchmarks configs launch
