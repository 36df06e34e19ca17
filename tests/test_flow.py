"""The Prefect flow through the CLI, on real servers: a local Prefect server + process worker, the
demo deployment from prefect.yaml run with `prefect deployment run galip-train/demo --watch` on tiny
params (stages through `dvc repro`, MLflow on SQLite in the project), and the cc12m deployment failing
fast here with a message naming what is missing."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import venv_bin

pytestmark = pytest.mark.slow


def prefect(project: Path, server: dict, *args: str, timeout: float = 480) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("prefect"), *args], cwd=project, env=server["env"], capture_output=True, text=True, timeout=timeout, check=False)


def flow_run_message(server: dict, deployment: str) -> tuple[str, str]:
    """(state name, state message) of the latest flow run of galip-train/<deployment>."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async def latest():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])), sort=FlowRunSort.START_TIME_DESC, limit=1
            )
            return runs[0].state.name, runs[0].state.message or ""

    return asyncio.run(latest())


def read_artifact_keys(server: dict) -> set[str]:
    import asyncio

    from prefect.client.orchestration import get_client

    async def keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    return asyncio.run(keys())


def test_demo_deployment_runs_end_to_end_and_cc12m_fails_fast(prefect_server, tiny_project, monkeypatch):
    from mlflow import MlflowClient

    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(k, prefect_server["env"][k])
    deployed = prefect(tiny_project, prefect_server, "--no-prompt", "deploy", "--name", "demo")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    run = prefect(tiny_project, prefect_server, "deployment", "run", "galip-train/demo", "--watch", "--watch-interval", "2")
    log = prefect_server["worker_log"].read_text()
    assert run.returncode == 0, run.stdout[-2000:] + log[-6000:]
    # stage logs streamed into the run log (torchrun's own output included)
    for line in ("[download] dvc repro --single-item download", "[clip] done in", "[train] > torchrun", "[evaluate] done in", "gate: no champion yet"):
        assert line in log, line
    assert {"data-report", "metrics", "mlflow-run", "sample-grid"} <= read_artifact_keys(prefect_server)

    client = MlflowClient(f"sqlite:///{tiny_project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("galip", "champion")
    assert str(client.get_model_version_by_alias("galip", "challenger").version) == str(version.version) == "1"
    mlrun = client.get_run(version.run_id)
    assert "eval/prompt_fidelity" in mlrun.data.metrics and "loss_g" in mlrun.data.metrics
    assert len(client.get_metric_history(mlrun.info.run_id, "loss_g")) == 6, "per-step losses from the torchrun trainer"
    assert mlrun.data.params["train.max_steps"] == "6" and mlrun.data.tags["data.manifest_hash"]
    assert len(mlrun.data.tags["mlflow.source.git.commit"]) == 40
    assert any(k.startswith("system/") for k in mlrun.data.metrics), "system metrics"

    # The flow went through DVC: dvc.lock agrees with what it produced.
    status = subprocess.run([venv_bin("dvc"), "status", "evaluate"], cwd=tiny_project, capture_output=True, text=True, env=prefect_server["env"], check=False)
    assert "up to date" in status.stdout, status.stdout

    # Production deployment on this machine: fails in its preflight within seconds, naming what is missing.
    assert subprocess.run([venv_bin("python"), "-m", "flows.deploy_local", "galip-local"], cwd=tiny_project, env=prefect_server["env"], capture_output=True, check=False).returncode == 0
    t0 = time.monotonic()
    failed = prefect(tiny_project, prefect_server, "deployment", "run", "galip-train/cc12m", "--watch", "--watch-interval", "1", timeout=180)
    assert failed.returncode == 1 and time.monotonic() - t0 < 120
    state, message = flow_run_message(prefect_server, "cc12m")
    assert state == "Failed"
    for needle in ("GPUs", "CLIP weights", "data.url_list"):
        assert needle in message or needle in prefect_server["worker_log"].read_text(), needle
