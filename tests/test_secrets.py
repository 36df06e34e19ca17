"""No credential reaches a store: the flow runs with a password in MLFLOW_TRACKING_URI and a
secret key in the environment, then every place the project writes to is scanned for both: the
Prefect server's database and home (flow-run logs, artifacts, events, states, results) and its API
answers, the MLflow database (PostgreSQL) and artifact store (S3 on moto), the run's files, and the
flow's own output. Then once more with the tracking server unreachable (the flow fails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import PG_BIN, free_port

pytestmark = pytest.mark.slow


def run_flow(project: Path, env: dict[str, str], params: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.galip_train", json.dumps(params)],
        cwd=project, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def prefect_api_dump(api: str) -> str:
    """Every flow run, task run, log, artifact and event the Prefect server holds, as JSON text."""
    import urllib.request

    def post(path: str, body: dict) -> str:
        req = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read().decode()

    parts = [post(p, {"limit": 200}) for p in ("/flow_runs/filter", "/task_runs/filter", "/logs/filter", "/artifacts/filter")]
    parts.append(post("/events/filter", {"limit": 50, "filter": {"occurred": {"since": "2000-01-01T00:00:00Z"}}}))
    return "\n".join(parts)


def files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file() and ".git" not in p.parts)


def mlflow_stores_text(postgres_uri: str, s3_endpoint: str) -> str:
    import boto3

    port = postgres_uri.split(":")[-1].split("/")[0]
    dump = subprocess.run([str(PG_BIN / "pg_dump"), "-h", "127.0.0.1", "-p", port, "-U", "galip", "mlflow"], capture_output=True, text=True, check=True).stdout
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bodies = [
        s3.get_object(Bucket="galip-artifacts", Key=o["Key"])["Body"].read().decode("utf-8", "replace")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="galip-artifacts")
        for o in page.get("Contents", [])
    ]
    return dump + "\n".join(bodies)


def test_no_password_or_secret_key_reaches_any_store(prefect_server, mlflow_server, postgres_server, s3_server, tiny_project):
    password, secret_key = f"pw{uuid.uuid4().hex}", f"sk{uuid.uuid4().hex}"
    host = mlflow_server.removeprefix("http://")
    env = {
        **prefect_server["env"],
        "PYTHONPATH": str(tiny_project),
        "MLFLOW_TRACKING_URI": f"http://galip:{password}@{host}",  # the server ignores it; the client sends it
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_ACCESS_KEY_ID": "testing",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }
    # overrides: stages run directly (not through dvc repro), two training steps
    ok = run_flow(tiny_project, env, {"profile": "demo", "overrides": ["train.max_steps=2", "train.ckpt_every=2", "train.sample_every=2"]})
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]

    # the same with the tracking server gone: the flow fails, its error messages must not carry the password
    dead = f"127.0.0.1:{free_port()}"
    down = {**env, "MLFLOW_TRACKING_URI": f"http://galip:{password}@{dead}"}
    failed = run_flow(tiny_project, down, {"profile": "demo", "overrides": ["train.max_steps=2"]})
    assert failed.returncode != 0

    time.sleep(5)  # the Prefect server persists events asynchronously
    api = prefect_api_dump(prefect_server["api"])
    home = Path(prefect_server["env"]["PREFECT_HOME"])
    stores = {
        "prefect api": api,
        "prefect home (database, results)": files_text(home),
        "mlflow database and artifacts": mlflow_stores_text(postgres_server, s3_server),
        "project files (runs, logs)": files_text(tiny_project),
        "flow output": ok.stdout + ok.stderr + failed.stdout + failed.stderr,
    }
    for where, text in stores.items():
        assert password not in text, f"the tracking password is in the {where}"
        assert secret_key not in text, f"the secret key is in the {where}"
    # the scans saw the real thing: the run's MLflow link was logged and stored, with the password masked
    # (the link itself points at the MLflow UI address, GALIP_MLFLOW_UI_URL, which holds no credentials)
    assert "MLflow run" in api
    assert f"galip:***@{dead}" in api, "the failed run's state message, masked"
    assert f"galip:***@{dead}" in failed.stdout + failed.stderr
