"""Prefect flow ``galip-train``: preflight -> download -> data report -> clip -> train -> evaluate -> register.

Tasks are thin: each stage is the ``galip`` command line galip/pipeline.py defines, which dvc.yaml's
stages also run. With ``flow.use_dvc`` (demo) a task runs ``dvc repro --single-item <stage>`` instead,
so DVC decides what is up to date and dvc.lock records what was produced from what. Without it
(production pods, a profile other than the one params.yaml holds, or overrides from the Prefect form)
the commands run directly and the train stage resumes from the newest checkpoint in ``train.out_dir``.
With ``kube.nodes > 1`` the train task instead submits an Indexed Job (galip.ops.kube.train_job),
streams pod 0's log and fails when the Job fails.

The flow opens the pipeline's MLflow run (galip.ops.pipeline_run.open_run: the same config tags as any other
entry point) and hands its id to every stage (``MLFLOW_RUN_ID``); each stage writes its own record
there. The flow adds only what belongs to Prefect: artifacts (data report, grids, metrics, gate) and
the links between the Prefect flow run and the MLflow run, both ways.

Re-running after a failure skips completed steps: a retried flow run reuses the persisted results of
its completed tasks (Prefect's default cache policy is keyed on the run id), and a new run skips the
stages DVC finds up to date.
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
from prefect.states import Failed, State
from pydantic import BaseModel, Field, field_validator, model_validator

from galip.config import Config, ConfigError, load_config, load_tree
from galip.ops.kube import runs_as_job, train_job
from galip.ops.pipeline_run import open_run, tracking_uri
from galip.pipeline import STAGES, stage_command
from galip.ops.redact import RedactFilter, redact, redact_every_log_record
from galip.telemetry import TELEMETRY_OFF

# The flow process talks to MLflow too (it owns the run): the same settings as the stages it starts.
for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)
ROOT = Path.cwd()
# tqdm redraws its bar with '\r'; forward at most one redraw per this many seconds to the run log.
PROGRESS_EVERY_S = 15.0
# Terminal control sequences (cursor moves such as ESC[A between stacked progress bars, colours): a run log
# is not a terminal, so they are dropped from stage output.
ANSI_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


class StageFailed(RuntimeError):
    """A stage process exited non-zero; the message has its command and last log lines."""


# Run logs, artifacts and state messages land in the Prefect server's database: credentials in a
# tracking URI (http://user:password@host) are masked in all of them. Log records are filtered here;
# stage output lines in stream_process; exception messages (a failed run's state) by redacted_errors.
for _run_logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_run_logger).addFilter(RedactFilter())
redact_every_log_record()  # also the records of libraries with their own handlers (MLflow's)


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

    profile: str = Field("demo", description="profile: demo (CPU, embedded) or cc12m (production); params.yaml, or the preset in profiles/")
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
        """The resolved config; the flow resolves it once per run and hands it to every task."""
        try:
            return load_config(self.params_file, self.overrides, self.profile)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def select(self) -> list[str]:
        """How each stage command finds this config: nothing (params.yaml) when it holds this profile."""
        file_profile = load_tree(self.params_file).get("profile")
        args = [] if file_profile == self.profile else ["--profile", self.profile]
        args += ["--params", self.params_file] if self.params_file != "params.yaml" else []
        return [*args, *(a for o in self.overrides for a in ("-S", o))]

    def uses_dvc(self, cfg: Config) -> bool:
        """`dvc repro` runs params.yaml as it is: only when the flow asks for nothing else."""
        return cfg.flow.use_dvc and not self.select()


def stage_commands(params: GalipTrainParams, cfg: Config) -> dict[str, list[str]]:
    return {stage: stage_command(stage, cfg, params.select()) for stage in STAGES}


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
                line = redact(ANSI_ESCAPE.sub("", text.decode(errors="replace")).rstrip())
                if not line:
                    continue
                now = time.monotonic()
                if sep == b"\r" and now - last_progress < PROGRESS_EVERY_S:
                    continue
                last_progress = now if sep == b"\r" else last_progress
                emit(line)
                tail = (tail + [line])[-30:]
        rest = ANSI_ESCAPE.sub("", buf.decode(errors="replace")).rstrip()
        if rest:
            emit(redact(rest))
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
    name: str, params: GalipTrainParams, cfg: Config, mlflow_run_id: str | None, tracking_uri: str | None,
    log: Callable[[str], None] | None = None,
) -> None:
    log = log or get_run_logger().info
    t0 = time.perf_counter()

    def emit(line: str) -> None:
        if not DVC_HINTS.match(line):
            log(f"[{name}] {line}")

    env = stage_env(mlflow_run_id, tracking_uri)
    if not params.uses_dvc(cfg):
        argvs = [stage_command(name, cfg, params.select())]
    elif name == "train" and resumable_under_dvc(cfg, log):
        # the stage's own command (it resumes), then dvc.lock records the result as `dvc repro` would have
        argvs = [stage_command(name, cfg, params.select()), ["dvc", "commit", "--force", name]]
    else:
        argvs = [["dvc", "repro", "--single-item", name]]
    for argv in argvs:
        log(f"[{name}] {shlex.join(argv)}")
        stream_process(argv, env, emit)
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")


# What the train stage's inputs were when `dvc repro` last started it (in train.out_dir, not a DVC output).
TRAIN_INPUTS = "dvc_train_inputs.json"


def resumable_under_dvc(cfg: Config, log: Callable[[str], None]) -> bool:
    """`dvc repro` deletes a stage's outputs before it runs it, so training killed mid-run (the demo killed
    outright, a closed laptop) would start over at step 0 under the next `make demo`. Resume instead when
    the checkpoints left in train.out_dir were written by a `dvc repro` of the train stage with the same
    inputs as now (DVC's run-cache key: its command, dependency hashes and params), i.e. by an attempt that
    was cut short; any changed input trains from scratch through `dvc repro`, as before."""
    from dvc.repo import Repo
    from dvc.stage.cache import _get_cache_hash  # the run cache's key: cmd, deps and params, not outs
    from dvc.stage.serialize import to_single_stage_lockfile

    from galip.train.checkpoint import list_checkpoints

    with Repo(str(ROOT)) as repo, repo.lock:
        (stage,) = repo.stage.collect("train")
        if not stage.changed():
            return False  # up to date: `dvc repro` does nothing
        stage.save_deps()
        key = _get_cache_hash(to_single_stage_lockfile(stage), key=True)
    record = Path(cfg.train.out_dir) / TRAIN_INPUTS
    found = list_checkpoints(Path(cfg.train.out_dir) / "checkpoints")
    try:
        # and every checkpoint is newer than the record: none predates the attempt (a `dvc repro` that
        # failed before it removed the outputs of an earlier run leaves those behind)
        same = json.loads(record.read_text()).get("key") == key and all(c.stat().st_mtime >= record.stat().st_mtime for c in found)
    except (OSError, ValueError):
        same = False
    if found and same:
        log(f"[train] {found[-1].name} is from a run of this stage with the same inputs that did not finish: resuming it")
        return True
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key}))
    return False


def launch_training(
    params: GalipTrainParams, cfg: Config, mlflow_run_id: str, tracking_uri: str, run_id: str, log: Callable[[str], None],
    kube_api: Any = None,
) -> None:
    """kube.nodes > 1: an Indexed Job through galip.ops.kube (the task fails with the Job); else the train stage here."""
    if runs_as_job(cfg):
        train_job(cfg, run_id=run_id, mlflow_run_id=mlflow_run_id, api=kube_api, log=lambda line: log(f"[train] {line}"))
    else:
        run_stage("train", params, cfg, mlflow_run_id, tracking_uri, log)


# ---------------------------------------------------------------------------------------------
# Where people look: the two UIs and images inside Prefect artifacts
# ---------------------------------------------------------------------------------------------
class Links(BaseModel):
    """Addresses of this flow run's records in the MLflow UI and the Prefect UI."""

    mlflow_ui: str
    experiment_id: str
    run_id: str
    flow_run_url: str = ""

    def _page(self, route: str) -> str:
        from galip.ops.tracking import UI_WORKFLOW_QUERY

        # MLflow's UI shows GenAI pages unless the link switches it to model training.
        return f"{self.mlflow_ui}/#/{route}?{UI_WORKFLOW_QUERY}"

    @property
    def experiment_url(self) -> str:
        return self._page(f"experiments/{self.experiment_id}")

    @property
    def run_url(self) -> str:
        return self._page(f"experiments/{self.experiment_id}/runs/{self.run_id}")

    def artifact_url(self, path: str) -> str:
        """The run's artifact page with ``path`` selected (a preview, not a download), while the UI runs."""
        return self._page(f"experiments/{self.experiment_id}/runs/{self.run_id}/artifactPath/{path}")

    def model_version_url(self, name: str, version: str) -> str:
        return self._page(f"models/{name}/versions/{version}")


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


# Time a flow run whose worker vanished gets to record its end (Prefect state, MLflow run) before it is
# killed, and the time its on_timeout calls get after that. With the 1 s poll, every process of the run is
# gone within 13 s of its worker; flows.reap records what a killed run could not.
REPORT_GRACE_S = 8.0
ON_TIMEOUT_S = 4.0


def _stop_with_worker(on_timeout: list[Callable[[], None]], interval_s: float = 1.0) -> None:
    """A worker-launched flow run lives in its own process group, which a killed worker would leave
    behind (engine, dvc, torchrun, trainer). When the worker goes, SIGTERM our group: Prefect then
    marks the run Crashed and the MLflow run ends FAILED. Whatever is still running after
    REPORT_GRACE_S (reports retry for minutes when the server went down too) gets ``on_timeout``'s
    calls, bounded by ON_TIMEOUT_S (they talk to servers that may be gone), then SIGKILL; flows.reap
    records the Prefect state when the server is back."""
    parent = os.getppid()
    if not os.environ.get("PREFECT__FLOW_RUN_ID") or parent == 1:
        return

    def calls() -> None:
        for call in on_timeout:
            with contextlib.suppress(Exception):
                call()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        # Signal first: our stderr was a pipe to the dead worker, so writing to it may fail.
        os.killpg(os.getpgrp(), signal.SIGTERM)
        time.sleep(REPORT_GRACE_S)
        last = threading.Thread(target=calls, name="on-timeout", daemon=True)
        last.start()
        last.join(ON_TIMEOUT_S)
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
def preflight(params: GalipTrainParams, cfg: Config) -> str | State:
    """Fail at once, naming every missing prerequisite (GPUs, CLIP weights, data list), instead of later.

    A Failed state, not an exception: its name says what is missing, and `prefect deployment run --watch`
    prints a run's state name as its last line (not the message); no traceback buries the list in the log."""
    from galip.ops.preflight import missing_prerequisites

    problems = missing_prerequisites(cfg)
    if problems:
        # returned, not raised: redacted here, as redacted_errors does for exceptions
        message = redact(f"galip-train/{params.profile} cannot run on this machine:\n- " + "\n- ".join(problems))
        get_run_logger().error(message)
        missing = ", ".join(p.split(":", 1)[0] for p in problems)  # each problem starts with what it is about
        return Failed(name=f"Preflight failed: {missing} missing", message=message)
    summary = f"preflight ok: profile {params.profile}, {'dvc repro stages' if params.uses_dvc(cfg) else 'direct stages'}"
    get_run_logger().info(summary)
    return summary


@task(name="download", retries=2, retry_delay_seconds=[10, 60], persist_result=True)
@redacted_errors
def download(params: GalipTrainParams, cfg: Config, mlflow_run_id: str, tracking_uri: str) -> dict[str, Any]:
    """img2dataset into shards; network-bound, so retried (img2dataset resumes finished shards)."""
    from galip.data.download import ensure_demo_source

    if cfg.data.demo_images:
        # The demo source is DVC-tracked (data.dvc) and regenerated byte for byte when absent.
        ensure_demo_source(cfg.data)
    run_stage("download", params, cfg, mlflow_run_id, tracking_uri)
    return json.loads(Path(cfg.data.report).read_text())


@task(name="data-report")
@redacted_errors
def data_report(report: dict[str, Any]) -> str:
    """The data report (which the download stage logged to MLflow) as a Prefect markdown artifact."""
    rows = ["rows", "successes", "failed", "success_rate", "malformed_rows", "shards", "bytes", "images_per_s"]
    lines = ["| metric | value |", "|---|---|", *(f"| {k} | {report.get(k)} |" for k in rows)]
    lines += [f"| failed: {reason[:80]} | {n} |" for reason, n in (report.get("failure_reasons") or {}).items()]
    lines += ["", f"manifest `{report['manifest']}` md5 `{report.get('manifest_md5')}` (the data version in dvc.lock and on the MLflow run)"]
    markdown = "# Data report\n\n" + "\n".join(lines)
    create_markdown_artifact(markdown, key="data-report", description="img2dataset result and shard manifest")
    get_run_logger().info("data: %s images in %s shards (manifest md5 %s)", report.get("successes"), report.get("shards"), report.get("manifest_md5"))
    return markdown


@task(name="train-clip", persist_result=True)
@redacted_errors
def train_clip(params: GalipTrainParams, cfg: Config, mlflow_run_id: str, tracking_uri: str) -> str:
    """The CLIP weights the later stages load: trained on the shards (demo) or the pretrained ones, pinned."""
    run_stage("clip", params, cfg, mlflow_run_id, tracking_uri)
    # A new object, not the config's own string: Prefect draws an edge to every later task whose arguments
    # hold an object a task returned, and every task gets the config.
    return str(Path(cfg.clip_pretrain.out_path))


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
def train(params: GalipTrainParams, cfg: Config, mlflow_run_id: str, tracking_uri: str, links: Links) -> str:
    """torchrun -m galip train here, or on kube.nodes pods; the trainer logs losses and sample grids to the MLflow run itself."""
    from galip.train.checkpoint import latest_checkpoint

    # The flow run's id names the Job, so a retried task follows the Job already running.
    launch_training(params, cfg, mlflow_run_id, tracking_uri, str(flow_run.id or mlflow_run_id), get_run_logger().info)
    out = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        raise StageFailed(f"training finished but {cfg.train.out_dir}/checkpoints holds no checkpoint")
    if any((out / "samples").glob("step_*.png")):
        markdown = training_samples_markdown(out / "samples", list(cfg.train.sample_prompts), links)
        create_markdown_artifact(markdown, key="training-samples", description="sample grids during training (train.sample_prompts)")
    return str(ckpt)


@task(name="evaluate", persist_result=True)
@redacted_errors
def evaluate(params: GalipTrainParams, cfg: Config, checkpoint: str, mlflow_run_id: str, tracking_uri: str, links: Links) -> dict[str, Any]:
    """galip evaluate on the trained checkpoint (it logs its metrics and grid to MLflow); Prefect gets a table and the grid."""
    run_stage("evaluate", params, cfg, mlflow_run_id, tracking_uri)
    out = Path(cfg.eval.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    step = int(metrics.get("protocol", {}).get("step", 0))
    grid = out / "samples.png"
    if grid.is_file():
        prompts = "\n".join(f"{i + 1}. `{p}`" for i, p in enumerate(cfg.train.sample_prompts))
        create_markdown_artifact(
            f"# Evaluation samples (step {step})\n\nRows, {cfg.eval.grid_n} seeds each:\n\n{prompts}\n\n{embedded_image(grid)}\n\n"
            f"Full size: [{grid.name} in the MLflow run]({links.artifact_url('eval/' + grid.name)})",
            key="sample-grid",
            description="evaluation samples, one row per train.sample_prompts",
        )
    create_table_artifact([{"metric": k, "value": float(f"{v:.4g}")} for k, v in flat.items()], key="metrics", description=f"evaluation at step {step}")
    get_run_logger().info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in flat.items()))
    chosen = metrics.get("protocol", {}).get("checkpoint") or checkpoint
    return {"metrics": flat, "checkpoint": chosen, "grid": str(grid.resolve())}


@task(name="register")
@redacted_errors
def register(params: GalipTrainParams, cfg: Config, evaluation: dict[str, Any], mlflow_run_id: str, tracking_uri: str, links: Links) -> dict[str, Any]:
    """`galip register`: log the pyfunc, register it (alias challenger), apply the champion gate. The flow
    adds the Prefect link to the version's description and a gate artifact."""
    from galip.ops import registry

    run_stage("register", params, cfg, mlflow_run_id, tracking_uri)
    result = json.loads((Path(cfg.eval.out_dir) / "registered.json").read_text())
    m = cfg.mlflow
    version = str(result["version"])
    run_links = {"MLflow run": links.run_url, **({"Prefect flow run": links.flow_run_url} if links.flow_run_url else {})}
    client = mlflow_client(tracking_uri)
    description = client.get_model_version(m.model_name, version).description or ""
    client.update_model_version(m.model_name, version, description=description + "\n\n" + " · ".join(f"[{k}]({u})" for k, u in run_links.items()))
    decision = registry.GateDecision(**{k: result[k] for k in registry.GateDecision.__dataclass_fields__ if k != "version"}, version=version)
    version_url = links.model_version_url(m.model_name, version)
    create_markdown_artifact(
        f"# Champion gate: {m.model_name} v{version}\n\n{registry.describe(cfg, decision, evaluation['metrics'], run_links)}\n\n"
        f"[{m.model_name} v{version} in the MLflow registry]({version_url}) · aliases: "
        f"`{m.challenger_alias}` = v{version}, `{m.champion_alias}` = {('v' + str(decision.champion_version)) if decision.champion_version else 'none'}",
        key="gate",
        description=f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}",
    )
    logger = get_run_logger()
    logger.info("registered %s version %s (alias %s): %s", m.model_name, version, m.challenger_alias, version_url)
    logger.info("gate: %s", decision.reason)
    return {**result, "version": version, "version_url": version_url}


# ---------------------------------------------------------------------------------------------
# MLflow run owned by the flow
# ---------------------------------------------------------------------------------------------
def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def absolute_tracking_uri(cfg: Config) -> str:
    """The store every stage logs to (MLFLOW_TRACKING_URI wins; a relative SQLite path made absolute)."""
    return tracking_uri(cfg)


def prefect_tags(cfg: Config, flow_run_url: str) -> dict[str, str]:
    flow_name = flow_run.flow_name or "galip-train"
    link = f"[{flow_name} / {flow_run.name}]({flow_run_url})" if flow_run_url else f"{flow_name} / {flow_run.name}"
    return {
        # The run's "Source" in the MLflow UI: the flow, not Prefect's engine module that happens to run it.
        "mlflow.source.name": f"{flow_name} (flows/galip_train.py)",
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_url": flow_run_url,
        # The run's description (markdown in the MLflow UI): the way back to the Prefect flow run.
        "mlflow.note.content": f"Prefect flow run {link}, deployment `{deployment.name or 'none'}`, profile `{cfg.profile}`.",
    }


@flow(name="galip-train", log_prints=True)
@redacted_errors
def galip_train(params: GalipTrainParams = GalipTrainParams()) -> dict[str, Any] | State:
    """Download, CLIP, train GALIP, evaluate, register and gate; one MLflow run for all of it."""
    on_timeout: list[Callable[[], None]] = []
    _stop_with_worker(on_timeout)
    logger = get_run_logger()
    cfg = params.config()
    checked = preflight(params, cfg, return_state=True)
    if checked.is_failed():  # the flow run ends in the preflight's state: its name is the CLI's last line
        return Failed(name=checked.name, message=checked.message)
    checked = checked.result()
    uri = tracking_uri(cfg)
    client = mlflow_client(uri)
    flow_run_url = flow_run.ui_url if flow_run.id else ""
    run_name = f"{flow_run.flow_name or 'galip-train'}/{cfg.profile} {flow_run.name or ''}".strip()
    run_id = open_run(cfg, client, run_name, prefect_tags(cfg, flow_run_url))
    on_timeout.append(end_mlflow_run_if_running(uri, run_id))
    links = Links(mlflow_ui=mlflow_ui_url(cfg, uri), experiment_id=client.get_run(run_id).info.experiment_id, run_id=run_id, flow_run_url=flow_run_url)
    create_link_artifact(
        links.run_url,
        link_text=f"MLflow run {run_name}",
        key="mlflow-run",
        description=f"metrics, per-step sample grids, model; served by `make ui` at {links.mlflow_ui}",
    )
    logger.info("MLflow run %s: %s", run_id, links.run_url)
    try:
        report = download.with_options(retries=cfg.flow.download_retries)(params, cfg, run_id, uri, wait_for=[checked])
        shown = data_report(report)
        clip = train_clip(params, cfg, run_id, uri, wait_for=[shown])
        checkpoint = train(params, cfg, run_id, uri, links, wait_for=[clip])
        evaluation = evaluate(params, cfg, checkpoint, run_id, uri, links)
        result: dict[str, Any] = {
            "mlflow_run_id": run_id, "mlflow_run_url": links.run_url, "checkpoint": evaluation["checkpoint"],
            "grid": evaluation["grid"], "metrics": evaluation["metrics"],
        }  # fmt: skip
        if params.register_model:
            result["model"] = register(params, cfg, evaluation, run_id, uri, links)
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    logger.info("result: %s", json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    galip_train(GalipTrainParams(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
