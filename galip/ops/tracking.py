"""MLflow tracking from inside training/evaluation processes (rank 0 only).

The orchestrator (Prefect flow, or a user) opens an MLflow run and passes its id down through
``MLFLOW_RUN_ID`` (and ``MLFLOW_TRACKING_URI``) to the torchrun workers. Without a run id nothing is
logged to MLflow and the CSV/PNG outputs on disk remain the record; with one, a logging failure is
reported when it first happens and training goes on (a flaky tracking server must not kill a
multi-day run). Every failure is counted; ``Tracker.report`` states the count at the end of the run
(log line, streamed into the flow's run log, and the run's ``galip.tracking_failures`` tag).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from ..config import flatten
from .redact import redact

log = logging.getLogger("galip.tracking")
FAILURES_TAG = "galip.tracking_failures"
# A metric keeps its metrics.json name (`fid`) in params, MLflow and tags; that name in a run is the
# evaluation's number (what the gate reads). In-training estimates (train.eval_samples images, fewer
# than eval.n_samples) are a different measurement and carry this prefix: `train_eval/fid`.
TRAIN_EVAL_PREFIX = "train_eval/"

# Config sections each stage reads. A run logs these as MLflow params (its full resolved config is an
# artifact), so the run page lists what shaped the run, not every setting of every deployment target.
STAGE_SECTIONS = {
    "download": ("data",),
    "clip": ("data", "model", "clip_pretrain"),
    "train": ("data", "model", "train"),
    "evaluate": ("model", "train", "eval"),
    "register": ("mlflow",),
}


# MLflow 3's UI shows an experiment either as GenAI work (traces, token costs) or as model training;
# this experiment tag says which, with the UI's own value for model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's open-source UI takes the layout from its sidebar switch (GenAI / Machine learning,
# GenAI until a user changes it) rather than from the tag; a link sets the switch with this query.
UI_WORKFLOW_QUERY = "workflowType=machine_learning"


def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """The id of experiment ``name``, created if missing, marked as model training unless a kind is set
    (a kind chosen in the UI stays)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by a concurrent run
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
        else:
            return experiment_id
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def stage_params(cfg: Any, stages: Iterable[str]) -> dict[str, Any]:
    """``profile`` plus the sections ``stages`` read, as a nested dict (``log_params`` flattens it)."""
    tree = cfg.to_dict()
    sections = dict.fromkeys(s for stage in stages for s in STAGE_SECTIONS[stage])
    return {"profile": tree["profile"], **{s: tree[s] for s in sections}}


class Tracker:
    """No-op unless enabled; every call is guarded so tracking never breaks the job, and counted."""

    def __init__(self, enabled: bool) -> None:
        self.run_id = os.environ.get("MLFLOW_RUN_ID", "") if enabled else ""
        self._client = None
        self.calls = 0
        self.failures = 0
        self._first_failure = ""
        if self.run_id:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow.tracking import MlflowClient

            # The run id comes from the environment (set by the flow), so does its store: an in-process
            # mlflow.set_tracking_uri (registry, a caller) must not send this run's logs elsewhere.
            self._client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)

    @property
    def active(self) -> bool:
        return self._client is not None

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self._client is None:
            return
        self.calls += 1
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal
            self.failures += 1
            if self.failures == 1:
                self._first_failure = f"{what}: {type(exc).__name__}: {redact(str(exc))}"
                log.warning("MLflow %s failed; training goes on, further failures are counted and reported at the end of the run", self._first_failure)
            else:
                log.debug("MLflow %s failed (%s)", what, type(exc).__name__)

    def report(self) -> int:
        """End of run: the number of failed logging calls, as a log line and as the run's tag; returns it."""
        if self._client is None:
            return 0
        self._guard("set_tag", self._client.set_tag, self.run_id, FAILURES_TAG, str(self.failures))
        if self.failures:
            log.warning(
                "MLflow: %d of %d logging calls to run %s failed (first: %s); the MLflow run is incomplete, "
                "the files in train.out_dir are the full record", self.failures, self.calls, self.run_id, self._first_failure,
            )  # fmt: skip
        else:
            log.info("MLflow: all %d logging calls to run %s succeeded", self.calls, self.run_id)
        return self.failures

    def log_params(self, params: dict[str, Any]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self._guard("log_params", self._client.log_batch, self.run_id, params=flat[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._client is None:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self._guard("log_metrics", self._client.log_batch, self.run_id, metrics=batch)

    def log_image(self, path: Path, step: int, key: str = "samples") -> None:
        from PIL import Image

        def _log() -> None:
            with Image.open(path) as img:
                self._client.log_image(self.run_id, img.copy(), key=key, step=step)

        self._guard("log_image", _log)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._client is None:
            return
        self._guard("log_artifact", self._client.log_artifact, self.run_id, str(path), artifact_path)
