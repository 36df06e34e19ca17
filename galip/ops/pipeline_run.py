"""One MLflow run per pipeline execution, whichever entry point runs the stages.

Each stage command (``galip download``, ``train-clip``, ``train``, ``evaluate``, ``register``) writes its
own record to the run: the data report, manifest and dataset input; the CLIP report; the training log
and config; the evaluation metrics and grid; the logged and registered model. So the Prefect flow,
``dvc repro`` and commands typed by hand leave the same record.

Which run: ``MLFLOW_RUN_ID`` when an orchestrator owns one (the Prefect flow opens it and adds only what
belongs to Prefect). Otherwise the first stage that runs opens a run and writes its id to
``<train.out_dir>/mlflow_run.json``; the next stages log to it. A stage whose record that run already
holds (a second ``dvc repro``, a ``dvc exp run`` that only re-trains) opens a new run, which first gets
the records of the stages upstream of it from their output files: every run holds the whole lineage
(config tags, data version, CLIP, training, evaluation, model).

Only rank 0 talks to MLflow. A logging failure is reported and counted by the stage's own code where
it streams (the trainer's Tracker); the record written here after a stage succeeded fails the stage
when MLflow refuses it, since the run would otherwise silently lack that stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import Config, flatten, unrecorded
from ..pipeline import STAGES
from .redact import redact
from .tracking import ensure_experiment, log_grid

log = logging.getLogger("galip.pipeline_run")
RUN_FILE = "mlflow_run.json"
STAGES_TAG = "galip.stages"
# The run carries no MLflow params: MLflow 3.17's image cards print every param of the run above the
# picture (a per-browser card setting, on by default). The values the run used are tags named as in
# params.yaml instead (`tags.`train.max_steps`` in a search, a column in the runs table): the recipe a
# reader compares runs by, plus every key that differs from the profile's preset. The full config is
# the config/resolved.yaml artifact.
RECIPE_KEYS = (
    "data.url_list", "data.shards_dir", "data.manifest", "data.image_size", "model.clip_model", "model.clip_pretrained",
    "model.image_size", "model.ngf", "model.ndf", "train.batch_size", "train.max_steps", "train.lr_g", "train.lr_d",
    "train.beta1", "train.beta2", "train.sim_w", "train.precision", "train.ema_decay", "train.seed", "eval.metrics",
    "eval.n_samples", "mlflow.gate_metric", "mlflow.gate_bar",
)
WORLD_SIZE_TAG = "galip.world_size"
# What the download and CLIP stages add as tags. None of these names is a config key (tests check), so a
# record never overwrites a config value: the data's place is the config's data.shards_dir/data.manifest,
# and the download's shard count is data.shards_written (data.shards is the config's shard spec).
DATA_VERSION_TAGS = ("data.manifest_md5", "data.manifest_hash")
DATA_SUMMARY_TAGS = {"successes": "data.successes", "failed": "data.failed", "success_rate": "data.success_rate",
                     "images_per_s": "data.images_per_s", "shards": "data.shards_written"}  # report key -> tag
CLIP_TAGS = ("clip.sha256", "clip.held_in_min_separation", "clip.held_out_min_separation")
# Copied from the run to its registered model version: the data version (how a model finds its data
# again, galip trace) and the data summary.
MODEL_VERSION_DATA_TAGS = ("data.manifest", "data.shards_dir", *DATA_VERSION_TAGS, *DATA_SUMMARY_TAGS.values())


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` (a server) wins; a relative SQLite path becomes absolute, because stage
    processes may run elsewhere in the tree."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def client_for(cfg: Config):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(cfg))


def world_size(cfg: Config) -> int:
    return cfg.kube.nodes * cfg.kube.gpus_per_node if cfg.kube.nodes > 1 else cfg.flow.nproc_per_node


def config_tags(cfg: Config) -> dict[str, str]:
    """The run's config tags: ``profile``, RECIPE_KEYS, every key that differs from the profile's preset,
    and the world size; the same keys whichever entry point opened the run."""
    from ..config import preset_tree, resolve

    flat = flatten(cfg.to_dict())
    try:
        preset = flatten(resolve(preset_tree(cfg.profile)).to_dict())
    except Exception:  # noqa: BLE001 - a profile without a preset here (a pod's resolved file): no diff
        preset = flat
    keys = [k for k in RECIPE_KEYS if k in flat] + sorted(k for k in flat if k not in RECIPE_KEYS and preset.get(k) != flat[k])
    return {"profile": cfg.profile, **{k: str(flat[k])[:6000] for k in keys}, WORLD_SIZE_TAG: str(world_size(cfg))}


def git_state() -> tuple[str, bool]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=False, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return git("rev-parse", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))


def open_run(cfg: Config, client: Any, run_name: str, tags: dict[str, str] | None = None) -> str:
    """A new run in ``mlflow.experiment`` with the pipeline's config tags, other tags and resolved config
    (as the stages after clip run it, whichever stage or orchestrator opens the run)."""
    from ..pipeline import pipeline_config

    cfg = pipeline_config(cfg)
    commit, dirty = git_state()
    all_tags = {
        **config_tags(cfg), "mlflow.source.git.commit": commit, "git.dirty": str(dirty), "galip.profile": cfg.profile,
        "mlflow.source.name": "galip pipeline (galip/pipeline.py)", "mlflow.source.type": "JOB", **(tags or {}),
    }  # fmt: skip
    run = client.create_run(ensure_experiment(cfg.mlflow.experiment, client.tracking_uri), run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    client.log_text(run_id, cfg.to_yaml(), "config/resolved.yaml")
    return run_id


# --- what each stage leaves in the run, read from its output files ----------------------------------------
def _record_download(cfg: Config, client: Any, run_id: str) -> None:
    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    report = json.loads(Path(cfg.data.report).read_text())
    manifest_path = Path(cfg.data.manifest)
    manifest = json.loads(manifest_path.read_text())
    for path in (cfg.data.report, cfg.data.manifest):
        client.log_artifact(run_id, path, "data")
    # Summaries of the data (and of the CLIP below) are tags, not metrics: MLflow's Metrics tab sorts named
    # sections before the unprefixed one, so data/* and clip/* bars would come before the training curves.
    summary = {tag: report[k] for k, tag in DATA_SUMMARY_TAGS.items()}
    for key, value in {**data_version_tags(cfg), **summary}.items():
        client.set_tag(run_id, key, str(value))
    table = pd.DataFrame(manifest["shards"], columns=["shard", "samples", "sha256", "bytes"])
    root = manifest["shards_dir"]
    source = root if "://" in root else str(Path(root).resolve())
    with warnings.catch_warnings():  # its schema hint is about model inputs, not a dataset record
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(table, source=source, name=f"galip-{cfg.profile}-shards", digest=report["manifest_hash"])
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])])


def data_version_tags(cfg: Config) -> dict[str, str]:
    """How a run finds its data again, beside its config tags data.manifest and data.shards_dir: the
    manifest's md5 (DVC's hash of it: `git log -S<md5> dvc.lock` finds the commit) and the hash of the
    shards' contents."""
    from ..data.download import file_md5, manifest_hash

    manifest = json.loads(Path(cfg.data.manifest).read_text())
    return dict(zip(DATA_VERSION_TAGS, (file_md5(Path(cfg.data.manifest)), manifest_hash(manifest)), strict=True))


def _record_clip(cfg: Config, client: Any, run_id: str) -> None:
    report = json.loads(Path(cfg.clip_pretrain.report_path).read_text())
    client.log_artifact(run_id, cfg.clip_pretrain.report_path, "clip")
    sha_tag, *separation_tags = CLIP_TAGS
    if "sha256" in report:
        client.set_tag(run_id, sha_tag, report["sha256"])
    separation = report.get("separation")
    if separation:  # two numbers on the run page (tags, as the data summary); the per-attribute table is report.json
        for split, tag in zip(("held_in", "held_out"), separation_tags, strict=True):
            client.set_tag(run_id, tag, str(separation[split]["image_text"]["min"]))


def _record_train(cfg: Config, client: Any, run_id: str) -> None:
    out = Path(cfg.train.out_dir)
    for name in ("train_log.csv", "config.yaml"):
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name), "train")


def _record_evaluate(cfg: Config, client: Any, run_id: str) -> None:
    from PIL import Image

    out = Path(cfg.eval.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    step = int(metrics.get("protocol", {}).get("step", 0))
    # metrics.json's names (and mlflow.gate_metric's): one name per metric everywhere
    _log_metrics(client, run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
    client.log_artifact(run_id, str(out / "metrics.json"), "eval")
    grid = out / "samples.png"
    if grid.is_file():
        client.log_artifact(run_id, str(grid), "eval")
        with Image.open(grid) as img:
            log_grid(client, run_id, img.copy(), "eval_samples", step)


def _record_register(cfg: Config, client: Any, run_id: str) -> None:
    """Registration is the stage itself (galip.ops.registry): nothing to add from files."""


RECORDS: dict[str, Callable[[Config, Any, str], None]] = {
    "download": _record_download, "clip": _record_clip, "train": _record_train,
    "evaluate": _record_evaluate, "register": _record_register,
}  # fmt: skip
OUTPUTS: dict[str, Callable[[Config], list[str]]] = {
    "download": lambda c: [c.data.report, c.data.manifest],
    "clip": lambda c: [c.clip_pretrain.report_path],
    "train": lambda c: [f"{c.train.out_dir}/config.yaml"],
    "evaluate": lambda c: [f"{c.eval.out_dir}/metrics.json"],
    "register": lambda c: [],
}

# Where a stage's record is on disk, named when it could not reach MLflow.
RECORD_FILES: dict[str, Callable[[Config], list[str]]] = {
    **OUTPUTS,
    "train": lambda c: [f"{c.train.out_dir}/train_log.csv", f"{c.train.out_dir}/config.yaml"],
    "register": lambda c: [f"{c.eval.out_dir}/registered.json"],
}


def _log_metrics(client: Any, run_id: str, values: dict[str, Any], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items() if isinstance(v, (int, float))])


# --- the run a stage logs to --------------------------------------------------------------------------------
def _run_file(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / RUN_FILE


def _recorded(client: Any, run_id: str) -> list[str]:
    tag = client.get_run(run_id).data.tags.get(STAGES_TAG, "")
    return [s for s in tag.split(",") if s]


def _mark(client: Any, run_id: str, stage: str) -> None:
    done = _recorded(client, run_id)
    client.set_tag(run_id, STAGES_TAG, ",".join(s for s in STAGES if s in {*done, stage}))


def _reusable(cfg: Config, client: Any, stage: str) -> str | None:
    path = _run_file(cfg)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        # the file holds the URI without its password (redact): compare like with like, or every stage
        # of a pipeline whose tracking URI carries credentials would open a run of its own
        if state.get("tracking_uri") != redact(tracking_uri(cfg)):
            return None
        run = client.get_run(state["run_id"])
    except Exception:  # noqa: BLE001 - unreadable file, deleted run, other store: a new run
        return None
    if run.info.lifecycle_stage != "active" or stage in _recorded(client, run.info.run_id):
        return None
    return run.info.run_id


def _new_pipeline_run(cfg: Config, client: Any, stage: str) -> str:
    run_id = open_run(cfg, client, run_name=f"{cfg.profile} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                      tags={"mlflow.note.content": f"galip pipeline, profile `{cfg.profile}`, opened by the {stage} stage."})
    for upstream in STAGES[: STAGES.index(stage)]:
        if all(Path(p).is_file() for p in OUTPUTS[upstream](cfg)) and OUTPUTS[upstream](cfg):
            RECORDS[upstream](cfg, client, run_id)
            _mark(client, run_id, upstream)
    path = _run_file(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_id": run_id, "tracking_uri": redact(tracking_uri(cfg))}))
    except OSError as exc:  # train.out_dir unusable: the stage itself refuses it, naming the key
        log.debug("no run file at %s: %s", path, exc)
    log.info("MLflow run %s (%s) opened by the %s stage", run_id, redact(tracking_uri(cfg)), stage)
    return run_id


def _backfill(cfg: Config, client: Any, run_id: str, stage: str) -> None:
    """Records of upstream stages the run lacks although their outputs exist: a stage whose work was done
    while MLflow was unreachable at its end left its record to the next stage that uses the run."""
    done = _recorded(client, run_id)
    for upstream in STAGES[: STAGES.index(stage)]:
        if upstream not in done and OUTPUTS[upstream](cfg) and all(Path(p).is_file() for p in OUTPUTS[upstream](cfg)):
            RECORDS[upstream](cfg, client, run_id)
            _mark(client, run_id, upstream)
            log.info("MLflow run %s: recorded the %s stage, which could not reach MLflow when it ended", run_id, upstream)


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str) -> Iterator[str | None]:
    """Run a stage inside the pipeline's MLflow run; yields the run id (None on ranks > 0).

    ``MLFLOW_RUN_ID`` and ``MLFLOW_TRACKING_URI`` are set for the stage's own logging (the trainer's
    Tracker, subprocesses). After the stage succeeded its record is written; a run this stage opened or
    reopened is marked FINISHED, or FAILED when the stage failed. A stage refused before any work (a
    UserError) leaves nothing behind: a run it opened is deleted with its run file, a reopened one gets
    its status back.

    The bookkeeping here (run, tags, status, the small record artifacts) is bounded per request by
    ``mlflow.request_retries`` / ``mlflow.request_timeout_s``; the stage's own work is not (a model upload in
    `galip register` keeps MLflow's defaults). When MLflow cannot be reached at the end of a stage whose
    work is done, the stage still succeeds with one warning: its outputs are complete (and `dvc repro`
    records them), and the next stage that uses the run writes the missing record from those outputs
    (``_backfill``). A record MLflow refuses still fails the stage."""
    if os.environ.get("RANK", "0") != "0":
        yield None
        return
    from ..errors import UserError
    from .tracking import bounded_requests, unreachable

    owned = not os.environ.get("MLFLOW_RUN_ID")
    opened, status = False, None

    def bounded() -> contextlib.AbstractContextManager[None]:
        return bounded_requests(cfg.mlflow)

    with unrecorded(), bounded():  # bookkeeping: which run and where is not an input of the stage
        run_file = _run_file(cfg)
        new_dirs = [d for d in (run_file.parent, *run_file.parent.parents) if not d.exists()]
        previous = run_file.read_bytes() if run_file.is_file() else None
        client = client_for(cfg)
        if owned:
            run_id = _reusable(cfg, client, stage)
            if run_id:
                status = client.get_run(run_id).info.status
            else:
                run_id, opened = _new_pipeline_run(cfg, client, stage), True
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = os.environ["MLFLOW_RUN_ID"]
        if not opened:
            try:
                _backfill(cfg, client, run_id, stage)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                # the stage's own logging rides out an outage (the trainer's Tracker); a later stage records it
                log.warning("MLflow (%s) did not answer (%s); the %s stage goes on without it", redact(tracking_uri(cfg)), type(exc).__name__, stage)
        saved = {k: os.environ.get(k) for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
        os.environ.update(MLFLOW_RUN_ID=run_id, MLFLOW_TRACKING_URI=tracking_uri(cfg))
    try:
        yield run_id
    except UserError:
        if owned:
            with contextlib.suppress(Exception), unrecorded(), bounded():
                if opened:
                    client.delete_run(run_id)
                    if previous is None:
                        run_file.unlink(missing_ok=True)
                    else:
                        run_file.write_bytes(previous)
                    for d in new_dirs:  # innermost first; only what this stage created and left empty
                        with contextlib.suppress(OSError):
                            d.rmdir()
                else:
                    client.update_run(run_id, status=status)
        raise
    except BaseException:
        if owned:
            with contextlib.suppress(Exception), unrecorded(), bounded():
                client.set_terminated(run_id, status="FAILED")
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with unrecorded(), bounded():
        try:
            RECORDS[stage](cfg, client, run_id)
            _mark(client, run_id, stage)
            if owned:
                client.set_terminated(run_id, status="FINISHED")
        except Exception as exc:
            if not unreachable(exc):  # MLflow answered and refused: the run would silently lack the stage
                if owned:
                    with contextlib.suppress(Exception):
                        client.set_terminated(run_id, status="FAILED")
                raise
            log.warning(
                "the %s stage is done, but MLflow (%s) did not answer its end record (%s): run %s lacks the stage's "
                "record and status; its outputs hold it all (%s) and the next stage that uses the run records it",
                stage, redact(tracking_uri(cfg)), type(exc).__name__, run_id, ", ".join(RECORD_FILES[stage](cfg)),
            )  # fmt: skip


def trace(cfg: Config, model_name: str, version: str, manifest_out: Path) -> dict[str, Any]:
    """From a registered model version back to its code, config and data: the run, the git commit, the
    resolved config, the manifest (fetched from the run and checked against the recorded md5) and the
    commits whose dvc.lock records that manifest."""
    from ..data.download import file_md5
    from ..errors import UserError

    client = client_for(cfg)
    mv = client.get_model_version(model_name, version)
    tags = mv.tags
    md5 = tags.get("data.manifest_md5")
    if not md5:
        raise UserError(f"{model_name} v{version} records no data version (registered before data.* tags existed)")
    manifest_out = Path(manifest_out)
    manifest_out.parent.mkdir(parents=True, exist_ok=True)
    fetched = Path(client.download_artifacts(mv.run_id, "data/manifest.json", str(manifest_out.parent)))
    if fetched != manifest_out:
        os.replace(fetched, manifest_out)
        with contextlib.suppress(OSError):
            fetched.parent.rmdir()
    if file_md5(manifest_out) != md5:
        raise UserError(f"the manifest logged with run {mv.run_id} has md5 {file_md5(manifest_out)}, the version records {md5}")
    commits = subprocess.run(["git", "log", "--format=%H", f"-S{md5}", "--", "dvc.lock"], capture_output=True, text=True, check=False).stdout.split()
    return {
        "model": model_name, "version": str(version), "run_id": mv.run_id, "git_commit": tags.get("git.commit", ""),
        "config": f"runs:/{mv.run_id}/config/resolved.yaml", "manifest": str(manifest_out), "manifest_md5": md5,
        "manifest_hash": tags.get("data.manifest_hash", ""), "shards_dir": tags.get("data.shards_dir", ""), "dvc_lock_commits": commits,
    }  # fmt: skip
