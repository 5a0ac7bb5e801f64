# `make demo` and `make test` create .venv/ on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Pins torch to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
PIP := $(VENV)/bin/pip install --quiet -c constraints.txt

BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.lock
	$(PIP) --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayq compress jobs/minilm.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The peers the benchmark compares against (torchao) install only here, so `make test` stays lean.
$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(PIP) -r bench/requirements.txt
	touch $(BENCH_STAMP)

# Writes bench/results.json and bench/RESULTS.md; run it on an otherwise idle machine.
bench: $(BENCH_STAMP)
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
