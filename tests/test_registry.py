"""MLflow registry on a real tracking server (PostgreSQL backend store, artifacts on loopback S3):
pyfunc logging, registration with alias challenger, and the champion gate in both directions."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from galip.config import load_config

pytestmark = pytest.mark.slow


def gate_config(name: str, direction: str = "higher", bar: float | None = None):
    bar = (0.0 if direction == "higher" else 1000.0) if bar is None else bar
    return load_config(
        "params.yaml",
        [f"mlflow.model_name={name}", "mlflow.gate_metric=prompt_fidelity", f"mlflow.gate_direction={direction}", f"mlflow.gate_bar={bar}"],
        profile="demo",
    )


def register_candidate(cfg, checkpoint: Path, value: float, tmp_path: Path) -> dict:
    from galip.ops.registry import register_from_files

    metrics = tmp_path / f"metrics-{uuid.uuid4().hex[:6]}.json"
    metrics.write_text(json.dumps({"prompt_fidelity": value, "r_precision": 0.1, "protocol": {"checkpoint": str(checkpoint)}}))
    return register_from_files(cfg, metrics, None, None)


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    return mlflow.MlflowClient(mlflow_server)


def test_gate_promotes_a_better_candidate_and_keeps_champion_for_a_worse_one(tracking, tiny_checkpoint, tmp_path, s3_server):
    import boto3

    cfg = gate_config(f"galip-gate-{uuid.uuid4().hex[:6]}")
    name = cfg.mlflow.model_name

    first = register_candidate(cfg, tiny_checkpoint, 0.50, tmp_path)
    assert first["promoted"] and first["champion_version"] == first["version"] == "1"
    better = register_candidate(cfg, tiny_checkpoint, 0.70, tmp_path)
    assert better["promoted"], better["reason"]
    worse = register_candidate(cfg, tiny_checkpoint, 0.60, tmp_path)
    assert not worse["promoted"] and "does not beat champion v2 (0.7)" in worse["reason"] and "champion stays v2" in worse["reason"]
    assert worse["champion_version"] == "2", "a version string like the others (the flow writes 'v' + it)"

    assert tracking.get_model_version_by_alias(name, "champion").version == better["version"] == "2"
    assert tracking.get_model_version_by_alias(name, "challenger").version == worse["version"] == "3"
    assert tracking.get_model_version(name, "3").tags["gate_decision"] == worse["reason"]

    # Artifacts went through the tracking server to the S3 bucket (moto), not to a local folder.
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="galip-artifacts").get("Contents", [])]
    assert any(k.endswith("artifacts/generator.pt") for k in keys), keys[:20]
    assert any(k.endswith("artifacts/galip-tiny.pt") for k in keys), "the CLIP weights travel with the model"


def test_gate_needs_the_bar_and_writes_rule_and_decision_rounded_into_the_description(tracking, tiny_checkpoint, tmp_path):
    cfg = gate_config(f"galip-bar-{uuid.uuid4().hex[:6]}", bar=1.5)
    name = cfg.mlflow.model_name
    low = register_candidate(cfg, tiny_checkpoint, 1.399999976158142, tmp_path)  # a float32 1.4, as metrics.json holds it
    assert not low["promoted"] and low["champion_version"] is None
    assert low["reason"] == "v1 prompt_fidelity=1.4 misses the bar (at least 1.5); no champion yet"
    version = tracking.get_model_version(name, "1")
    assert version.tags["prompt_fidelity"] == "1.4" and version.tags["gate_decision"] == low["reason"]
    assert "**Gate rule**: `champion` moves to a new version when its `prompt_fidelity` is at least 1.5 (`mlflow.gate_bar`)" in version.description
    # the registered-models list shows the first line as it is: plain text, no markdown
    assert version.description.splitlines()[0] == f"Gate decision: {low['reason']}."
    assert "prompt_fidelity 1.4," in version.description
    assert ("**How prompt_fidelity is made**: `prompt_fidelity = 0.5 * prompt_fidelity_held_in_attr_mean + "
            "0.5 * prompt_fidelity_held_out_all_attrs`") in version.description
    high = register_candidate(cfg, tiny_checkpoint, 2.0, tmp_path)
    assert high["promoted"] and "meets the bar (at least 1.5) and there is no champion yet: v2 becomes champion" in high["reason"]
    assert tracking.get_model_version_by_alias(name, "champion").version == "2"


def test_gate_lower_is_better_and_manual_champion_without_metric(tracking, tiny_checkpoint, tmp_path):
    cfg = gate_config(f"galip-gate-{uuid.uuid4().hex[:6]}", direction="lower")
    name = cfg.mlflow.model_name
    first = register_candidate(cfg, tiny_checkpoint, 30.0, tmp_path)
    higher = register_candidate(cfg, tiny_checkpoint, 40.0, tmp_path)
    assert first["promoted"] and not higher["promoted"]
    lower = register_candidate(cfg, tiny_checkpoint, 20.0, tmp_path)
    assert lower["promoted"] and tracking.get_model_version_by_alias(name, "champion").version == "3"

    # A person promotes by hand (MLflow UI) a version registered without metrics: the gate cannot
    # compare with it, so it leaves that choice alone and says why.
    import mlflow

    from galip.ops.registry import log_model

    run = tracking.create_run(tracking.get_experiment_by_name(cfg.mlflow.experiment).experiment_id)
    manual = mlflow.register_model(log_model(cfg, tiny_checkpoint, run.info.run_id), name)
    tracking.set_registered_model_alias(name, "champion", manual.version)
    from galip.ops.registry import gate

    decision = gate(cfg, "3", 10.0)
    assert not decision.promoted and "has no prompt_fidelity" in decision.reason
    assert tracking.get_model_version_by_alias(name, "champion").version == manual.version


def test_champion_loads_as_pyfunc_and_generates_pngs(tracking, tiny_checkpoint, tmp_path):
    import mlflow
    import pandas as pd

    from galip.ops.serving import decode_png

    cfg = gate_config(f"galip-load-{uuid.uuid4().hex[:6]}")
    register_candidate(cfg, tiny_checkpoint, 0.5, tmp_path)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.model_name}@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a red circle on the left", "two green triangles"]}), params={"n": 2, "seed": 3})
    assert list(out.columns) == ["prompt", "index", "image"] and len(out) == 4
    images = [decode_png(b) for b in out["image"]]
    assert all(img.size == (64, 64) and img.mode == "RGB" for img in images)
    again = model.predict(pd.DataFrame({"prompt": ["a red circle on the left", "two green triangles"]}), params={"n": 2, "seed": 3})
    assert again["image"].tolist() == out["image"].tolist(), "same seed, same images"
    assert out["image"][0] != out["image"][2], "different prompts give different images"
    with pytest.raises(Exception, match="prompt"):
        model.predict(pd.DataFrame({"text": ["x"]}))
