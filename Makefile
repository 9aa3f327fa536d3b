# The two commands of the README: `make run` (the pipeline on the embedded default data)
# and `make test` (the test suite). Both set up .venv first, and only when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

POOL   ?= llm-gpu
# The browser the web-page test drives: Debian's chromium (Playwright's own download needs the internet).
CHROMIUM ?= /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test ui stop worker clean help experiments experiment experiments-list

help:            ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv and install the project (skipped when nothing changed)

# torch first and pinned: the CPU build on this machine's disk, not a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: setup       ## run the whole pipeline (dvc repro) against a local Prefect server
	$(PY) -m flows.pipeline

# Test workers (pytest-xdist), each taking a whole test file: the long end-to-end files run side by
# side, and one file's tests wait on servers and subprocesses while the other's compute. 0: one process.
TEST_WORKERS ?= 2

test: setup $(CHROMIUM)  ## lint (ruff), then run the test suite (TEST_WORKERS=0: in one process)
	$(VENV)/bin/ruff check .
	CHROMIUM=$(CHROMIUM) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "no apt-get: install Chromium and run make test CHROMIUM=/path/to/it"; exit 1; }
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

ui: setup        ## start the Prefect and MLflow UIs on 127.0.0.1 and print their URLs
	$(PY) -m flows.ui start

stop: setup      ## stop the UIs / local Prefect server started by `make run` or `make ui`
	$(PY) -m flows.ui stop

worker: setup    ## start a Prefect worker for the pool POOL (default llm-gpu) on this host
	$(PY) -m flows.worker --pool $(POOL)

experiments: setup  ## run every experiment of experiments.yaml; reports in data/experiments/index.html
	$(PY) -m flows.experiments --all

experiment: setup   ## run one experiment: make experiment NAME=clipping
	@test -n "$(NAME)" || { echo "usage: make experiment NAME=<name> (make experiments-list shows them)"; exit 2; }
	$(PY) -m flows.experiments $(NAME)

experiments-list: setup  ## list the experiments with their runs and estimated time
	$(PY) -m flows.experiments --list

clean:           ## remove pipeline outputs and local tracking databases (keeps .venv)
	rm -rf data/*/ mlflow.db mlruns .prefect dvc.lock .cache/downloads
