# Two entry points (see README): `make demo` runs the pipeline on the embedded default, `make test` the suite.
# Each installs into .venv first when it is missing or older than pyproject.toml / requirements.lock.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	@# img2dataset pulls the `dataclasses` backport, which shadows the stdlib and breaks Prefect's server.
	$(PY) -m pip uninstall -y -q dataclasses || true
	touch $(STAMP)

test: install
	$(PY) -m pytest -v --durations=15

test-fast: install
	$(PY) -m pytest -v -m "not slow"

demo: install
	$(VENV)/bin/galip train --profile demo

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
