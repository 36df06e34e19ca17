"""Prefect flow ``galip-train``: preflight -> download -> data report -> [demo: CLIP] -> train -> evaluate -> register.

Tasks are thin: each stage is one ``galip`` command line, the very command the matching dvc.yaml stage
runs (tests/test_dvc.py checks that they are equal). With ``flow.use_dvc`` (demo profile) a task runs
``dvc repro --single-item <stage>`` instead of the command itself, so DVC decides what is up to date
and dvc.lock records what was produced from what, whether the flow or a user ran it. Without it
(production pods, or parameter overrides from the Prefect form) the commands run directly and the
train stage resumes from the newest checkpoint in ``train.out_dir``. With ``kube.nodes > 1`` the train
task instead submits an Indexed Job (galip.ops.kube.train_job), streams pod 0's log and fails when the
Job fails; one node trains here with ``torchrun --standalone``.

Re-running after a failure skips completed steps: a retried flow run reuses the persisted results of
its completed tasks (Prefect's default cache policy is keyed on the run id), and a new run skips the
stages DVC finds up to date. The flow owns the MLflow run: it passes ``MLFLOW_RUN_ID`` to every stage
process, so the trainer logs its losses and sample grids into the same run.

Each task receives what the previous one produced (or waits for it), so the flow-run graph draws the
chain preflight -> download -> data-report -> train-clip -> train -> evaluate -> register. The MLflow
run and the Prefect flow run link to each other; images are embedded in the Prefect artifacts.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
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
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel, Field, field_validator, model_validator

from galip.config import Config, ConfigError, load_config
from galip.ops.kube import runs_as_job, train_job
from galip.ops.redact import RedactFilter, redact
from galip.telemetry import TELEMETRY_OFF

ROOT = Path.cwd()
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
        cfg = self.config()  # unknown keys, wrong types, unknown profile: rejected here, naming the key
        if self.register_model:
            from galip.ops.registry import check_gate_metric

            try:
                check_gate_metric(cfg)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
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
        "train": [*torchrun, "-m", "galip", "train", *base, *extra, *clip, "--resume"],
        "evaluate": [*(torchrun + ["-m", "galip", "evaluate"] if nproc > 1 else ["galip", "evaluate"]), *base, *extra, *clip],
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
    except BaseException:
        # Interrupted (SIGTERM from a stop, a cancellation): the stage must not outlive the flow run.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
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


# DVC's advice after each stage (git add dvc.lock, autostage, dvc push): the flow needs none of it.
DVC_HINTS = re.compile(r"^\s*(To track the changes with git|git add dvc\.lock|To enable auto staging|dvc config core\.autostage|Use `dvc push`)")


def run_stage(
    name: str, params: GalipTrainParams, mlflow_run_id: str | None, tracking_uri: str | None, log: Callable[[str], None] | None = None
) -> None:
    log = log or get_run_logger().info
    argv = ["dvc", "repro", "--single-item", name] if params.uses_dvc() else stage_commands(params)[name]
    log(f"[{name}] {shlex.join(argv)}")
    t0 = time.perf_counter()

    def emit(line: str) -> None:
        if not DVC_HINTS.match(line):
            log(f"[{name}] {line}")

    stream_process(argv, stage_env(mlflow_run_id, tracking_uri), emit)
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")


def launch_training(
    params: GalipTrainParams, mlflow_run_id: str, tracking_uri: str, run_id: str, log: Callable[[str], None], kube_api: Any = None
) -> None:
    """kube.nodes > 1: an Indexed Job through galip.ops.kube (the task fails with the Job); else the train stage here."""
    cfg = params.config()
    if runs_as_job(cfg):
        train_job(cfg, run_id=run_id, mlflow_run_id=mlflow_run_id, api=kube_api, log=lambda line: log(f"[train] {line}"))
    else:
        run_stage("train", params, mlflow_run_id, tracking_uri, log)


# ---------------------------------------------------------------------------------------------
# Where people look: the two UIs and images inside Prefect artifacts
# ---------------------------------------------------------------------------------------------
class Links(BaseModel):
    """Addresses of this flow run's records in the MLflow UI and the Prefect UI."""

    mlflow_ui: str
    experiment_id: str
    run_id: str
    flow_run_url: str = ""

    @property
    def run_url(self) -> str:
        return f"{self.mlflow_ui}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def artifact_url(self, path: str) -> str:
        """The file itself, as the MLflow UI serves it (a browser opens it while the UI runs)."""
        return f"{self.mlflow_ui}/get-artifact?path={path}&run_uuid={self.run_id}"

    def model_version_url(self, name: str, version: str) -> str:
        return f"{self.mlflow_ui}/#/models/{name}/versions/{version}"


def mlflow_ui_url(cfg: Config, tracking_uri: str) -> str:
    """GALIP_MLFLOW_UI_URL (what `make ui`/`make demo` serve), else mlflow.ui_url, else the tracking server."""
    url = os.environ.get("GALIP_MLFLOW_UI_URL") or cfg.mlflow.ui_url
    if not url and tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri
    return redact((url or "http://127.0.0.1:5000").rstrip("/"))  # links are shown and stored: no password in them


def embedded_image(path: Path, max_width: int = 1024) -> str:
    """A markdown image holding the picture itself (JPEG data URI): Prefect's UI renders it, offline too."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.width > max_width:
            img = img.resize((max_width, round(img.height * max_width / img.width)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
    return f"![{path.name}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"


# Time a flow run whose worker vanished gets to record its end (Prefect state, MLflow run) before it is killed.
REPORT_GRACE_S = 30.0


def _stop_with_worker(on_timeout: list[Callable[[], None]], interval_s: float = 2.0) -> None:
    """A worker-launched flow run lives in its own process group, which a killed worker would leave
    behind (engine, dvc, torchrun, trainer). When the worker goes, SIGTERM our group: Prefect then
    marks the run Crashed and the MLflow run ends FAILED. Whatever is still running after
    REPORT_GRACE_S (reports retry for minutes when the server went down too) gets ``on_timeout``'s
    calls, then SIGKILL; flows.reap records the Prefect state when the server is back."""
    parent = os.getppid()
    if not os.environ.get("PREFECT__FLOW_RUN_ID") or parent == 1:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        # Signal first: our stderr was a pipe to the dead worker, so writing to it may fail.
        os.killpg(os.getpgrp(), signal.SIGTERM)
        time.sleep(REPORT_GRACE_S)
        for call in on_timeout:
            with contextlib.suppress(Exception):
                call()
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="stop-with-worker", daemon=True).start()


def end_mlflow_run_if_running(tracking_uri: str, run_id: str) -> Callable[[], None]:
    def end() -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")

    return end


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------
@task(name="preflight")
@redacted_errors
def preflight(params: GalipTrainParams) -> str:
    """Fail at once, naming every missing prerequisite (GPUs, CLIP weights, data list), instead of later."""
    from galip.ops.preflight import missing_prerequisites

    problems = missing_prerequisites(params.config())
    if problems:
        raise RuntimeError(f"galip-train/{params.profile} cannot run on this machine:\n- " + "\n- ".join(problems))
    summary = f"preflight ok: profile {params.profile}, {'dvc repro stages' if params.uses_dvc() else 'direct stages'}"
    get_run_logger().info(summary)
    return summary


@task(name="download", retries=2, retry_delay_seconds=[10, 60], persist_result=True)
@redacted_errors
def download(params: GalipTrainParams, mlflow_run_id: str, tracking_uri: str) -> dict[str, Any]:
    """img2dataset into shards; network-bound, so retried (img2dataset resumes finished shards)."""
    from galip.data.download import ensure_demo_source, output_paths

    cfg = params.config()
    if cfg.data.demo_images:
        # The demo source is DVC-tracked (data.dvc) and regenerated byte for byte when absent.
        ensure_demo_source(cfg.data)
    run_stage("download", params, mlflow_run_id, tracking_uri)
    paths = output_paths(cfg.data)
    report = json.loads(paths["report"].read_text())
    return {"report": str(paths["report"]), "manifest": str(paths["manifest"]), "manifest_hash": report["manifest_hash"], **report}


def log_training_dataset(report: dict[str, Any], profile: str) -> None:
    """The shard manifest as the run's training dataset input (name, digest = manifest hash, source = shards)."""
    import mlflow
    import pandas as pd

    manifest = json.loads(Path(report["manifest"]).read_text())
    table = pd.DataFrame(manifest["shards"], columns=["shard", "samples", "sha256", "bytes"])
    source = manifest["shards_dir"] if "://" in manifest["shards_dir"] else str(Path(manifest["shards_dir"]).resolve())
    dataset = mlflow.data.from_pandas(table, source=source, name=f"galip-{profile}-shards", digest=report["manifest_hash"])
    mlflow.log_input(dataset, context="training")


@task(name="data-report")
@redacted_errors
def data_report(report: dict[str, Any], profile: str, mlflow_run_id: str) -> str:
    """The data report as a Prefect markdown artifact and an MLflow artifact; the shard manifest as the
    run's training dataset."""
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
    log_training_dataset(report, profile)
    get_run_logger().info("data: %s images in %s shards (manifest %s)", report.get("successes"), report.get("shards"), report["manifest_hash"])
    return markdown


@task(name="train-clip", persist_result=True)
@redacted_errors
def train_clip(params: GalipTrainParams, mlflow_run_id: str, tracking_uri: str) -> str:
    """Demo only: open_clip_train fits the tiny CLIP to the demo captions."""
    run_stage("clip", params, mlflow_run_id, tracking_uri)
    return params.config().clip_pretrain.out_path


# Training grids shown in the Prefect artifact (all of them are in MLflow, one image per sample step).
ARTIFACT_GRIDS = 8


def training_samples_markdown(samples_dir: Path, prompts: list[str], links: Links) -> str:
    grids = sorted(samples_dir.glob("step_*.png"))
    lines = [
        "# Training samples",
        "",
        "Rows, fixed noise across steps:",
        "",
        *(f"{i + 1}. `{p}`" for i, p in enumerate(prompts)),
        "",
        f"Every sample step is in the [MLflow run]({links.run_url}) (Artifacts → images, or the run's image slider).",
    ]
    for grid in grids[-ARTIFACT_GRIDS:]:
        lines += ["", f"**step {int(grid.stem.removeprefix('step_'))}**", "", embedded_image(grid)]
    return "\n".join(lines)


@task(name="train", persist_result=True)
@redacted_errors
def train(params: GalipTrainParams, mlflow_run_id: str, tracking_uri: str, links: Links) -> str:
    """torchrun -m galip train here, or on kube.nodes pods; the trainer logs losses and sample grids to the MLflow run itself."""
    from galip.train.checkpoint import latest_checkpoint

    # The flow run's id names the Job, so a retried task follows the Job already running.
    launch_training(params, mlflow_run_id, tracking_uri, str(flow_run.id or mlflow_run_id), get_run_logger().info)
    cfg = params.config()
    out = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        raise StageFailed(f"training finished but {cfg.train.out_dir}/checkpoints holds no checkpoint")
    import mlflow

    for name in ("train_log.csv", "config.yaml"):
        if (out / name).is_file():
            mlflow.MlflowClient().log_artifact(mlflow_run_id, str(out / name), "train")
    if any((out / "samples").glob("step_*.png")):
        markdown = training_samples_markdown(out / "samples", list(cfg.train.sample_prompts), links)
        create_markdown_artifact(markdown, key="training-samples", description="sample grids during training (train.sample_prompts)")
    return str(ckpt)


@task(name="evaluate", persist_result=True)
@redacted_errors
def evaluate(params: GalipTrainParams, checkpoint: str, mlflow_run_id: str, tracking_uri: str, links: Links) -> dict[str, Any]:
    """galip evaluate on the trained checkpoint; metrics go to MLflow and to a Prefect table artifact."""
    import mlflow

    run_stage("evaluate", params, mlflow_run_id, tracking_uri)
    cfg = params.config()
    out = Path(cfg.eval.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    client = mlflow.MlflowClient()
    step = int(metrics.get("protocol", {}).get("step", 0))
    ts = int(time.time() * 1000)
    # The names of metrics.json (and of mlflow.gate_metric): one name per metric everywhere.
    client.log_batch(mlflow_run_id, metrics=[mlflow.entities.Metric(k, v, ts, step) for k, v in flat.items()])
    client.log_artifact(mlflow_run_id, str(out / "metrics.json"), "eval")
    grid = out / "samples.png"
    if grid.is_file():
        from PIL import Image

        client.log_artifact(mlflow_run_id, str(grid), "eval")
        with Image.open(grid) as img:
            client.log_image(mlflow_run_id, img.copy(), key="eval_samples", step=step)
        prompts = "\n".join(f"{i + 1}. `{p}`" for i, p in enumerate(cfg.train.sample_prompts))
        create_markdown_artifact(
            f"# Evaluation samples (step {step})\n\nRows, {cfg.eval.grid_n} seeds each:\n\n{prompts}\n\n{embedded_image(grid)}\n\n"
            f"Full size: [{grid.name} in the MLflow run]({links.artifact_url('eval/' + grid.name)})",
            key="sample-grid",
            description="evaluation samples, one row per train.sample_prompts",
        )
    create_table_artifact([{"metric": k, "value": float(f"{v:.4g}")} for k, v in flat.items()], key="metrics", description=f"evaluation at step {step}")
    get_run_logger().info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in flat.items()))
    protocol = metrics.get("protocol", {})
    chosen = protocol.get("checkpoint") or checkpoint
    from galip.ops.registry import selection_text

    selection = selection_text(protocol.get("selected_by"), chosen)
    get_run_logger().info("evaluated %s", selection)
    return {"metrics": flat, "checkpoint": chosen, "selection": selection, "grid": str(grid.resolve())}


@task(name="register")
@redacted_errors
def register(params: GalipTrainParams, evaluation: dict[str, Any], mlflow_run_id: str, links: Links) -> dict[str, Any]:
    """Log the pyfunc, register it (alias challenger), apply the champion gate; rule and decision go into
    the version's description and a Prefect artifact."""
    from dataclasses import asdict

    from galip.ops import registry

    cfg = params.config()
    m = cfg.mlflow
    model_uri = registry.log_model(cfg, Path(evaluation["checkpoint"]), mlflow_run_id)
    run_links = {"MLflow run": links.run_url, **({"Prefect flow run": links.flow_run_url} if links.flow_run_url else {})}
    version, decision = registry.register(cfg, model_uri, mlflow_run_id, evaluation["metrics"], run_links, evaluation.get("selection"))
    version_url = links.model_version_url(m.model_name, version)
    create_markdown_artifact(
        f"# Champion gate: {m.model_name} v{version}\n\n{registry.describe(cfg, decision, evaluation['metrics'], run_links)}\n\n"
        f"[{m.model_name} v{version} in the MLflow registry]({version_url}) · aliases: "
        f"`{m.challenger_alias}` = v{version}, `{m.champion_alias}` = {('v' + decision.champion_version) if decision.champion_version else 'none'}",
        key="gate",
        description=f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}",
    )
    logger = get_run_logger()
    logger.info("registered %s version %s (alias %s): %s", m.model_name, version, m.challenger_alias, version_url)
    logger.info("gate: %s", decision.reason)
    return {"name": m.model_name, "version": version, "model_uri": model_uri, "version_url": version_url, **asdict(decision)}


# ---------------------------------------------------------------------------------------------
# MLflow run owned by the flow
# ---------------------------------------------------------------------------------------------
def absolute_tracking_uri(cfg: Config) -> str:
    """Stage processes may run elsewhere in the tree: make a relative SQLite path absolute."""
    from galip.ops.registry import tracking_uri

    uri = tracking_uri(cfg)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((ROOT / uri[len(prefix) :]).resolve())
    return uri


def git_commit() -> tuple[str, bool]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return git("rev-parse", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))


def run_params(cfg: Config, stages: list[str], world_size: int) -> dict[str, str]:
    """The sections this run's stages read, flattened as MLflow params (the full config is an artifact)."""
    from galip.ops.tracking import flatten, stage_params

    return {k: str(v)[:6000] for k, v in flatten({**stage_params(cfg, stages), "flow": cfg.flow.model_dump(mode="json"), "world_size": world_size}).items()}


def run_tags(cfg: Config, flow_run_url: str) -> dict[str, str]:
    commit, dirty = git_commit()
    flow_name = flow_run.flow_name or "galip-train"
    link = f"[{flow_name} / {flow_run.name}]({flow_run_url})" if flow_run_url else f"{flow_name} / {flow_run.name}"
    return {
        # The run's "Source" in the MLflow UI: the flow, not Prefect's engine module that happens to run it.
        "mlflow.source.name": f"{flow_name} (flows/galip_train.py)",
        "mlflow.source.type": "JOB",
        "mlflow.source.git.commit": commit,
        "git.dirty": str(dirty),
        "galip.profile": cfg.profile,
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_url": flow_run_url,
        # The run's description (markdown in the MLflow UI): the way back to the Prefect flow run.
        "mlflow.note.content": f"Prefect flow run {link}, deployment `{deployment.name or 'none'}`, profile `{cfg.profile}`.",
    }


@flow(name="galip-train", log_prints=True)
@redacted_errors
def galip_train(params: GalipTrainParams = GalipTrainParams()) -> dict[str, Any]:
    """Download, [train the demo CLIP], train GALIP, evaluate, register and gate; one MLflow run for all of it."""
    import mlflow

    on_timeout: list[Callable[[], None]] = []
    _stop_with_worker(on_timeout)
    logger = get_run_logger()
    cfg = params.config()
    checked = preflight(params)
    uri = absolute_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(cfg.mlflow.experiment)
    flow_run_url = flow_run.ui_url if flow_run.id else ""
    stages = ["download", *(["clip"] if cfg.clip_pretrain.enabled else []), "train", "evaluate", *(["register"] if params.register_model else [])]
    run_name = f"{flow_run.flow_name or 'galip-train'}/{cfg.profile} {flow_run.name or ''}".strip()
    with mlflow.start_run(run_name=run_name, tags=run_tags(cfg, flow_run_url), log_system_metrics=True) as run:
        run_id = run.info.run_id
        on_timeout.append(end_mlflow_run_if_running(uri, run_id))
        links = Links(mlflow_ui=mlflow_ui_url(cfg, uri), experiment_id=experiment.experiment_id, run_id=run_id, flow_run_url=flow_run_url)
        world_size = cfg.kube.nodes * cfg.kube.gpus_per_node if runs_as_job(cfg) else cfg.flow.nproc_per_node
        mlflow.log_params(run_params(cfg, stages, world_size))
        mlflow.log_text(cfg.to_yaml(), "config/resolved.yaml")
        create_link_artifact(
            links.run_url,
            link_text=f"MLflow run {run_name}",
            key="mlflow-run",
            description=f"metrics, per-step sample grids, model; served by `make ui` at {links.mlflow_ui}",
        )
        logger.info("MLflow run %s: %s", run_id, links.run_url)

        report = download.with_options(retries=cfg.flow.download_retries)(params, run_id, uri, wait_for=[checked])
        shown = data_report(report, cfg.profile, run_id)
        clip = train_clip(params, run_id, uri, wait_for=[shown]) if cfg.clip_pretrain.enabled else shown
        checkpoint = train(params, run_id, uri, links, wait_for=[clip])
        evaluation = evaluate(params, checkpoint, run_id, uri, links)
        result: dict[str, Any] = {
            "mlflow_run_id": run_id, "mlflow_run_url": links.run_url, "checkpoint": checkpoint,
            "grid": evaluation["grid"], "metrics": evaluation["metrics"],
        }  # fmt: skip
        if params.register_model:
            result["model"] = register(params, evaluation, run_id, links)
    logger.info("result: %s", json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    galip_train(GalipTrainParams(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
