"""MLflow failures while training and registering: every failed logging call is counted and reported at
the end of the run; a model that MLflow did not take fails registration with one clear message.

Real stores only: a SQLite tracking store whose run is deleted mid-run (later calls are refused), and a
closed loopback port as the unreachable tracking server.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import free_port
from PIL import Image

from galip.cli import main
from galip.config import load_config
from galip.train.trainer import run

from helpers import black_hole, eval_clip_checkpoint, tiny_config, write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dead_tracking(monkeypatch) -> str:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries a refused call for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return uri


def _messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "galip.tracking" and r.levelno >= level]


def _settings(backoff_s: float = 0.0):
    return load_config("params.yaml", [f"mlflow.outage_backoff_s={backoff_s}"], profile="demo").mlflow


def _tracker_on_sqlite(tmp_path, monkeypatch, name: str):
    import mlflow

    from galip.ops.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(name)).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    # An in-process mlflow.set_tracking_uri elsewhere (the registry, an earlier test) must not redirect
    # the logs of the run the environment names.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")  # also sets the variable: set it back
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        return client, run_id, Tracker(enabled=True, settings=_settings())
    finally:
        mlflow.set_tracking_uri(previous)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)


def _log_through_an_outage(client, run_id, tracker) -> None:
    """Steps 1-2 logged; then the store refuses every write to the run (an outage) for steps 3-5."""
    tracker.log_metrics({"loss_d": 1.0}, 1)
    tracker.log_metrics({"loss_d": 0.9}, 2)
    tracker.flush()
    client.delete_run(run_id)
    for step in range(3, 6):
        tracker.log_metrics({"loss_d": 0.8}, step)


def test_calls_missed_in_an_outage_are_replayed_when_the_store_answers_again(tmp_path, monkeypatch, caplog):
    from galip.ops.tracking import FAILURES_TAG

    client, run_id, tracker = _tracker_on_sqlite(tmp_path, monkeypatch, "replay")
    with caplog.at_level(logging.DEBUG, logger="galip.tracking"):
        _log_through_an_outage(client, run_id, tracker)
        tracker.flush()
        assert tracker.failures == 3
        client.restore_run(run_id)  # it answers again: the next call brings the missed ones first
        tracker.log_metrics({"loss_d": 0.7}, 6)
        assert tracker.report() == 0
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run_id).data.tags[FAILURES_TAG] == "0"
    first, replayed = _messages(caplog)
    assert "log_metrics" in first and "training goes on without waiting" in first and "replayed when it answers" in first
    assert "3 call(s) not logged during the outage were replayed" in replayed


def test_logging_calls_return_at_once_while_the_tracking_server_does_not_answer(monkeypatch, caplog):
    import time

    from galip.ops.tracking import Tracker

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    with black_hole() as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        # 2 retries of 2 s each: the profile's bound per request, scaled down so the test is short
        settings = load_config("params.yaml", ["mlflow.request_timeout_s=2", "mlflow.outage_backoff_s=60"], profile="demo").mlflow
        tracker = Tracker(enabled=True, settings=settings)
        with caplog.at_level(logging.WARNING, logger="galip.tracking"):
            for step in range(1, 6):
                t0 = time.monotonic()
                tracker.log_metrics({"loss_d": 1.0}, step)
                assert time.monotonic() - t0 < 0.5, "the training thread does not wait for the server"
            t0 = time.monotonic()
            assert tracker.report() == 6, "5 metric batches and the end-of-run tag, none logged"
            assert time.monotonic() - t0 < 2 * 3 * 2 + 20, "each request bounded by the HTTP settings, the rest not sent"
    first, last = _messages(caplog)
    assert "training goes on without waiting for it" in first and "tried again every 60 s" in first
    assert "6 of 6 logging calls" in last


def test_failures_after_the_first_are_counted_and_reported(tmp_path, monkeypatch, caplog):
    client, run_id, tracker = _tracker_on_sqlite(tmp_path, monkeypatch, "tracking")
    with caplog.at_level(logging.DEBUG, logger="galip.tracking"):
        _log_through_an_outage(client, run_id, tracker)
        failures = tracker.report()
    assert failures == 4, "three metric batches and the end-of-run tag"
    first, last = _messages(caplog)
    assert "log_metrics" in first and "training goes on" in first
    assert f"4 of 6 logging calls to run {run_id} failed or were not sent" in last
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == [1, 2]


def test_training_against_a_dead_server_finishes_and_reports_the_count(tmp_path, dead_tracking, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    shards = write_shards(tmp_path / "shards", n_samples=16, per_shard=8)
    with caplog.at_level(logging.WARNING):
        result = run(tiny_config(tmp_path, shards, "train.max_steps=2"))
    assert result["step"] == 2 and (tmp_path / "run/checkpoints").is_dir()
    # 2 x image at step 0 (history, newest), 2 x metrics, 2 x image for step 2, the end-of-run tag
    assert result["mlflow_failures"] >= 5
    first, last = _messages(caplog)
    assert "training goes on" in first
    assert f"{result['mlflow_failures']} of {result['mlflow_failures']} logging calls" in last


def test_registration_fails_clearly_when_mlflow_does_not_take_the_model(tiny_checkpoint, dead_tracking, capsys, tmp_path):
    from galip.ops.registry import RegistryError, log_model

    cfg = load_config("params.yaml", profile="demo")
    with pytest.raises(RegistryError, match=r"could not log the model \(MLflow at http://127\.0\.0\.1:\d+, run abc\).*no new version is registered"):
        log_model(cfg, tiny_checkpoint, "abc")
    # The CLI: one error line, exit code 2, no traceback.
    # (eval.out_dir: not the checkout's, where a `make demo` leaves a metrics.json that register would read)
    assert main(["register", "--profile", "demo", "--checkpoint", str(tiny_checkpoint), "--run-id", "abc", "-S", f"eval.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: could not log the model" in err and dead_tracking in err


def test_a_stage_whose_work_is_done_ends_at_once_when_mlflow_does_not_answer_its_end_record(tmp_path, monkeypatch):
    """The flow's MLflow server a black hole when `galip train` ends: the trainer's logging and the stage's own
    end record (galip.ops.pipeline_run.stage_run) are bounded by mlflow.request_retries/request_timeout_s
    (MLflow's defaults: 7 retries of up to 120 s per call, minutes); the checkpoints are complete, so the
    stage exits 0 with one line naming what did not reach MLflow and where it is."""
    import os
    import subprocess
    import sys
    import time

    from helpers import set_args, tiny_overrides

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # the profile's settings, as a user gets them
    shards = write_shards(tmp_path / "shards", n_samples=16, per_shard=8)
    overrides = tiny_overrides(tmp_path, shards, "train.max_steps=2", "mlflow.request_retries=0", "mlflow.request_timeout_s=1")
    with black_hole() as url:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_RUN_ID": "0123456789abcdef"}
        # MLflow's defaults wait 120 s for one answer: the timeout fails the test where they apply
        done = subprocess.run([sys.executable, "-m", "galip", "train", "--profile", "demo", *set_args(overrides)],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)  # fmt: skip
        ended = time.time()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    # from the last checkpoint to the exit: the tracker's last try and the end record, 1 s each, plus exiting
    seconds = ended - (tmp_path / "run/checkpoints/ckpt_00000002.pt").stat().st_mtime
    assert seconds < 30, f"{seconds:.0f} s after the last checkpoint: the end record waited out MLflow's retries"
    (line,) = [line for line in out.splitlines() if "the train stage is done, but MLflow" in line]
    assert "run 0123456789abcdef lacks the stage's record" in line and f"{tmp_path}/run/train_log.csv" in line
    assert "Traceback" not in out


def test_the_next_stage_writes_the_record_an_unreachable_mlflow_missed(tmp_path, monkeypatch):
    """A stage done while MLflow was unreachable at its end (the test above) left its record out; the next
    stage that uses the run writes it from the stage's output files."""
    import mlflow

    from galip.ops.pipeline_run import STAGES_TAG, stage_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config("params.yaml", [f"train.out_dir={tmp_path / 'run'}", "mlflow.experiment=galip-backfill"], profile="demo")
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("galip-backfill")).info.run_id
    client.set_tag(run_id, STAGES_TAG, "download,clip")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/train_log.csv").write_text("step,loss_d\n1,0.5\n")
    (tmp_path / "run/config.yaml").write_text(cfg.to_yaml())
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # as the flow hands it down
    with pytest.raises(RuntimeError), stage_run(cfg, "evaluate"):
        raise RuntimeError("evaluation fails: the train record is written before it starts")
    assert client.get_run(run_id).data.tags[STAGES_TAG] == "download,clip,train"
    assert {f.path for f in client.list_artifacts(run_id, "train")} == {"train/train_log.csv", "train/config.yaml"}


# --- one name per metric: metrics.json's key is the MLflow metric and the model version's tag ----------
@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch) -> str:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def test_in_training_estimates_are_train_eval_metrics_and_the_newest_grid_is_at_step_0(tmp_path, sqlite_tracking, monkeypatch):
    import mlflow

    client = mlflow.MlflowClient(sqlite_tracking)
    run_id = client.create_run(client.create_experiment("names", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    shards = write_shards(tmp_path / "shards", n_samples=16, per_shard=8)
    run(tiny_config(tmp_path, shards, "train.max_steps=2", "train.eval_every=2", "train.eval_samples=8", "train.eval_metrics=[fd_clip]",
                    f"eval.out_dir={tmp_path / 'eval'}", f"eval.eval_clip_pretrained={eval_clip_checkpoint(tmp_path / 'eval_clip.pt')}"))
    metrics = client.get_run(run_id).data.metrics
    assert "train_eval/fd_clip" in metrics and "fd_clip" not in metrics, "the bare name is the evaluation's number"
    assert [m.step for m in client.get_metric_history(run_id, "train_eval/fd_clip")] == [2]
    # Grids at steps 0 and 2, each also under newest/samples at step 0, where MLflow's image card opens
    # and shows the last one listed: the step-2 grid.
    images = sorted(f.path for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png"))
    history = [p for p in images if p.startswith("images/samples+")]
    newest = [p for p in images if p.startswith("images/newest~samples+step+0+")]
    assert [p.split("+")[2] for p in history] == ["0", "2"] and len(newest) == len(images) - 2 == 2, images
    with Image.open(tmp_path / "run/samples/step_00000002.png") as grid, Image.open(client.download_artifacts(run_id, newest[-1])) as shown:
        assert shown.tobytes() == grid.convert(shown.mode).tobytes()


def test_registered_version_carries_the_metric_under_its_own_name(tiny_checkpoint, tmp_path, sqlite_tracking):
    import json

    import mlflow

    from galip.ops.registry import gate, register_from_files

    cfg = load_config(
        ROOT / "params.yaml",
        ["mlflow.model_name=galip-names", "mlflow.gate_metric=prompt_fidelity", "mlflow.gate_direction=higher", "mlflow.gate_bar=0"],
        profile="demo",
    )
    client = mlflow.MlflowClient(sqlite_tracking)
    client.create_experiment(cfg.mlflow.experiment, artifact_location=str(tmp_path / "artifacts"))  # not ./mlruns
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"prompt_fidelity": 2.0, "protocol": {"checkpoint": str(tiny_checkpoint)}}))
    first = register_from_files(cfg, metrics, None, None)
    name, version = cfg.mlflow.model_name, first["version"]
    assert client.get_model_version(name, version).tags["prompt_fidelity"] == "2"
    assert client.get_run(first["run_id"]).data.metrics == {"prompt_fidelity": 2.0}

    # A champion registered before the rename carries gate.<metric>: the gate still reads it.
    client.delete_model_version_tag(name, version, "prompt_fidelity")
    client.set_model_version_tag(name, version, "gate.prompt_fidelity", "2")
    decision = gate(cfg, "2", 1.5)
    assert not decision.promoted and "does not beat champion v1 (2)" in decision.reason


def test_experiments_open_as_model_training_and_keep_a_kind_set_by_hand(tmp_path):
    """MLflow 3 opens an experiment without a kind as GenAI; ours are marked as model training once."""
    import mlflow

    from galip.ops.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    new = ensure_experiment("fresh", uri)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert ensure_experiment("fresh", uri) == new
    # an experiment made before this rule (or by plain mlflow) gets the kind on its next run
    old = client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert ensure_experiment("made-elsewhere", uri) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # a kind someone chose in the UI stays
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development")
    ensure_experiment("made-elsewhere", uri)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_stages_share_one_run_when_the_tracking_uri_carries_a_password(mlflow_server, tmp_path, monkeypatch):
    """The run file keeps the tracking URI without its password; the next stage must still find the run
    (production tracking URIs carry credentials; `dvc repro` runs each stage as its own process)."""
    from galip.ops.pipeline_run import stage_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.replace("http://", "http://galip:Zq%40Pw@"))  # the server ignores it
    cfg = load_config("params.yaml", [f"train.out_dir={tmp_path / 'run'}", "mlflow.experiment=galip-run-file"], profile="demo")
    runs = []
    for stage in ("download", "clip"):  # failing stages: their runs stay open for the next stage, no records needed
        with pytest.raises(RuntimeError), stage_run(cfg, stage) as run_id:
            runs.append(run_id)
            raise RuntimeError("stage body")
    assert runs[0] == runs[1], "the second stage reopened the first stage's run"
    assert "Zq%40Pw" not in (tmp_path / "run").joinpath("mlflow_run.json").read_text()


# --- a tracking server that dies mid-run does not slow training down ---------------------------------------
def _step_seconds(train_log: Path) -> dict[int, float]:
    """Seconds per step as the trainer measured them (log_every=1: images_per_s over one step)."""
    import csv

    with open(train_log, newline="") as fh:
        return {int(r["step"]): 4 / float(r["images_per_s"]) for r in csv.DictReader(fh)}  # batch_size 4


@pytest.mark.slow  # trains, starts an MLflow server
@pytest.mark.alone  # step times before and after the kill: another test beside it would change them
def test_training_speed_does_not_depend_on_a_tracking_server_killed_mid_run(tmp_path, monkeypatch):
    import os
    import signal
    import statistics
    import subprocess
    import sys

    import mlflow
    from conftest import http_ok, start_process, stop_process, venv_bin, wait_until

    from helpers import set_args, tiny_overrides

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)  # the profile's settings, as a user gets them
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_process(
        [venv_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root", str(tmp_path / "artifacts")],
        tmp_path / "server.log", {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    trainer = None
    try:
        wait_until(lambda: http_ok(f"{url}/health"), 120, "mlflow server", server, tmp_path / "server.log")
        client = mlflow.MlflowClient(url)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        shards = write_shards(tmp_path / "shards", n_samples=16, per_shard=8)
        overrides = tiny_overrides(tmp_path, shards, "train.max_steps=24", "train.sample_every=6", "train.ckpt_every=12")
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_RUN_ID": run_id}
        log = open(tmp_path / "train.out", "wb")
        trainer = subprocess.Popen([sys.executable, "-m", "galip", "train", "--profile", "demo", *set_args(overrides)],
                                   env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        train_log = tmp_path / "run/train_log.csv"
        wait_until(lambda: train_log.exists() and max(_step_seconds(train_log), default=0) >= 8, 900, "step 8", trainer, tmp_path / "train.out")
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server dies mid-run
        server.wait(timeout=10)
        killed_at = max(_step_seconds(train_log))
        # On a server that is gone each logging call used to wait out MLflow's retries (minutes per call).
        # The end of the loop is the measure (the stage's end record after it: the test above).
        last = tmp_path / "run/checkpoints/ckpt_00000024.pt"
        wait_until(lambda: "MLflow: " in (tmp_path / "train.out").read_text() and last.exists(), 900, "step 24", trainer, tmp_path / "train.out")
    finally:
        if trainer is not None and trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
        stop_process(server)
    seconds = _step_seconds(train_log)
    assert sorted(seconds) == list(range(1, 25)), "train_log.csv holds every step, logged or not"
    # Medians of per-step times, warm-up (the first steps, the first ones after the kill) left out: one
    # slow step on a busy machine moves neither.
    before = statistics.median(seconds[s] for s in range(3, killed_at + 1))
    after = statistics.median(seconds[s] for s in range(killed_at + 3, 25))
    assert after <= 1.2 * before, f"median step {after:.2f} s after the kill at step {killed_at}, {before:.2f} s before"
    out = (tmp_path / "train.out").read_text()
    assert out.count("training goes on without waiting for it") == 1, "said once"
    assert "were not sent" in out
