"""The production path in miniature: the `cc12m` profile with only size overrides (tiny CLIP, 64 px, a few
steps, CPU allowed) runs end to end through the code production uses, then again through `dvc repro`:

- the URL list's images are served over 127.0.0.1, img2dataset writes the shards to an s3:// prefix on
  the loopback S3 endpoint, and training reads them from there;
- MLflow is a server backed by PostgreSQL with its artifacts on that S3;
- the flow runs through the cc12m deployment and a process worker, with `flow.use_dvc: false`;
- FID and CLIPScore run the production code with seeded stand-in weights files in the standard formats,
  staged where a user stages the real ones (eval.inception_weights, local CLIP checkpoints): only the
  numbers are meaningless, and the FID gate decides.

The two MLflow runs hold the same param keys, metric keys and dataset input, and a model each; a model
version is traced back to its data version, whose shards are fetched and verified.

The same runs carry a password in MLFLOW_TRACKING_URI and a secret key in the environment, as a production
pod does: every store they wrote to is then scanned for both."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import (PG_BIN, TELEMETRY_OFF, free_port, local_script, make_tiny_project, migrated_prefect_home, venv_bin,
                      write_random_inception_weights)
from helpers import run_config_tags, write_shards

pytestmark = pytest.mark.slow

N_IMAGES = 40


def stand_in_clip(path: Path, seed: int) -> Path:
    """A galip-tiny open_clip state_dict with seeded random values, where a user stages a CLIP checkpoint."""
    import open_clip
    import torch

    from galip.model.clip import register_project_model_configs

    register_project_model_configs()
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip.create_model("galip-tiny", pretrained=None).state_dict(), path)
    return path


def size_overrides(project: Path, endpoint: str, bucket: str) -> list[str]:
    """Sizes only: where the data and weights are, how big the model and the run are, CPU allowed."""
    weights = project / "weights"
    return [
        f"data.shards_dir=s3://{bucket}/cc12m/shards", f"data.s3_endpoint_url={endpoint}",
        "data.image_size=64", "data.samples_per_shard=20", "data.processes=1", "data.threads=4", "data.retries=0",
        "data.load_size=64", "data.crop_size=64", "data.shuffle_buffer=20", "data.workers=0",
        "model.clip_model=galip-tiny", f"model.clip_pretrained={stand_in_clip(weights / 'clip.pt', 0)}", "model.image_size=64",
        "model.ngf=8", "model.ndf=8", "model.code_channels=8", "model.code_mid_channels=8", "model.mapper_blocks=1",
        "model.feature_blocks=[0, 1, 3]", "model.prompt_blocks=[1, 2, 3]",
        "train.batch_size=4", "train.max_steps=4", "train.log_every=1", "train.ckpt_every=2", "train.sample_every=2", "train.device=cpu",
        "eval.n_samples=20", "eval.batch_size=10", "eval.grid_n=2", "eval.device=cpu", "eval.eval_clip_model=galip-tiny",
        f"eval.eval_clip_pretrained={stand_in_clip(weights / 'eval_clip.pt', 1)}",
        f"eval.inception_weights={write_random_inception_weights(weights / 'inception.pth')}",
        # the zero-shot reference set (COCO val in production) is a local folder of shards
        f"eval.ref_shards={write_shards(project / 'data/coco_val/shards', n_samples=20, per_shard=10)}",
        "flow.nproc_per_node=1", "flow.require_gpu=false",
    ]  # fmt: skip


def url_list(project: Path, source: Path, base_url: str) -> None:
    """CC12M's format (url<TAB>caption, no header) at the preset's data.url_list."""
    import pandas as pd

    rows = pd.read_parquet(source / "urls.parquet")
    tsv = project / "data/cc12m/cc12m.tsv"
    tsv.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text("".join(f"{base_url}/{u}\t{c}\n" for u, c in zip(rows["url"], rows["caption"]) if not u.startswith("refused:")))


@pytest.fixture(scope="module")
def production_env(tmp_path_factory, mlflow_server, s3_server):
    """Local Prefect server and process worker whose environment is a production pod's: the MLflow server
    (with a password in its URI: the server ignores it, every client sends it), S3 credentials and endpoint."""
    home = migrated_prefect_home(tmp_path_factory.mktemp("prefect"), tmp_path_factory)
    secrets = {"password": f"pw{uuid.uuid4().hex}", "secret_key": f"sk{uuid.uuid4().hex}"}
    env = {
        **os.environ, **TELEMETRY_OFF, "PREFECT_HOME": str(home), "PY": sys.executable,
        "PREFECT_WORKER_QUERY_SECONDS": "1", "GALIP_PREFECT_PORT": str(free_port()), "GALIP_MLFLOW_PORT": str(free_port()),
        "MLFLOW_TRACKING_URI": mlflow_server.replace("http://", f"http://galip:{secrets['password']}@"),
        "AWS_ENDPOINT_URL": s3_server, "GALIP_MLFLOW_UI_URL": mlflow_server,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": secrets["secret_key"],  # moto takes any key
    }  # fmt: skip
    for k in ("PREFECT_API_URL", "MLFLOW_RUN_ID"):
        env.pop(k, None)
    try:
        up = local_script(env, "prefect_server_up", "prefect_worker_up")
        assert up.returncode == 0, up.stdout + up.stderr
        port = (home / "prefect.port").read_text().strip()
        yield {"env": {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, "home": home, **secrets}
    finally:
        local_script(env, "prefect_down")


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def cc12m_runs(tmp_path_factory, s3_server, production_env) -> dict:
    """The cc12m profile run twice on the same params.yaml: through the Prefect deployment, then `dvc repro`."""
    import boto3

    from galip.config import write_profile
    from galip.data.demo_data import make_demo_dataset
    from galip.data.download import serve_directory

    tmp = tmp_path_factory.mktemp("cc12m")
    bucket = f"galip-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    env = production_env["env"]
    project = make_tiny_project(tmp / "project")
    cfg = write_profile("cc12m", project / "params.yaml", size_overrides(project, s3_server, bucket))
    assert cfg.profile == "cc12m" and cfg.flow.use_dvc is False and cfg.mlflow.gate_metric == "fid"
    make_demo_dataset(tmp / "source", N_IMAGES, 64, seed=0)
    dvc_env = {k: v for k, v in env.items() if k not in ("PREFECT_API_URL",)}
    dvc_env["PATH"] = f"{Path(venv_bin('dvc')).parent}:{env['PATH']}"  # the stage commands (galip, torchrun)

    with serve_directory(tmp / "source") as base_url:
        url_list(project, tmp / "source", base_url)
        # --- 1. Prefect: the cc12m deployment on a worker, stages run directly (no DVC) ----------------
        run([venv_bin("python"), "-m", "flows.deploy_local", "galip-local"], project, env)
        watched = subprocess.run([venv_bin("prefect"), "deployment", "run", "galip-train/cc12m", "--watch", "--watch-interval", "2"],
                                 cwd=project, env=env, capture_output=True, text=True, timeout=1200, check=False)
        worker_log = (production_env["home"] / "worker.log").read_text()
        assert watched.returncode == 0, watched.stdout[-2000:] + worker_log[-8000:]
        assert "[download] galip download" in worker_log and "dvc repro" not in worker_log

        # --- 2. dvc repro of the same params.yaml ---------------------------------------------------------
        out = run([venv_bin("dvc"), "repro"], project, dvc_env, timeout=1200)
        assert re.findall(r"Running stage '(\w+)'", out) == ["download", "clip", "train", "evaluate", "register"]
    return {"project": project, "cfg": cfg, "bucket": bucket, "dvc_env": dvc_env, "output": watched.stdout + watched.stderr + out}


def test_cc12m_in_miniature_through_the_flow_then_dvc_repro_then_traced_to_its_shards_and_no_secret_stored(
    cc12m_runs, production_env, mlflow_server, postgres_server, s3_server
):
    # one test, not two: xdist would run a shared fixture of two tests once per worker
    check_one_record_traced_to_its_shards(cc12m_runs, mlflow_server)
    check_no_password_or_secret_key_reaches_any_store(cc12m_runs, production_env, postgres_server, s3_server)


def check_one_record_traced_to_its_shards(cc12m_runs: dict, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    project, cfg, bucket, dvc_env = (cc12m_runs[k] for k in ("project", "cfg", "bucket", "dvc_env"))
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("galip")
    # other tests share the MLflow server: this test's runs are those that read its bucket
    ours = client.search_runs([experiment.experiment_id], filter_string=f"tags.`data.shards_dir` = 's3://{bucket}/cc12m/shards'")
    flow_run, dvc_run = sorted(ours, key=lambda r: r.info.start_time)
    assert flow_run.data.tags.get("prefect.flow_run_url") and "prefect.flow_run_url" not in dvc_run.data.tags
    for r in (flow_run, dvc_run):
        assert r.info.status == "FINISHED" and r.data.tags["galip.stages"] == "download,clip,train,evaluate,register"
        assert r.data.params == {} and r.data.tags["profile"] == "cc12m" and r.data.tags["data.shards_dir"] == f"s3://{bucket}/cc12m/shards"
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server to S3"
    # --- 3. one record whichever entry point ran it --------------------------------------------------------
    assert set(run_config_tags(client, flow_run)) == set(run_config_tags(client, dvc_run))
    assert set(flow_run.data.metrics) == set(dvc_run.data.metrics)
    assert {"fid", "fd_clip", "clip_score_eval", "clip_score_train", "loss_g"} <= set(flow_run.data.metrics) and "data.successes" in flow_run.data.tags
    (flow_input,), (dvc_input,) = flow_run.inputs.dataset_inputs, dvc_run.inputs.dataset_inputs
    assert flow_input.dataset.digest == dvc_input.dataset.digest == flow_run.data.tags["data.manifest_hash"]
    assert flow_run.data.tags["data.manifest_md5"] == dvc_run.data.tags["data.manifest_md5"], "the same shards: the same data version"
    versions = {v.run_id: v for v in client.search_model_versions("name='galip'")}
    assert set(versions) == {flow_run.info.run_id, dvc_run.info.run_id}, "a model logged and registered from each"
    # the FID gate decided: champion only if FID (of stand-in weights) met the bar
    for v in versions.values():
        fid = float(v.tags["fid"])
        assert ("meets the bar" in v.tags["gate_decision"]) == (fid <= cfg.mlflow.gate_bar), v.tags["gate_decision"]

    # --- 4. a model version back to its data: run, commit, config, manifest; the shards fetched and verified --
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    manifest_out = {o["path"]: o for o in lock["download"]["outs"]}[cfg.data.manifest]
    assert manifest_out["md5"] == versions[dvc_run.info.run_id].tags["data.manifest_md5"], "dvc.lock names the version's data"
    flow_version = versions[flow_run.info.run_id].version
    traced = json.loads(run([venv_bin("galip"), "trace", str(flow_version), "--manifest", "trace/manifest.json"], project, dvc_env))
    assert traced["run_id"] == flow_run.info.run_id and len(traced["git_commit"]) == 40
    verified = json.loads(run([venv_bin("galip"), "verify-data", "--manifest", "trace/manifest.json", "--to", "trace/shards"], project, dvc_env))
    assert verified["verified"] == verified["shards"] >= 2 and not verified["mismatches"]


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
        s3.get_object(Bucket=bucket["Name"], Key=o["Key"])["Body"].read().decode("utf-8", "replace")
        for bucket in s3.list_buckets()["Buckets"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"])
        for o in page.get("Contents", [])
    ]
    return dump + "\n".join(bodies)


def check_no_password_or_secret_key_reaches_any_store(cc12m_runs: dict, production_env: dict, postgres_server: str, s3_server: str) -> None:
    """The runs above had a password in MLFLOW_TRACKING_URI and a secret key in the environment. Every place
    the project writes to is scanned for both: the Prefect server's database and home (flow-run logs,
    artifacts, events, states, results) and its API answers, the MLflow database (PostgreSQL) and artifact
    store (S3 on moto), the run's files, and the commands' output. Then once more with the tracking server
    unreachable (the flow fails)."""
    password, secret_key, project = production_env["password"], production_env["secret_key"], cc12m_runs["project"]
    dead = f"127.0.0.1:{free_port()}"
    down = {**production_env["env"], "MLFLOW_TRACKING_URI": f"http://galip:{password}@{dead}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    params = {"profile": "cc12m", "overrides": ["train.out_dir=runs/down"]}
    failed = subprocess.run([sys.executable, "-m", "flows.galip_train", json.dumps(params)],
                            cwd=project, env=down, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert failed.returncode != 0

    time.sleep(5)  # the Prefect server persists events asynchronously
    api = prefect_api_dump(production_env["env"]["PREFECT_API_URL"])
    stores = {
        "prefect api": api,
        "prefect home (database, results, worker log)": files_text(production_env["home"]),
        "mlflow database and artifacts": mlflow_stores_text(postgres_server, s3_server),
        "project files (runs, logs, dvc cache)": files_text(project),
        "commands' output": cc12m_runs["output"] + failed.stdout + failed.stderr,
    }
    for where, text in stores.items():
        assert password not in text, f"the tracking password is in the {where}"
        assert secret_key not in text, f"the secret key is in the {where}"
    # the scans saw the real thing: the run's MLflow link was logged and stored, with the password masked
    # (the link itself points at the MLflow UI address, GALIP_MLFLOW_UI_URL, which holds no credentials)
    assert "MLflow run" in api
    assert f"galip:***@{dead}" in api, "the failed run's state message, masked"
    assert f"galip:***@{dead}" in failed.stdout + failed.stderr
