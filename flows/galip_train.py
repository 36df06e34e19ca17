"""Prefect flow ``galip-train``: preflight -> download -> data report -> [demo: CLIP] -> train -> evaluate -> register.

Tasks are thin: each stage is one ``galip`` command line, the very command the matching dvc.yaml stage
runs (tests/test_flow.py checks that they are equal). With ``flow.use_dvc`` (demo profile) a task runs
``dvc repro --single-item <stage>`` instead of the command itself, so DVC decides what is up to date
and dvc.lock records what was produced from what, whether the flow or a user ran it. Without it
(production pods, or parameter overrides from the Prefect form) the commands run directly and the
train stage resumes from the newest checkpoint in ``train.out_dir``.

Re-running after a failure skips completed steps: a retried flow run reuses the persisted results of
its completed tasks (Prefect's default cache policy is keyed on the run id), and a new run skips the
stages DVC finds up to date. The flow owns the MLflow run: it passes ``MLFLOW_RUN_ID`` to every stage
process, so the trainer logs its losses and sample grids into the same run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, field_validator, model_validator

from galip.config import Config, ConfigError, load_config
from galip.redact import RedactFilter, redact

ROOT = Path.cwd()
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
}
# tqdm redraws its bar with '\r'; forward at most one redraw per this many seconds to the run log.
PROGRESS_EVERY_S = 15.0


class StageFailed(RuntimeError):
    """A stage process exited non-zero; the message has its command and last log lines."""


# Run logs, artifacts and state messages land in the Prefect server's database: credentials in a
# tracking URI (http://user:password@host) are masked in all of them. Log records are filtered here;
# stage output lines in stream_process; exception messages (a failed run's state) by redacted_errors.
for _run_logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_run_logger).addFilter(RedactFilter())


class RedactedError(RuntimeError):
    """An exception whose message held a credential, raised again with it masked."""


def redacted_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if redact(str(exc)) == str(exc):
                raise
            # from None: the original (with the secret) must not be printed as the cause either
            raise RedactedError(f"{type(exc).__name__}: {redact(str(exc))}") from None

    return wrapper


class GalipTrainParams(BaseModel):
    """Parameters of galip-train, validated against params.yaml before any work starts."""

    profile: str = Field("demo", description="profile from params.yaml: demo (CPU, embedded) or cc12m (production)")
    overrides: list[str] = Field(
        default_factory=list,
        description="DVC-style overrides, e.g. train.lr_g=2e-4 or train.max_steps=2000 (stages then run without DVC)",
    )
    params_file: str = Field("params.yaml", description="params file, relative to the deployment's working directory")
    register_model: bool = Field(True, description="log the model to MLflow, register it and run the champion gate")

    @field_validator("overrides")
    @classmethod
    def _key_value(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if "=" not in o]
        if bad:
            raise ValueError(f"overrides must be KEY=VALUE (e.g. train.lr_g=2e-4), got {bad}")
        return v

    @model_validator(mode="after")
    def _resolves(self) -> GalipTrainParams:
        self.config()  # unknown keys, wrong types, unknown profile: rejected here, naming the key
        return self

    def config(self) -> Config:
        try:
            cfg = load_config(self.params_file, self.overrides, self.profile)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if cfg.clip_pretrain.enabled:
            # Later stages load the CLIP the clip stage writes (a fixed path: dvc.yaml declares it).
            cfg = load_config(self.params_file, [*self.overrides, f"model.clip_pretrained={cfg.clip_pretrain.out_path}"], self.profile)
        return cfg

    def uses_dvc(self) -> bool:
        return self.config().flow.use_dvc and not self.overrides


# ---------------------------------------------------------------------------------------------
# Stage command lines: the single definition the flow runs and dvc.yaml's stages must equal.
# ---------------------------------------------------------------------------------------------
def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("-S", o)]


def stage_commands(params: GalipTrainParams) -> dict[str, list[str]]:
    cfg = params.config()
    base = ["--profile", cfg.profile, *(["--params", params.params_file] if params.params_file != "params.yaml" else [])]
    extra = _set_args(params.overrides)
    clip = _set_args([f"model.clip_pretrained={cfg.clip_pretrain.out_path}"]) if cfg.clip_pretrain.enabled else []
    nproc = cfg.flow.nproc_per_node
    torchrun = ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
    commands = {
        "download": ["galip", "download", *base, *extra],
        "train": [*torchrun, "-m", "galip.train", *base, *extra, *clip, "--resume"],
        "evaluate": [*(torchrun + ["-m", "galip.evaluate"] if nproc > 1 else ["galip", "evaluate"]), *base, *extra, *clip],
    }
    if cfg.clip_pretrain.enabled:
        commands["clip"] = ["galip", "train-clip", *base, *extra]
    return commands


# ---------------------------------------------------------------------------------------------
# Running a stage with its log in the Prefect run log
# ---------------------------------------------------------------------------------------------
def stream_process(argv: list[str], env: dict[str, str], emit: Callable[[str], None]) -> list[str]:
    """Run ``argv`` and pass each output line to ``emit``; progress-bar redraws are thinned out."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[str] = []
    buf, last_progress = b"", 0.0
    assert proc.stdout is not None
    try:
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            buf += chunk
            *pieces, buf = re.split(rb"(\r|\n)", buf)
            for text, sep in zip(pieces[0::2], pieces[1::2]):
                line = redact(text.decode(errors="replace").rstrip())
                if not line:
                    continue
                now = time.monotonic()
                if sep == b"\r" and now - last_progress < PROGRESS_EVERY_S:
                    continue
                last_progress = now if sep == b"\r" else last_progress
                emit(line)
                tail = (tail + [line])[-30:]
        if buf.strip():
            emit(redact(buf.decode(errors="replace").rstrip()))
    finally:
        rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"`{shlex.join(argv)}` exited {rc}; last lines:\n" + "\n".join(tail[-15:]))
    return tail


def stage_env(mlflow_run_id: str | None, tracking_uri: str | None) -> dict[str, str]:
    env = {**os.environ, **TELEMETRY_OFF, "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # The stages' console scripts live next to this interpreter (the worker may not have the venv on PATH).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if mlflow_run_id and tracking_uri:
        env.update(MLFLOW_RUN_ID=mlflow_run_id, MLFLOW_TRACKING_URI=tracking_uri)
    return env


def run_stage(name: str, params: GalipTrainParams, mlflow_run_id: str | None, tracking_uri: str | None) -> None:
    logger = get_run_logger()
    argv = ["dvc", "repro", "--single-item", name] if params.uses_dvc() else stage_commands(params)[name]
    logger.info("[%s] %s", name, shlex.join(argv))
    t0 = time.perf_counter()
    stream_process(argv, stage_env(mlflow_run_id, tracking_uri), lambda line: logger.info("[%s] %s", name, line))
    logger.info("[%s] done in %.1f s", name, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------
@task(name="preflight")
@redacted_errors
def preflight(params: GalipTrainParams) -> None:
    """Fail at once, naming every missing prerequisite (GPUs, CLIP weights, data list), instead of later."""
    from galip.preflight import missing_prerequisites

    problems = missing_prerequisites(params.config())
    if problems:
        raise RuntimeError(f"galip-train/{params.profile} cannot run on this machine:\n- " + "\n- ".join(problems))
    get_run_logger().info("preflight ok: profile %s, %s", params.profile, "dvc repro stages" if params.uses_dvc() else "direct stages")


@task(name="download", retries=2, retry_delay_seconds=[10, 60], persist_result=True)
@redacted_errors
def download(params: GalipTrainParams, mlflow_run_id: str, tracking_uri: str) -> dict[str, Any]:
    """img2dataset into shards; network-bound, so retried (img2dataset resumes finished shards)."""
    from galip.download import ensure_demo_source, output_paths

    cfg = params.config()
    if cfg.data.demo_images:
        # The demo source is DVC-tracked (data.dvc) and regenerated byte for byte when absent.
        ensure_demo_source(cfg.data)
    run_stage("download", params, mlflow_run_id, tracking_uri)
    paths = output_paths(cfg.data)
    report = json.loads(paths["report"].read_text())
    return {"report": str(paths["report"]), "manifest": str(paths["manifest"]), "manifest_hash": report["manifest_hash"], **report}


@task(name="data-report")
@redacted_errors
def data_report(report: dict[str, Any], mlflow_run_id: str) -> str:
    """The data report as a Prefect markdown artifact and an MLflow artifact; the manifest hash as a param."""
    import mlflow

    rows = ["rows", "successes", "failed", "success_rate", "malformed_rows", "shards", "bytes", "images_per_s"]
    lines = ["| metric | value |", "|---|---|", *(f"| {k} | {report.get(k)} |" for k in rows)]
    lines += [f"| failed: {reason[:80]} | {n} |" for reason, n in (report.get("failure_reasons") or {}).items()]
    lines += ["", f"manifest `{report['manifest']}` sha256/16 `{report['manifest_hash']}`"]
    markdown = "# Data report\n\n" + "\n".join(lines)
    create_markdown_artifact(markdown, key="data-report", description="img2dataset result and shard manifest")
    client = mlflow.MlflowClient()
    client.set_tag(mlflow_run_id, "data.manifest_hash", report["manifest_hash"])
    client.log_artifact(mlflow_run_id, report["report"], "data")
    client.log_artifact(mlflow_run_id, report["manifest"], "data")
    get_run_logger().info("data: %s images in %s shards (manifest %s)", report.get("successes"), report.get("shards"), report["manifest_hash"])
    return markdown


@task(name="train-clip", persist_result=True)
@redacted_errors
def train_clip(params: GalipTrainParams, mlflow_run_id: str, tracking_uri: str) -> str:
    """Demo only: open_clip_train fits the tiny CLIP to the demo captions."""
    run_stage("clip", params, mlflow_run_id, tracking_uri)
    return params.config().clip_pretrain.out_path


@task(name="train", persist_result=True)
@redacted_errors
def train(params: GalipTrainParams, mlflow_run_id: str, tracking_uri: str) -> str:
    """torchrun -m galip.train; the trainer logs losses and sample grids to the MLflow run itself."""
    from galip.checkpoint import latest_checkpoint

    run_stage("train", params, mlflow_run_id, tracking_uri)
    cfg = params.config()
    ckpt = latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints")
    if ckpt is None:
        raise StageFailed(f"training finished but {cfg.train.out_dir}/checkpoints holds no checkpoint")
    import mlflow

    for name in ("train_log.csv", "config.yaml"):
        if (Path(cfg.train.out_dir) / name).is_file():
            mlflow.MlflowClient().log_artifact(mlflow_run_id, str(Path(cfg.train.out_dir) / name), "train")
    return str(ckpt)


@task(name="evaluate", persist_result=True)
@redacted_errors
def evaluate(params: GalipTrainParams, mlflow_run_id: str, tracking_uri: str) -> dict[str, Any]:
    """galip evaluate; metrics go to MLflow and to a Prefect table artifact."""
    import mlflow

    run_stage("evaluate", params, mlflow_run_id, tracking_uri)
    cfg = params.config()
    out = Path(cfg.eval.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    client = mlflow.MlflowClient()
    step = int(metrics.get("protocol", {}).get("step", 0))
    ts = int(time.time() * 1000)
    client.log_batch(mlflow_run_id, metrics=[mlflow.entities.Metric(f"eval/{k}", v, ts, step) for k, v in flat.items()])
    client.log_artifact(mlflow_run_id, str(out / "metrics.json"), "eval")
    grid = out / "samples.png"
    if grid.is_file():
        from PIL import Image

        with Image.open(grid) as img:
            client.log_image(mlflow_run_id, img.copy(), key="eval_samples", step=step)
    create_table_artifact([{"metric": k, "value": round(v, 5)} for k, v in flat.items()], key="metrics", description=f"evaluation at step {step}")
    get_run_logger().info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in flat.items()))
    return {"metrics": flat, "checkpoint": metrics.get("protocol", {}).get("checkpoint"), "grid": str(grid.resolve())}


@task(name="register")
@redacted_errors
def register(params: GalipTrainParams, checkpoint: str, metrics: dict[str, float], mlflow_run_id: str) -> dict[str, Any]:
    """Log the pyfunc, register it (alias challenger) and apply the champion gate."""
    from dataclasses import asdict

    from galip import registry

    cfg = params.config()
    model_uri = registry.log_model(cfg, Path(checkpoint), mlflow_run_id)
    version, decision = registry.register(cfg, model_uri, mlflow_run_id, metrics)
    logger = get_run_logger()
    logger.info("registered %s version %s (alias %s)", cfg.mlflow.model_name, version, cfg.mlflow.challenger_alias)
    logger.info("gate: %s", decision.reason)
    return {"name": cfg.mlflow.model_name, "version": version, "model_uri": model_uri, **asdict(decision)}


# ---------------------------------------------------------------------------------------------
# MLflow run owned by the flow
# ---------------------------------------------------------------------------------------------
def absolute_tracking_uri(cfg: Config) -> str:
    """Stage processes may run elsewhere in the tree: make a relative SQLite path absolute."""
    from galip.registry import tracking_uri

    uri = tracking_uri(cfg)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((ROOT / uri[len(prefix) :]).resolve())
    return uri


def git_commit() -> tuple[str, bool]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return git("rev-parse", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))


def mlflow_links(tracking_uri: str, experiment_id: str, run_id: str) -> tuple[str, str]:
    """(URL of the run in the MLflow UI, how to open that UI); credentials masked (they are shown and stored)."""
    tracking_uri = redact(tracking_uri)
    if tracking_uri.startswith("http"):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}", tracking_uri
    ui = f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
    return f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}", ui


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": str(v)[:6000]})
    return out


@flow(name="galip-train", log_prints=True)
@redacted_errors
def galip_train(params: GalipTrainParams = GalipTrainParams()) -> dict[str, Any]:
    """Download, [train the demo CLIP], train GALIP, evaluate, register and gate; one MLflow run for all of it."""
    import mlflow

    logger = get_run_logger()
    cfg = params.config()
    preflight(params)
    uri = absolute_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(cfg.mlflow.experiment)
    commit, dirty = git_commit()
    tags = {"mlflow.source.git.commit": commit, "git.dirty": str(dirty), "galip.profile": cfg.profile, "prefect.flow_run_id": str(flow_run.id)}
    with mlflow.start_run(run_name=str(flow_run.name or "galip-train"), tags=tags, log_system_metrics=True) as run:
        run_id = run.info.run_id
        mlflow.MlflowClient().log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in _flat({**cfg.to_dict(), "world_size": cfg.flow.nproc_per_node}).items()])
        run_url, ui = mlflow_links(uri, experiment.experiment_id, run_id)
        create_link_artifact(run_url, link_text="MLflow run", key="mlflow-run", description=f"open the UI with: {ui}")
        logger.info("MLflow run %s (%s)", run_id, run_url)

        report = download.with_options(retries=cfg.flow.download_retries)(params, run_id, uri)
        data_report(report, run_id)
        if cfg.clip_pretrain.enabled:
            train_clip(params, run_id, uri)
        checkpoint = train(params, run_id, uri)
        evaluation = evaluate(params, run_id, uri)
        create_link_artifact(f"file://{evaluation['grid']}", link_text="sample grid", key="sample-grid", description="evaluation samples, one row per train.sample_prompts")
        result: dict[str, Any] = {"mlflow_run_id": run_id, "mlflow_run_url": run_url, "mlflow_ui": ui, "checkpoint": checkpoint, "grid": evaluation["grid"], "metrics": evaluation["metrics"]}
        if params.register_model:
            result["model"] = register(params, evaluation["checkpoint"] or checkpoint, evaluation["metrics"], run_id)
    logger.info("result: %s", json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    galip_train(GalipTrainParams(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
