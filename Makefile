# Two entry points (see README): `make demo` runs the pipeline on the embedded default, `make test` the suite.
# Each installs into .venv first when it is missing or older than pyproject.toml / requirements.lock.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Telemetry and update checks off for everything make starts (the list: galip/telemetry.env).
include galip/telemetry.env
export $(shell sed -n 's/^\([A-Z_]*\)=.*/\1/p' galip/telemetry.env)
# Tools the pipeline and tests start by name (uvicorn for `mlflow models serve`, dvc, prefect, galip,
# torchrun) must resolve to the project's environment even when it is not activated.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install test test-fast demo ui stop clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	@# img2dataset pulls the `dataclasses` backport, which shadows the stdlib and breaks Prefect's server.
	$(PY) -m pip uninstall -y -q dataclasses || true
	touch $(STAMP)

# Two workers (tests/conftest.py says why), then the tests that compare speeds, alone.
test: install
	$(PY) -m pytest -v --durations=15 -n 2 --maxschedchunk 1 -m "not alone"
	$(PY) -m pytest -v -m alone

test-fast: install
	$(PY) -m pytest -v -m "not slow and not alone" -n 2 --maxschedchunk 1

# The pipeline on the embedded default: local Prefect server + worker, galip-train/demo, where to look.
demo: install
	scripts/demo.sh

# Serve (or keep) the Prefect UI and the MLflow UI at the addresses `make demo` printed, with the local
# worker, so a run started from the UI or the CLI (galip-train/cc12m too) starts; `make stop` stops them.
ui: install
	@source scripts/prefect-local.sh && prefect_server_up && prefect_worker_up && deploy_local_cc12m && mlflow_ui_up && \
	  $(PY) scripts/demo_summary.py "$$PREFECT_UI_URL" "$$GALIP_MLFLOW_UI_URL" ui

# Stops flow runs of the local worker first (recorded as crashed), then worker, Prefect server, MLflow UI.
stop:
	@source scripts/prefect-local.sh && prefect_down && echo "stopped the local flow runs, worker, Prefect server and MLflow UI"

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
