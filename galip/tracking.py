"""MLflow tracking from inside training/evaluation processes (rank 0 only).

The orchestrator (Prefect flow, or a user) opens an MLflow run and passes its id down through
``MLFLOW_RUN_ID`` (and ``MLFLOW_TRACKING_URI``) to the torchrun workers. Without a run id nothing is
logged to MLflow and the CSV/PNG outputs on disk remain the record; with one, a logging failure is
reported once and training goes on (a flaky tracking server must not kill a multi-day run).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from .config import flatten
from .redact import redact

log = logging.getLogger("galip.tracking")

# Config sections each stage reads. A run logs these as MLflow params (its full resolved config is an
# artifact), so the run page lists what shaped the run, not every setting of every deployment target.
STAGE_SECTIONS = {
    "download": ("data",),
    "clip": ("data", "model", "clip_pretrain"),
    "train": ("data", "model", "train"),
    "evaluate": ("model", "train", "eval"),
    "register": ("mlflow",),
}


def stage_params(cfg: Any, stages: Iterable[str]) -> dict[str, Any]:
    """``profile`` plus the sections ``stages`` read, as a nested dict (``log_params`` flattens it)."""
    tree = cfg.to_dict()
    sections = dict.fromkeys(s for stage in stages for s in STAGE_SECTIONS[stage])
    return {"profile": tree["profile"], **{s: tree[s] for s in sections}}


class Tracker:
    """No-op unless enabled; every call is guarded so tracking never breaks the job."""

    def __init__(self, enabled: bool) -> None:
        self.run_id = os.environ.get("MLFLOW_RUN_ID", "") if enabled else ""
        self._client = None
        self._warned = False
        if self.run_id:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient()

    @property
    def active(self) -> bool:
        return self._client is not None

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self._client is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            if not self._warned:
                log.warning("MLflow %s failed (%s: %s); continuing without it", what, type(exc).__name__, redact(str(exc)))
                self._warned = True

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
