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
# No MPLBACKEND here: Jupyter kernels must draw inline (an exported Agg backend hides every figure of the
# notebooks, in `make run` and in `make lab`); scripts that only save files pick Agg themselves.

.PHONY: setup test run figures lab explorer bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# (grep drops this machine's pip-config noise about missing local index folders; pip's exit code is kept)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory"; test $${PIPESTATUS[0]} -eq 0
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The notebook series in teaching mode (SMOKE=False): executed copies in $(BUILD)/notebooks (figures inline),
# a static course site in $(BUILD)/html, figure files in $(BUILD)/figures. The checkout stays clean.
run: $(STAMP)
	$(PY) -m infusing_kit.teaching.notebook_runner --out $(BUILD)/notebooks --figures $(BUILD)/figures --html $(BUILD)/html

# After `make run`: refresh the committed figures/ (what README shows) from $(BUILD)/figures.
figures:
	@test -d $(BUILD)/figures || { echo "no $(BUILD)/figures: run 'make run' first"; exit 1; }
	cp $(BUILD)/figures/*.png $(BUILD)/figures/*.svg figures/

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

# The ablation explorer (chapter 11) as a page: Voila on 127.0.0.1:$(PORT), no code shown, nothing fetched from
# the internet (share/jupyter/voila/templates/offline: Voila's lab template without its CDN stylesheets).
PORT ?= 8866
# COMPARISON=DIR: a `compare --out` folder (or a registry file) instead of the committed comparison.
explorer: $(STAMP)
	cd notebooks && $(if $(COMPARISON),EXPLORER_COMPARISON=$(abspath $(COMPARISON))) \
		JUPYTER_PATH=$(CURDIR)/share/jupyter ../$(VENV)/bin/voila explorer_page.ipynb \
		--port=$(PORT) --Voila.ip=127.0.0.1 --no-browser --template=offline

bench: $(STAMP)
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_knn.py

clean:
	rm -rf $(BUILD) .pytest_cache
