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

pytestmark = pytest.mark.slow


def test_served_champion_answers_a_prompt_with_an_image(mlflow_server, tiny_checkpoint, tmp_path, monkeypatch):
    from galip.config import load_config
    from galip.registry import register_from_files
    from galip.serving import decode_png

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
    finally:
        stop_process(proc)
    assert [r["index"] for r in rows] == [0, 1] and all(r["prompt"] == "a red circle on the left" for r in rows)
    images = [decode_png(r["image"]) for r in rows]
    assert all(img.size == (64, 64) for img in images)
    assert rows[0]["image"] != rows[1]["image"], "two latents, two images"
