"""Faults and bad input (the table in docs/faults.md): nothing lost, nothing left running, one clear line for every mistake.

Real components throughout: moto's S3 server on loopback and a closed loopback port as the dead store,
real `galip train` processes for the run lock, real truncated files, the CLI in-process and as
`python -m galip`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

from galip.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, verify_checkpoint
from galip.cli import main
from galip.train.trainer import run

from helpers import black_hole, set_args, tiny_config, tiny_overrides, write_shards

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = ["train.storage_retries=1", "train.storage_backoff_s=0.05"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def _weights(path):
    ckpt = load_checkpoint(path)
    return {k: ckpt[k] for k in ("netG", "netD", "netC")}


def _assert_same(a, b):
    for net in a:
        assert a[net].keys() == b[net].keys()
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net


def _error_lines(err: str) -> list[str]:
    """The stderr lines a user sees for a refused command (warnings excluded)."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused


# --- storage faults ---------------------------------------------------------------------------
@pytest.mark.slow  # trains
def test_dead_store_resume_uses_local_checkpoint_and_counts_failed_uploads(tmp_path, shards, monkeypatch, caplog, capsys):
    import mlflow

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    run(tiny_config(tmp_path, shards, "train.max_steps=2"))  # local checkpoint at step 2, no store yet

    # The store goes down; the resume must not need it: it uses the local copy and says so in one line.
    dead = ["train.checkpoint_uri=s3://galip-ckpt/runs/x", f"data.s3_endpoint_url={dead_endpoint()}", *FAST_RETRY]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    mlflow.set_tracking_uri(tracking)
    mlflow_run = mlflow.MlflowClient().create_run(mlflow.set_experiment("faults").experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", mlflow_run.info.run_id)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        result = run(tiny_config(tmp_path, shards, "train.max_steps=4", *dead), resume=True)
    assert time.monotonic() - t0 < 120
    assert result["step"] == 4
    assert result["checkpoint_uploads"] == {"ok": 0, "failed": 1, "newest_in_store": False}
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed 2 times" in m and "going on from the local ckpt_00000002.pt" in m for m in messages), messages
    assert any("ckpt_00000004.pt stays local only" in m for m in messages), messages
    assert any("newest checkpoint ckpt_00000004.pt did not reach" in m for m in messages), messages
    assert not any("\n" in m for m in messages), "one line each"
    history = mlflow.MlflowClient().get_metric_history(mlflow_run.info.run_id, "checkpoint_uploads_failed")
    assert [m.value for m in history] == [1.0]
    monkeypatch.delenv("MLFLOW_RUN_ID")

    # With train.require_checkpoint_upload the local checkpoints do not decide while the store may hold newer ones.
    with black_hole() as endpoint:
        hole = ["train.checkpoint_uri=s3://galip-ckpt/runs/x", f"data.s3_endpoint_url={endpoint}", "train.storage_deadline_s=2"]
        args = ["train", "--profile", "demo", "--resume", *set_args(tiny_overrides(tmp_path, shards, "train.max_steps=6", *hole, "train.require_checkpoint_upload=true"))]
        capsys.readouterr()
        assert main(args) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "train.require_checkpoint_upload is set, so this run does not go on from the local ckpt_00000004.pt" in line
    assert [p.name for p in list_checkpoints(tmp_path / "run/checkpoints")][-1] == "ckpt_00000004.pt"


def test_dead_store_without_local_checkpoint_stops_in_one_line(tmp_path, shards, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    overrides = tiny_overrides(tmp_path, shards, "train.max_steps=2", "train.checkpoint_uri=s3://galip-ckpt/x", f"data.s3_endpoint_url={dead_endpoint()}", *FAST_RETRY)
    assert main(["train", "--profile", "demo", "--resume", *set_args(overrides)]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "listing of s3://galip-ckpt/x failed 2 times" in line and "holds no checkpoint" in line
    assert not list_checkpoints(tmp_path / "run/checkpoints")


def test_a_black_hole_store_call_ends_within_its_stated_bound(monkeypatch, caplog):
    from galip.ops import storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 1.0)  # the per-try bound, scaled down from 60 s
    with black_hole() as endpoint, caplog.at_level(logging.WARNING, logger="galip.storage"):
        retry = storage.Retry(retries=2, backoff_s=0.1)
        assert retry.bound_s() == pytest.approx(3 * 1.0 + 0.1 + 0.2)
        storage.s3_filesystem(endpoint)  # imports and botocore's service model: CPU time, not waiting
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError, match="listing of s3://galip-ckpt/x failed 3 times"):
            storage.list_names("s3://galip-ckpt/x", endpoint, retry)
        took = time.monotonic() - t0
        assert retry.bound_s() - 0.5 < took < retry.bound_s() + 30, "plus per-try client set-up on a busy machine"
        said = [r.getMessage() for r in caplog.records]
        # With a deadline the whole call ends within it, retries left or not.
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError, match="listing of s3://galip-ckpt/x failed"):
            storage.list_names("s3://galip-ckpt/x", endpoint, storage.Retry(retries=5, backoff_s=0.1, deadline_s=1.5))
        assert time.monotonic() - t0 < 1.5 + 30, "plus per-try client set-up on a busy machine"
    assert len(said) == 1, "one line at the first failure, not one per retry"
    assert "did not succeed" in said[0] and "retrying up to 2 more time(s), for at most 2 s more" in said[0]  # 2 x 1 s + 0.1 + 0.2


def test_resume_against_a_black_hole_store_is_bounded_by_the_storage_deadline(tmp_path, shards, capsys, caplog, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with black_hole() as endpoint:
        # default retries (3, backoff 1 s) and timeouts: without the deadline this listing took 255 s
        overrides = tiny_overrides(tmp_path, shards, "train.max_steps=2", "train.checkpoint_uri=s3://galip-ckpt/x",
                                   f"data.s3_endpoint_url={endpoint}", "train.storage_deadline_s=12")  # fmt: skip
        assert main(["train", "--profile", "demo", "--resume", *set_args(overrides)]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    took = re.search(r"listing of s3://galip-ckpt/x failed \d times in (\d+) s", line)
    assert took and "holds no checkpoint" in line, line
    # the deadline, plus the store client's set-up (CPU) per try on a busy machine; 255 s without it
    assert int(took[1]) < 60, line
    (said,) = [r.getMessage() for r in caplog.records if "did not succeed" in r.getMessage()]
    left = re.search(r"retrying up to 3 more time\(s\), for at most (\d+) s more", said)
    assert left and int(left[1]) < 12, said  # what is left of the deadline


@pytest.mark.slow  # trains
def test_newer_remote_checkpoint_wins_over_the_local_one(tmp_path, shards, s3_bucket):
    endpoint, bucket = s3_bucket
    remote = [f"train.checkpoint_uri=s3://{bucket}/runs/demo", f"data.s3_endpoint_url={endpoint}"]
    first = tiny_config(tmp_path / "a", shards, "train.max_steps=4", *remote)
    run(first, max_steps=2)
    # machine b has a copy of step 2 locally; machine a goes on to step 4 and uploads it
    shutil.copytree(tmp_path / "a/run/checkpoints", tmp_path / "b/run/checkpoints")
    run(first, resume=True)
    result = run(tiny_config(tmp_path / "b", shards, "train.max_steps=4", *remote), resume=True)
    assert result["step"] == 4 and Path(result["checkpoint"]).name == "ckpt_00000004.pt"
    _assert_same(_weights(tmp_path / "a/run/checkpoints/ckpt_00000004.pt"), _weights(result["checkpoint"]))


@pytest.mark.slow  # trains
def test_a_checkpoint_uri_belongs_to_one_run(tmp_path, shards, s3_bucket, capsys):
    import boto3

    endpoint, bucket = s3_bucket
    remote = [f"train.checkpoint_uri=s3://{bucket}/runs/shared", f"data.s3_endpoint_url={endpoint}"]
    run(tiny_config(tmp_path / "a", shards, "train.max_steps=2", *remote))  # run a: its first upload claims the prefix
    run(tiny_config(tmp_path / "b", shards, "train.max_steps=2"))  # run b trains on its own, then points at a's store
    capsys.readouterr()
    args = ["train", "--profile", "demo", "--resume", *set_args(tiny_overrides(tmp_path / "b", shards, "train.max_steps=4", *remote))]
    assert main(args) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"train.checkpoint_uri=s3://{bucket}/runs/shared holds the checkpoints of another run (written from {tmp_path / 'a/run'}" in line
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["runs/shared/ckpt_00000002.pt", "runs/shared/galip-owner.json"], "b uploaded nothing"
    # The same run, resumed on another machine (no local checkpoints there), is accepted.
    result = run(tiny_config(tmp_path / "c", shards, "train.max_steps=4", *remote), resume=True)
    assert result["step"] == 4 and result["checkpoint_uploads"]["ok"] == 1


# --- one writer per out_dir ----------------------------------------------------------------------------
@pytest.mark.slow  # trains
def test_second_train_into_the_same_out_dir_is_refused_and_a_killed_owner_does_not_block(tmp_path, shards, capsys, caplog):
    overrides = tiny_overrides(tmp_path, shards, "train.max_steps=100000", "train.ckpt_every=100000", "train.sample_every=100000")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    first = subprocess.Popen(
        [sys.executable, "-m", "galip", "train", "--profile", "demo", *set_args(overrides)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    lock = tmp_path / "run" / ".lock"
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, "first run did not take the lock"
            time.sleep(0.2)
        t0 = time.monotonic()
        assert main(["train", "--profile", "demo", *set_args(overrides)]) == 2
        assert time.monotonic() - t0 < 30, "refused at once, before building the model"
        (line,) = _error_lines(capsys.readouterr().err)
        assert f"in use by galip train pid {first.pid}" in line and "train.out_dir" in line
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as the OOM killer would: no cleanup runs
        first.wait(timeout=30)
    # The kernel released the dead owner's lock: the next run starts, and says what happened.
    with caplog.at_level(logging.WARNING):
        assert run(tiny_config(tmp_path, shards, "train.max_steps=1"))["step"] == 1
    assert any(f"pid {first.pid}" in r.getMessage() and "was killed" in r.getMessage() for r in caplog.records)
    assert lock.read_text() == "", "an orderly exit clears the owner line"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_the_lock_dies_with_a_killed_trainer_not_with_its_loader_workers(tmp_path, shards):
    """kill -9 of the trainer (not its DataLoader workers, which live on for a few seconds): a resume
    started at once is not refused; the workers never held the lock."""
    import fcntl

    overrides = tiny_overrides(tmp_path, shards, "data.workers=2", "train.max_steps=100000", "train.ckpt_every=1", "train.sample_every=100000")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "galip", "train", "--profile", "demo", *set_args(overrides)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(tmp_path / "run/checkpoints"):
            assert trainer.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.2)
        workers = _children(trainer.pid)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=30)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()]
        with open(tmp_path / "run/.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a worker holds it
            fcntl.flock(fh, fcntl.LOCK_UN)
        assert alive, "the loader workers had already gone: this run did not test the case"
        assert main(["train", "--profile", "demo", "--resume", *set_args(tiny_overrides(tmp_path, shards, "train.max_steps=1"))]) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=30)


# --- 5 and 9: truncated checkpoints, orphan temp files --------------------------------------------------------


# --- truncated checkpoints, orphan temp files --------------------------------------------------------
@pytest.mark.slow  # trains
def test_truncated_newest_checkpoint_is_named_and_skipped_for_the_previous_one(tmp_path, shards, capsys, caplog):
    cfg = tiny_config(tmp_path, shards, "train.max_steps=4")
    run(cfg)
    ckpt_dir = tmp_path / "run/checkpoints"
    newest = ckpt_dir / "ckpt_00000004.pt"
    straight = _weights(newest)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk-full / killed copy
    orphan = ckpt_dir / ".ckpt_00000006.pt.tmp-4242"  # what a kill during save_checkpoint leaves
    orphan.write_bytes(b"partial")

    # generate: one warning line naming the bad file, the grid comes from the previous checkpoint
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "--checkpoint", str(newest), "--prompt", "a red square", "--n", "1", "--out", str(tmp_path / "g.png")]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert str(newest) in warning and "using the previous good one" in warning and "ckpt_00000002.pt" in warning
    caplog.clear()

    # resume: the bad file is moved aside, training redoes step 3-4 from step 2 and ends where it was
    with caplog.at_level(logging.WARNING):
        assert run(cfg, resume=True)["step"] == 4
    assert any("ckpt_00000004.pt" in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records)
    assert (ckpt_dir / "ckpt_00000004.pt.corrupt").exists() and not orphan.exists()
    _assert_same(straight, _weights(newest))


@pytest.mark.slow  # trains
def test_flipped_byte_fails_verification(tmp_path, shards):
    path = Path(run(tiny_config(tmp_path, shards, "train.max_steps=2"))["checkpoint"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # torch.load alone would load this without complaint
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        verify_checkpoint(path)


# --- resuming with a changed configuration ------------------------------------------------------------------
@pytest.mark.slow  # trains
def test_resume_with_changed_recipe_or_architecture_is_refused_unless_allowed(tmp_path, shards, capsys):
    base = tiny_overrides(tmp_path, shards, "train.max_steps=2")
    assert main(["train", "--profile", "demo", *set_args(base)]) == 0
    capsys.readouterr()

    more = tiny_overrides(tmp_path, shards, "train.max_steps=4")  # more steps: always fine
    assert main(["train", "--profile", "demo", "--resume", *set_args([*more, "train.lr_g=0.0003"])]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "train.lr_g=0.0002 -> 0.0003" in line and "--allow-config-change" in line
    assert main(["train", "--profile", "demo", "--resume", *set_args([*more, "model.ngf=16"])]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "model.ngf=8 -> 16" in line
    assert main(["train", "--profile", "demo", "--resume", "--allow-config-change", *set_args([*more, "model.ngf=16"])]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "weights do not fit" in line and "model.ngf=8 -> 16" in line
    assert [p.name for p in list_checkpoints(tmp_path / "run/checkpoints")] == ["ckpt_00000002.pt"], "no work done"

    # allowed: the new learning rate is the one in force (not the one the optimiser state restored)
    assert main(["train", "--profile", "demo", "--resume", "--allow-config-change", *set_args([*more, "train.lr_g=0.0003"])]) == 0
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/ckpt_00000004.pt")
    assert {g["lr"] for g in ckpt["optG"]["param_groups"]} == {0.0003}
    assert {g["lr"] for g in ckpt["optD"]["param_groups"]} == {0.0008}


# --- bad input, one line each, nothing written ----------------------------------------------------------------
def _download_args(tmp_path: Path, url_list: Path) -> list[str]:
    return ["download", "--profile", "demo", "-S", "data.demo_images=0", "-S", f"data.url_list={url_list}", "-S", f"data.shards_dir={tmp_path / 'shards'}"]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("empty", "holds no usable row"),
        ("malformed_only", "holds no usable row (2 malformed, lines 1, 2)"),
        ("latin1", "line 2 is not UTF-8 (byte 0xe9 at column 22)"),
    ],
)
def test_bad_url_lists_fail_in_one_line_without_a_manifest(tmp_path, capsys, case, needle):
    url_list = tmp_path / "urls.tsv"
    if case == "folder":
        url_list.mkdir()
    elif case == "empty":
        url_list.write_bytes(b"")
    elif case == "malformed_only":
        url_list.write_bytes(b"no tab here\n\tempty url\n")
    elif case == "latin1":
        url_list.write_bytes("http://x/1.jpg\tun chat\nhttp://x/2.jpg\tun caf\u00e9\n".encode("latin-1"))
    assert main(_download_args(tmp_path, url_list)) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert needle in line and "data.url_list" in line
    assert not (tmp_path / "manifest.json").exists()


def test_bad_command_lines_fail_in_one_line(tmp_path, shards, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    ckpt = Path(run(tiny_config(tmp_path, shards, "train.max_steps=1", "train.ckpt_every=1"))["checkpoint"])
    capsys.readouterr()
    cases = [
        (["train", "--profile", "demo", "-S", "train.lr_g=1e999"], "train.lr_g: Input should be a finite number"),
        (["train", "--profile", "demo", *set_args(tiny_overrides(tmp_path, shards)), "-S", f"train.out_dir={a_file}"], f"train.out_dir={a_file} is a file"),
        (["generate", "--checkpoint", str(tmp_path / "nope.pt"), "--prompt", "x"], "nope.pt does not exist"),
        (["generate", "--checkpoint", str(tmp_path), "--prompt", "x"], "is a folder"),
        (["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--n", "0"], "--n=0: need at least 1"),
        (["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--n", "100000"], "100000 images, more than --max-images=1024"),
        (["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--prompt", "  "], "prompt 2 of 2 is empty or blank"),
        (["evaluate", "--profile", "demo", "--checkpoint", str(tmp_path / "nope.pt")], "nope.pt"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and needle in err, (argv, err)
    assert not (Path.cwd() / "grid.png").exists()


@pytest.mark.parametrize("argv", [["nosuch"], ["generate", "--n", "zero"], ["train", "--no-such-option"]])
def test_python_dash_m_galip_prints_usage_errors_like_the_script(argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "galip", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Usage: galip" in out.stderr, out.stderr


# --- a flow run dies with its worker -------------------------------------------------------------------------
FLOW_RUN = """
import os, signal, subprocess, sys, time
from flows.galip_train import _stop_with_worker, end_mlflow_run_if_running
signal.signal(signal.SIGTERM, lambda *_: None)  # Prefect's engine turns SIGTERM into reporting, which may hang
# the MLflow server is gone too: ending the run retries for minutes with MLflow's default settings
_stop_with_worker([end_mlflow_run_if_running(sys.argv[1], "0123456789abcdef")])
trainer = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(os.getpid(), trainer.pid, flush=True)
time.sleep(600)
"""
WORKER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)  # as Prefect's runner starts a flow run
time.sleep(600)
"""


def test_a_flow_run_and_its_children_die_within_15_s_of_a_killed_worker(tmp_path):
    import psutil

    with black_hole() as mlflow_url:
        env = {**os.environ, "PREFECT__FLOW_RUN_ID": "x", "PYTHONPATH": str(ROOT), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7"}
        env.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        worker = subprocess.Popen([sys.executable, "-c", WORKER, FLOW_RUN, mlflow_url], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
        flow_run, trainer = (psutil.Process(int(pid)) for pid in worker.stdout.readline().split())
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # the worker's whole group, as kill -9 of `make demo` leaves it
            worker.wait()
            t0 = time.monotonic()
            _, alive = psutil.wait_procs([flow_run, trainer], timeout=15)
            assert not alive, f"still running {time.monotonic() - t0:.0f} s after the worker: {[p.cmdline() for p in alive]}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(flow_run.pid, signal.SIGKILL)  # its own session: the group is the flow run's pid


# --- the served model's answers to bad requests -----------------------------------------------------------------
BAD_REQUESTS = [  # (input columns, params, the reason in our message, the reason over HTTP if MLflow's schema check answers first)
    ({"prompt": ["a red circle"]}, {"n": 0}, "param n=0: need at least 1", None),
    ({"prompt": ["a red circle"]}, {"n": 100000}, "100000 images, more than the per-request limit=256", None),
    ({"prompt": ["a red circle"] * 300}, {"n": 1}, "300 images, more than the per-request limit=256", None),
    ({"prompt": [""]}, {}, "prompt 1 of 1 is empty or blank", None),
    ({"prompt": ["a red circle", None]}, {}, "prompt 2 of 2 is missing (null)", None),
    ({"text": ["a red circle"]}, {}, "input needs a string column 'prompt'", "Model is missing inputs ['prompt']"),
    ({"prompt": ["a red circle"]}, {"n": 1.5}, "param n=1.5: need an integer", "Can not safely convert"),
    ({"prompt": ["a red circle"]}, {"seed": 2**64}, "param seed=18446744073709551616: need 0 <= seed < 4294967296", None),
    ({"prompt": ["a red circle"]}, {"seed": -1}, "param seed=-1: need 0 <= seed < 4294967296", None),
]


@pytest.mark.parametrize("data, params, reason, _", BAD_REQUESTS)
def test_pyfunc_rejects_bad_requests_as_invalid_parameter_values(data, params, reason, _):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from galip.ops.serving import GalipTextToImage

    with pytest.raises(MlflowException) as err:
        GalipTextToImage().predict(None, pd.DataFrame(data), params)  # refused before the model is touched
    assert err.value.get_http_status_code() == 400 and reason in err.value.message


# --- what redaction masks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, shown",
    [
        ("MLflow run (http://galip:s3cret@mlflow:5000/#/runs/1)", "MLflow run (http://galip:***@mlflow:5000/#/runs/1)"),
        ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
        ("http://user:p@ss@host/x", "http://user:***@host/x"),  # an unescaped @ in the password
        ("https://ghp_token@github.com/org/repo", "https://***@github.com/org/repo"),
        ("s3://b/k?X-Amz-Credential=AKIA&X-Amz-Signature=abc&v=1", "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***&v=1"),
        ("sqlite:////tmp/mlflow.db and http://127.0.0.1:5000/#/x", "sqlite:////tmp/mlflow.db and http://127.0.0.1:5000/#/x"),
        ("API request to http://user:Zq%40Pw9%2Fx@mlflow:5000/api failed", "API request to http://user:***@mlflow:5000/api failed"),
        # a URI percent-encoded inside another (a login redirect): the encoded password, "@" encoded again in it
        ("/login?next=http%3A%2F%2Fuser%3AZq%2540Pw%40mlflow%2Fx", "/login?next=http%3A%2F%2Fuser%3A***%40mlflow%2Fx"),
        ("?next=https%3A%2F%2Fghp_tok%40github.com", "?next=https%3A%2F%2F***%40github.com"),
        ("?u=http%3A%2F%2Fmlflow%3A5000%2Fx", "?u=http%3A%2F%2Fmlflow%3A5000%2Fx"),
    ],
)
def test_redact_masks_credentials_in_uris(text, shown):
    from galip.ops.redact import redact

    assert redact(text) == shown


def test_log_records_are_redacted_also_behind_a_library_s_own_handler(capsys):
    """MLflow logs through its own handler (not the CLI's): its system-metrics monitor printed the
    tracking URI's password in "Failed to get mlflow run: API request to http://user:...@host"."""
    import io

    stream = io.StringIO()
    logger = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        assert main(["config", "--profile", "demo"]) == 0  # any command: the CLI installs the redaction
        logger.warning("Failed to get mlflow run: API request to http://user:Zq%40Pw9@127.0.0.1:9/api failed.")  # as MLflow: no args
    finally:
        logger.removeHandler(handler)
    assert "Zq" not in stream.getvalue() and "http://user:***@127.0.0.1:9/api" in stream.getvalue()
