"""Shared fixtures."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    """`make test` runs two xdist workers on a 2-core machine: most tests are bound by single-threaded work
    (imports, servers, tiny models), so two at a time fill both cores. Each worker and everything it starts
    then computes on one thread, so two busy tests do not fight over the cores with four."""
    import os

    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # Inductor's default pool of compile processes costs more CPU than it saves here (compiled step
        # test: 204 s of user CPU with 2 compile threads, 161 s with 1, on the same loaded machine).
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


# The longest tests (minutes each on 2 cores), started first so that neither worker ends on one of them.
# `make test` hands each worker two tests to begin with (--maxschedchunk 1), then one at a time: the
# first worker starts with the first two of these, the second with the next two (similar sums: ~5.5 +
# ~3.5 min, ~4.5 + ~4 min), and the fifth goes to the worker that finishes one first.
LONGEST_FIRST = ("test_hard_kill.py", "test_flow.py", "test_demo_recipe_learns_colour", "test_production.py", "test_dvc_repro.py")


def pytest_collection_modifyitems(config, items):
    """The longest tests, then the other slow ones, then the quick ones that fill the gaps."""

    def rank(item) -> tuple[int, int]:
        longest = [i for i, name in enumerate(LONGEST_FIRST) if name in (item.path.name, item.originalname)]
        return (item.get_closest_marker("slow") is None, longest[0] if longest else len(LONGEST_FIRST))

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _mlflow_store_of_the_suite(tmp_path_factory, monkeypatch):
    """Stage commands log to MLflow (galip.ops.pipeline_run): in tests, to a store of the suite's own, never
    the checkout's mlflow.db. Module-scoped servers and subprocess helpers build their environments
    before this applies or drop it, and so keep the store their test names."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.getbasetemp() / 'suite-mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt fails and is recorded: assert the list stays empty."""
    attempts: list = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError(f"test forbids network access (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def write_random_inception_weights(path: Path) -> Path:
    """A structurally valid FID Inception weights file with random values (the real file is not here)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class KeepRandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random initialisation
            return None

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    state = KeepRandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    torch.save(state, path)
    empty.unlink()
    return path


@pytest.fixture
def torch_home_with_inception(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME in a temp dir with random-valued Inception weights staged where FID looks for them."""
    from galip.eval.metrics.fid import INCEPTION_FILE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return write_random_inception_weights(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port with dummy credentials; yields the endpoint URL."""
    import os

    from moto.server import ThreadedMotoServer

    port = free_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    # Dummy credentials, or boto3 walks the provider chain up to the cloud metadata address.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields (endpoint_url, bucket name)."""
    import uuid

    import boto3

    name = f"galip-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return s3_server, name


# --- servers for orchestration tests (PostgreSQL, MLflow, Prefect): real processes on loopback ---------
import os as _os
import shutil as _shutil
import signal as _signal
import subprocess as _subprocess
import sys as _sys
import time as _time

from galip.telemetry import TELEMETRY_OFF

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def venv_bin(name: str) -> str:
    return str(Path(_sys.executable).parent / name)


def wait_until(check, timeout: float, what: str, proc: _subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = _time.monotonic() + timeout
    while _time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:] if log else ''}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        _time.sleep(0.5)
    raise TimeoutError(f"{what} not up after {timeout} s:\n{log.read_text()[-3000:] if log else ''}")


def http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def start_process(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> _subprocess.Popen:
    """A server in its own session (so stop_process can end its children too), output to ``log``."""
    fh = open(log, "wb")
    return _subprocess.Popen(argv, stdout=fh, stderr=_subprocess.STDOUT, env={**_os.environ, **TELEMETRY_OFF, **(env or {})}, cwd=cwd, start_new_session=True)


def stop_process(proc: _subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the process group twice (a Prefect worker ignores the first), then SIGKILL."""
    if proc.poll() is not None:
        return
    for _ in range(2):
        try:
            _os.killpg(proc.pid, _signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace / 2)
            return
        except _subprocess.TimeoutExpired:
            pass
    _os.killpg(proc.pid, _signal.SIGKILL)
    proc.wait(timeout=10)


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb/pg_ctl refuse to run as root: run them as the `postgres` system user when we are root."""
    if _os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """PostgreSQL 15 on a free loopback port (initdb + pg_ctl, socket in a temp dir); yields a SQLAlchemy URI."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL 15 binaries not found in {PG_BIN} (this machine image should have them)")
    import tempfile

    # Not under pytest's tmp dirs: those are root-only (0700), and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="galip-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if _os.geteuid() == 0:
        _shutil.chown(root, "postgres", "postgres")
        _shutil.chown(sock, "postgres", "postgres")
    port = free_port()
    _subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "galip", "--auth=trust", "-E", "UTF8"]), check=True, capture_output=True)
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock} -c fsync=off"
    _subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "pg.log"), "-w", "start"]), check=True, capture_output=True)
    try:
        _subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "galip", "mlflow"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://galip@127.0.0.1:{port}/mlflow"
    finally:
        _subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), check=False, capture_output=True)
        _shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres_server, s3_server, tmp_path_factory):
    """MLflow tracking server: PostgreSQL backend store, artifacts on the loopback S3; yields its URL."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="galip-artifacts")
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow") / "server.log"
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_server, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start_process(
        [venv_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", postgres_server, "--artifacts-destination", "s3://galip-artifacts/mlflow"],
        log, env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/health"), 300, "mlflow server", proc, log)
        yield url
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-step GALIP checkpoint of the shrunk demo model whose CLIP is a local weights file
    (as the demo's trained CLIP is), for registry and serving tests."""
    import open_clip
    from helpers import tiny_config, write_shards

    from galip.model.clip import register_project_model_configs
    from galip.train.trainer import run

    tmp = tmp_path_factory.mktemp("tiny_ckpt")
    register_project_model_configs()
    clip_path = tmp / "clip" / "galip-tiny.pt"
    clip_path.parent.mkdir()
    torch.manual_seed(0)
    torch.save(open_clip.create_model("galip-tiny", pretrained=None).state_dict(), clip_path)
    shards = write_shards(tmp / "shards", n_samples=16, per_shard=8)
    cfg = tiny_config(tmp, shards, "train.max_steps=2", f"model.clip_pretrained={clip_path}")
    result = run(cfg)
    return Path(result["checkpoint"])


TINY_DEMO = {
    "data": {"demo_images": 200, "samples_per_shard": 100},
    # attempts 1: a one-epoch CLIP is always weak, and a second run would only repeat it (~10 s per pipeline);
    # test_dvc_repro keeps the retry (attempts 2)
    "clip_pretrain": {"enabled": True, "epochs": 1, "batch_size": 50, "warmup": 2, "separation_samples": 10, "attempts": 1},
    "model": {"ngf": 8, "ndf": 8, "code_channels": 8, "code_mid_channels": 8, "mapper_blocks": 1},
    "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "ckpt_every": 3, "sample_every": 3,
              "eval_every": 6, "eval_samples": 20},  # one in-training evaluation; it picks the registered checkpoint
    "eval": {"n_samples": 20, "batch_size": 10, "r_precision_candidates": 10, "grid_n": 2},
    "mlflow": {"gate_bar": 0.0},  # a 6-step model scores 0: let it pass the bar, so the run shows a promotion
}


def make_tiny_project(dst: Path, overrides: dict[str, object] | None = None) -> Path:
    """A git checkout of this project's tracked files with a seconds-sized demo in params.yaml (TINY_DEMO, then
    ``overrides``: flat keys such as ``{"clip_pretrain.attempts": 2}``)."""
    root = Path(__file__).resolve().parents[1]
    files = _subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = root / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            _shutil.copy2(src, dst / rel)
    from galip.config import flatten, write_profile

    values = {**flatten(TINY_DEMO), **(overrides or {})}
    write_profile("demo", dst / "params.yaml", [f"{k}={json.dumps(v)}" for k, v in values.items()])
    env = {**_os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        _subprocess.run(cmd, cwd=dst, env=env, check=True, capture_output=True)
    return dst


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    return make_tiny_project(tmp_path / "project")


REPO = Path(__file__).resolve().parents[1]


def local_script(env: dict[str, str], *functions: str, cwd: Path = REPO, timeout: float = 300) -> _subprocess.CompletedProcess:
    """Call functions of scripts/prefect-local.sh, the project's own server/worker management (`make demo/ui/stop`)."""
    command = "source scripts/prefect-local.sh && " + " && ".join(functions)
    return _subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def migrated_prefect_home(home: Path, tmp_path_factory) -> Path:
    """``home`` as a PREFECT_HOME whose database has every migration applied. Migrating a new database makes
    a server's first start ~15-20 s longer on this machine; the suite migrates one (xdist workers share
    it through their common temp folder, under a lock) and each test server starts on a copy of it, as
    `make demo` does on a checkout that ran it before."""
    from filelock import FileLock
    from prefect import __version__ as prefect_version

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if _os.environ.get("PYTEST_XDIST_WORKER") else base
    template = shared / f"prefect-migrated-{prefect_version}"
    with FileLock(str(template) + ".lock"):
        if not (template / "prefect.db").is_file():
            template.mkdir(exist_ok=True)
            env = {**_os.environ, **TELEMETRY_OFF, "PREFECT_HOME": str(template)}
            for key in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
                env.pop(key, None)
            migrated = _subprocess.run([venv_bin("prefect"), "server", "database", "upgrade", "-y"], env=env,
                                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    home.mkdir(parents=True, exist_ok=True)
    _shutil.copy2(template / "prefect.db", home / "prefect.db")
    return home


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """The local Prefect server and process worker as `make demo` starts them (scripts/prefect-local.sh),
    with their own PREFECT_HOME and free loopback ports; yields the environment a Prefect CLI call needs."""
    home = migrated_prefect_home(tmp_path_factory.mktemp("prefect_home"), tmp_path_factory)
    port = free_port()
    env = {
        **_os.environ, **TELEMETRY_OFF, "PREFECT_HOME": str(home), "PY": _sys.executable, "PREFECT_WORKER_QUERY_SECONDS": "1",
        "GALIP_PREFECT_PORT": str(port), "GALIP_MLFLOW_PORT": str(free_port()),
        # where the flow's links point; the MLflow UI itself is started only by tests that need it
        "GALIP_MLFLOW_UI_URL": f"http://127.0.0.1:{free_port()}",
    }  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    try:
        up = local_script(env, "prefect_server_up", "prefect_worker_up")
        logs = "\n".join(p.read_text()[-3000:] for p in home.glob("*.log"))
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}\n{logs}"
        api = f"http://127.0.0.1:{port}/api"
        yield {"env": {**env, "PREFECT_API_URL": api}, "script_env": env, "worker_log": home / "worker.log", "api": api, "home": home}
    finally:
        local_script(env, "prefect_down")
