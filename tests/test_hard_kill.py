"""`make demo` killed outright (kill -9 of the demo script's, the worker's and the server's process groups
together, as a closed terminal plus an OOM killer or a crashed laptop leave it) at each stage: within 15 s
no process of the run remains, and the next `make demo` carries on. Chained to stay cheap: killed in
download, rerun and killed in clip, rerun and killed in train after its first checkpoint, rerun (training
resumes from the newest checkpoint, not step 0) and killed in evaluate, rerun to the end."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import TINY_DEMO, free_port, make_tiny_project, migrated_prefect_home

from galip.telemetry import TELEMETRY_OFF

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # five demo runs: minutes each on a busy machine

# The tiny demo, with training long enough to be caught between its first checkpoint and its end.
STEPS, CKPT_EVERY = 12, 3
# What each stage's own process looks like (under `dvc repro --single-item <stage>`).
STAGE_PROCESS = {
    "download": "galip download",
    "clip": "galip train-clip",
    "train": "-m galip train",
    "evaluate": "-m galip evaluate",
}
GONE_WITHIN_S = 15


def run_processes(project: Path) -> list[psutil.Process]:
    """Every process of this demo run, however it was started: working directory in the project, the
    project's Prefect home in its environment, or the project on its command line."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if p.info["pid"] == me:
            continue
        try:
            cwd, cmdline = p.info["cwd"] or "", " ".join(p.info["cmdline"] or [])
            mine = cwd == str(project) or cwd.startswith(f"{project}/") or str(project) in cmdline
            if not mine:
                mine = p.environ().get("PREFECT_HOME", "").startswith(str(project))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if mine and p.status() != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} (ppid {p.ppid()}): {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            pass
    return out


def start_demo(project: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(project / f"demo-{time.monotonic_ns()}.log", "wb")
    # its own process group, as a terminal gives `make demo`
    return subprocess.Popen(["scripts/demo.sh"], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_stage(project: Path, demo: subprocess.Popen, stage: str, timeout: float = 600) -> None:
    """Until the stage's own process runs in the project (train: and has written its first checkpoint)."""
    needle = STAGE_PROCESS[stage]
    ckpts = project / "runs/demo/checkpoints"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert demo.poll() is None, f"demo exited {demo.returncode} before stage {stage}"
        running = any(
            p.info["cwd"] == str(project) and needle in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline", "cwd"])
        )
        if running and (stage != "train" or list(ckpts.glob("ckpt_*.pt"))):
            return
        time.sleep(0.1)
    raise TimeoutError(f"stage {stage} not reached in {timeout} s")


def kill_everything(project: Path, demo: subprocess.Popen) -> None:
    home = project / ".prefect"
    groups = [demo.pid, int((home / "worker.pid").read_text()), int((home / "server.pid").read_text())]
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    demo.wait(timeout=10)


def assert_nothing_left(project: Path, stage: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    left = run_processes(project)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = run_processes(project)
    if left:
        shown = describe(left)
        for p in left:  # not for the next run to trip over
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail(f"killed in {stage}: still alive {GONE_WITHIN_S} s later: {shown}")


def steps_logged(project: Path) -> list[int]:
    with open(project / "runs/demo/train_log.csv", newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh)]


def check_killed_runs_recorded(project: Path, env: dict[str, str]) -> None:
    """The records of the killed runs, as the UIs show them: each demo start's worker found the previous
    flow run without its process (flows.reap), so Prefect says Crashed and its MLflow run is not RUNNING."""
    import urllib.request

    from mlflow import MlflowClient

    api = f"http://127.0.0.1:{env['GALIP_PREFECT_PORT']}/api"
    body = json.dumps({"deployments": {"name": {"any_": ["demo"]}}, "sort": "START_TIME_ASC"}).encode()
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        states = [run["state"]["name"] for run in json.loads(r.read())]
    assert states == ["Crashed"] * 4 + ["Completed"], states
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("galip").experiment_id
    status = {run.info.status for run in client.search_runs([experiment])}
    assert "RUNNING" not in status and "FINISHED" in status and status & {"KILLED", "FAILED"}, status


def test_make_demo_killed_at_each_stage_leaves_nothing_and_the_next_one_resumes(tmp_path, tmp_path_factory):
    project = make_tiny_project(tmp_path / "project")
    from galip.config import flatten, write_profile

    tiny = {**flatten(TINY_DEMO), "train.max_steps": STEPS, "train.ckpt_every": CKPT_EVERY, "train.sample_every": CKPT_EVERY,
            "train.eval_every": STEPS, "train.keep_checkpoints": 20}  # fmt: skip
    write_profile("demo", project / "params.yaml", [f"{k}={json.dumps(v)}" for k, v in tiny.items()])
    subprocess.run(["git", "commit", "-qam", "longer training"], cwd=project, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    env = {
        **os.environ, **TELEMETRY_OFF, "PY": sys.executable, "PREFECT_WORKER_QUERY_SECONDS": "1",
        "GALIP_PREFECT_PORT": str(free_port()), "GALIP_MLFLOW_PORT": str(free_port()),
        "GALIP_MLFLOW_UI_URL": f"http://127.0.0.1:{free_port()}",
    }  # fmt: skip
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        env.pop(key, None)  # the demo's own: .prefect/ and mlflow.db in the project
    # The first server start migrates a new database, which on a busy machine outlasts demo.sh's wait for the
    # server: start on a migrated one (`make demo` on a checkout that ran it before finds it migrated).
    migrated_prefect_home(project / ".prefect", tmp_path_factory)
    t0 = time.monotonic()
    timings = {}
    try:
        for stage in ("download", "clip", "train", "evaluate"):
            demo = start_demo(project, env)
            wait_for_stage(project, demo, stage)
            if stage == "evaluate":  # this run resumed the training killed in the previous one
                worker_log = (project / ".prefect/worker.log").read_text()
                assert f"[train] {newest.name} is from a run of this stage with the same inputs that did not finish: resuming it" in worker_log
                # resumed, not retrained: the checkpoint (a new run has a new lineage id in it) and the log rows
                # up to it (they hold the step times) are the killed run's own
                assert newest.read_bytes() == newest_bytes, f"{newest.name} was written again: training started over"
                rows = (project / "runs/demo/train_log.csv").read_text().splitlines()
                assert rows[: len(kept_rows)] == kept_rows, "the rows up to the checkpoint were written again"
                steps = steps_logged(project)
                assert steps == list(range(1, STEPS + 1)), f"one row per step, none twice: {steps}"
            kill_everything(project, demo)
            t_kill = time.monotonic()
            assert_nothing_left(project, stage)
            timings[stage] = round(time.monotonic() - t_kill, 1)
            if stage == "train":
                newest = max((project / "runs/demo/checkpoints").glob("ckpt_*.pt"))
                step = int(newest.stem.removeprefix("ckpt_"))
                assert step < STEPS, "killed before training ended"
                newest_bytes = newest.read_bytes()
                # the header and the rows of the steps the checkpoint holds (the run may have logged more)
                kept_rows = (project / "runs/demo/train_log.csv").read_text().splitlines()[: step + 1]
        demo = start_demo(project, {**env, "KEEP": "1"})  # the servers stay up, to read what they recorded
        rc = demo.wait(timeout=600)
        logs = sorted(project.glob("demo-*.log"))
        assert rc == 0, logs[-1].read_text()[-4000:]
        assert json.loads((project / "runs/demo/eval/registered.json").read_text())["version"]
        check_killed_runs_recorded(project, env)
    finally:
        for p in run_processes(project):
            try:
                p.kill()
            except psutil.Error:
                pass
    print(f"processes gone after the kill (s): {timings}; whole chain {time.monotonic() - t0:.0f} s")
