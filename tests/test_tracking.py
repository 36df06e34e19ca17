"""MLflow failures while training and registering: every failed logging call is counted and reported at
the end of the run; a model that MLflow did not take fails registration with one clear message.

Real stores only: a SQLite tracking store whose run is deleted mid-run (later calls are refused), and a
closed loopback port as the unreachable tracking server.
"""

from __future__ import annotations

import logging

import pytest
from conftest import free_port

from galip.cli import main
from galip.config import load_config
from galip.train import run

from helpers import tiny_config, write_shards


@pytest.fixture
def dead_tracking(monkeypatch) -> str:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries a refused call for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return uri


def _messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "galip.tracking" and r.levelno >= level]


def test_failures_after_the_first_are_counted_and_reported(tmp_path, monkeypatch, caplog):
    import mlflow

    from galip.tracking import FAILURES_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("tracking")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    tracker = Tracker(enabled=True)
    with caplog.at_level(logging.DEBUG, logger="galip.tracking"):
        tracker.log_metrics({"loss_d": 1.0}, 1)
        tracker.log_metrics({"loss_d": 0.9}, 2)
        client.delete_run(run_id)  # from here on the store refuses every write to the run
        for step in range(3, 6):
            tracker.log_metrics({"loss_d": 0.8}, step)
        failures = tracker.report()
    assert failures == 4, "three metric batches and the end-of-run tag"
    first, last = _messages(caplog)
    assert "log_metrics" in first and "further failures are counted" in first
    assert f"4 of 6 logging calls to run {run_id} failed" in last
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == [1, 2]

    client.restore_run(run_id)  # a healthy run gets the count (0) as a tag
    healthy = Tracker(enabled=True)
    healthy.log_metrics({"loss_d": 0.7}, 6)
    assert healthy.report() == 0 and client.get_run(run_id).data.tags[FAILURES_TAG] == "0"


def test_training_against_a_dead_server_finishes_and_reports_the_count(tmp_path, dead_tracking, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    shards = write_shards(tmp_path / "shards", n_samples=16, per_shard=8)
    with caplog.at_level(logging.WARNING):
        result = run(tiny_config(tmp_path, shards, "train.max_steps=2"))
    assert result["step"] == 2 and (tmp_path / "run/checkpoints").is_dir()
    # params, image at step 0, 2 x metrics, 1 x image at step 2, the end-of-run tag
    assert result["mlflow_failures"] >= 5
    first, last = _messages(caplog)
    assert "further failures are counted" in first
    assert f"{result['mlflow_failures']} of {result['mlflow_failures']} logging calls" in last


def test_registration_fails_clearly_when_mlflow_does_not_take_the_model(tiny_checkpoint, dead_tracking, capsys):
    from galip.registry import RegistryError, log_model

    cfg = load_config("params.yaml", profile="demo")
    with pytest.raises(RegistryError, match=r"could not log the model \(MLflow at http://127\.0\.0\.1:\d+, run abc\).*no new version is registered"):
        log_model(cfg, tiny_checkpoint, "abc")
    # The CLI: one error line, exit code 2, no traceback.
    assert main(["register", "--profile", "demo", "--checkpoint", str(tiny_checkpoint), "--run-id", "abc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: could not log the model" in err and dead_tracking in err
