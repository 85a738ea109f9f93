# Two commands on a fresh machine:  `make run`  (the notebook series)  and  `make test`.
# Both create .venv when it is missing or out of date (pyproject.toml / constraints.txt changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD ?= build

export HF_HUB_OFFLINE ?= 1
export INFUSING_KIT_CACHE ?= $(CURDIR)/.cache
export MPLBACKEND ?= Agg

.PHONY: setup test run lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# (grep drops this machine's pip-config noise about missing local index folders; pip's exit code is kept)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory"; test $${PIPESTATUS[0]} -eq 0
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The notebook series in teaching mode (SMOKE=False): executed copies in $(BUILD)/notebooks, figures in figures/.
run: $(STAMP)
	$(PY) -m infusing_kit.notebook_runner --out $(BUILD)/notebooks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

bench: $(STAMP)
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_knn.py

clean:
	rm -rf $(BUILD) .pytest_cache
