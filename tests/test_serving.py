"""`mlflow models serve -m models:/<name>@champion` answers a prompt with PNG images over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.request
import uuid

import pytest
from conftest import (
    free_port,
    http_ok,
    start_process,
    stop_process,
    venv_bin,
    wait_until,
)

from test_faults import BAD_REQUESTS

pytestmark = pytest.mark.slow


def _post_error(port: int, data: dict, params: dict) -> tuple[int, str]:
    """(HTTP status, error message) of a request the server must refuse."""
    import urllib.error

    columns = list(data)
    body = {"dataframe_split": {"columns": columns, "data": [list(r) for r in zip(*data.values())]}, "params": params}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()).get("message", "")


def test_served_champion_answers_a_prompt_with_an_image(mlflow_server, tiny_checkpoint, tmp_path, monkeypatch):
    from galip.config import load_config
    from galip.ops.registry import register_from_files
    from galip.ops.serving import decode_png

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"galip-serve-{uuid.uuid4().hex[:6]}"
    cfg = load_config("params.yaml", [f"mlflow.model_name={name}"], profile="demo")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"prompt_fidelity": 40.0, "protocol": {"checkpoint": str(tiny_checkpoint)}}))
    assert register_from_files(cfg, metrics, None, None)["promoted"]

    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_process(
        [venv_bin("mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        log, {"MLFLOW_TRACKING_URI": mlflow_server},
    )  # fmt: skip
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), 180, "mlflow models serve", proc, log)
        body = {"dataframe_split": {"columns": ["prompt"], "data": [["a red circle on the left"]]}, "params": {"n": 2, "seed": 7}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            rows = json.loads(resp.read())["predictions"]
        refusals = [_post_error(port, data, params) for data, params, _, _ in BAD_REQUESTS]
    finally:
        stop_process(proc)
    for (status, message), (data, params, reason, http_reason) in zip(refusals, BAD_REQUESTS):
        assert status == 400 and (http_reason or reason) in message, (data, params, status, message)
    assert [r["index"] for r in rows] == [0, 1] and all(r["prompt"] == "a red circle on the left" for r in rows)
    images = [decode_png(r["image"]) for r in rows]
    assert all(img.size == (64, 64) for img in images)
    assert rows[0]["image"] != rows[1]["image"], "two latents, two images"
