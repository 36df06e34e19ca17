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
version is traced back to its data version, whose shards are fetched and verified."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TELEMETRY_OFF, local_script, make_tiny_project, venv_bin, write_random_inception_weights
from helpers import write_shards

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


@pytest.fixture
def prefect_with_production_env(tmp_path, mlflow_server, s3_server):
    """Local Prefect server and process worker whose environment is a production pod's: the MLflow server,
    S3 credentials and endpoint."""
    from conftest import free_port

    env = {
        **os.environ, **TELEMETRY_OFF, "PREFECT_HOME": str(tmp_path / "prefect"), "PY": sys.executable,
        "PREFECT_WORKER_QUERY_SECONDS": "1", "GALIP_PREFECT_PORT": str(free_port()), "GALIP_MLFLOW_PORT": str(free_port()),
        "MLFLOW_TRACKING_URI": mlflow_server, "AWS_ENDPOINT_URL": s3_server, "GALIP_MLFLOW_UI_URL": mlflow_server,
    }  # fmt: skip
    for k in ("PREFECT_API_URL", "MLFLOW_RUN_ID"):
        env.pop(k, None)
    try:
        up = local_script(env, "prefect_server_up", "prefect_worker_up")
        assert up.returncode == 0, up.stdout + up.stderr
        port = (tmp_path / "prefect/prefect.port").read_text().strip()
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, env
    finally:
        local_script(env, "prefect_down")


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_cc12m_in_miniature_through_the_flow_then_dvc_repro_then_traced_to_its_shards(
    tmp_path, s3_bucket, mlflow_server, prefect_with_production_env
):
    from mlflow import MlflowClient

    from galip.config import load_config, write_profile
    from galip.data.demo_data import make_demo_dataset
    from galip.data.download import serve_directory

    endpoint, bucket = s3_bucket
    env, _ = prefect_with_production_env
    project = make_tiny_project(tmp_path / "project")
    cfg = write_profile("cc12m", project / "params.yaml", size_overrides(project, endpoint, bucket))
    assert cfg.profile == "cc12m" and cfg.flow.use_dvc is False and cfg.mlflow.gate_metric == "fid"
    make_demo_dataset(tmp_path / "source", N_IMAGES, 64, seed=0)
    client = MlflowClient(mlflow_server)

    with serve_directory(tmp_path / "source") as base_url:
        url_list(project, tmp_path / "source", base_url)
        # --- 1. Prefect: the cc12m deployment on a worker, stages run directly (no DVC) ----------------
        run([venv_bin("python"), "-m", "flows.deploy_local", "galip-local"], project, env)
        watched = subprocess.run([venv_bin("prefect"), "deployment", "run", "galip-train/cc12m", "--watch", "--watch-interval", "2"],
                                 cwd=project, env=env, capture_output=True, text=True, timeout=1200, check=False)
        worker_log = (Path(env["PREFECT_HOME"]) / "worker.log").read_text()
        assert watched.returncode == 0, watched.stdout[-2000:] + worker_log[-8000:]
        assert "[download] galip download" in worker_log and "dvc repro" not in worker_log

        # --- 2. dvc repro of the same params.yaml ---------------------------------------------------------
        dvc_env = {k: v for k, v in env.items() if k not in ("PREFECT_API_URL",)}
        dvc_env["PATH"] = f"{Path(venv_bin('dvc')).parent}:{env['PATH']}"  # the stage commands (galip, torchrun)
        out = run([venv_bin("dvc"), "repro"], project, dvc_env, timeout=1200)
        assert re.findall(r"Running stage '(\w+)'", out) == ["download", "clip", "train", "evaluate", "register"]

    experiment = client.get_experiment_by_name("galip")
    flow_run, dvc_run = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
    assert flow_run.data.tags.get("prefect.flow_run_url") and "prefect.flow_run_url" not in dvc_run.data.tags
    for r in (flow_run, dvc_run):
        assert r.info.status == "FINISHED" and r.data.tags["galip.stages"] == "download,clip,train,evaluate,register"
        assert r.data.params["profile"] == "cc12m" and r.data.tags["data.shards_dir"] == f"s3://{bucket}/cc12m/shards"
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server to S3"
    # --- 3. one record whichever entry point ran it --------------------------------------------------------
    assert set(flow_run.data.params) == set(dvc_run.data.params)
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

    # --- 5. dvc exp run -S on a key the profile sets reaches the run -----------------------------------------
    exp = run([venv_bin("dvc"), "exp", "run", "-S", "train.lr_g=0.0003"], project, dvc_env, timeout=1200)
    assert re.findall(r"Running stage '(\w+)'", exp) == ["train", "evaluate", "register"]
    assert load_config(project / "params.yaml").train.lr_g == 3e-4
    assert yaml.safe_load((project / "runs/cc12m/config.yaml").read_text())["train"]["lr_g"] == pytest.approx(3e-4)
