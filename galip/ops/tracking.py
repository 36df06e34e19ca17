"""MLflow tracking from inside training/evaluation processes (rank 0 only).

The orchestrator (Prefect flow, or a user) opens an MLflow run and passes its id down through
``MLFLOW_RUN_ID`` (and ``MLFLOW_TRACKING_URI``) to the torchrun workers. Without a run id nothing is
logged to MLflow and the CSV/PNG outputs on disk remain the record; with one, a logging failure is
reported when it first happens and training goes on (a flaky tracking server must not kill a
multi-day run). Every failure is counted; ``Tracker.report`` states the count at the end of the run
(log line, streamed into the flow's run log, and the run's ``galip.tracking_failures`` tag).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import MlflowConfig
from .redact import redact

log = logging.getLogger("galip.tracking")
FAILURES_TAG = "galip.tracking_failures"
# A metric keeps its metrics.json name (`fid`) in MLflow's metrics and the model version's tags; that name in a run is the
# evaluation's number (what the gate reads). In-training estimates (train.eval_samples images, fewer
# than eval.n_samples) are a different measurement and carry this prefix: `train_eval/fid`.
TRAIN_EVAL_PREFIX = "train_eval/"

# MLflow 3's UI shows an experiment either as GenAI work (traces, token costs) or as model training;
# this experiment tag says which, with the UI's own value for model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's open-source UI takes the layout from its sidebar switch (GenAI / Machine learning,
# GenAI until a user changes it) rather than from the tag; a link sets the switch with this query.
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
# MLflow 3.17's run page opens every image card at step 0, and lists the image cards of `prefix/` keys
# in sections that come before the unprefixed metrics and images. So each grid also goes in at step 0
# under this prefix (`newest/samples`, `newest/eval_samples`): the first cards a user sees show the
# newest grids. The unprefixed key keeps the per-step history for the card's slider. Of several images
# at one step the card shows the last one listed, and the artifact listing sorts the files by their
# timestamped names: the newest.
NEWEST_IMAGE_PREFIX = "newest/"
# Calls kept for replay during a tracking outage: a few MB of metric batches. Older ones are dropped
# (and counted); their rows stay in train_log.csv.
MAX_KEPT = 10_000


def log_grid(client: Any, run_id: str, image: Any, key: str, step: int) -> None:
    """One sample grid (a PIL image): at ``step`` under ``key``, and at step 0 under the newest-grid key."""
    client.log_image(run_id, image, key=key, step=step)
    client.log_image(run_id, image, key=NEWEST_IMAGE_PREFIX + key, step=0)


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


def bound_requests(settings: MlflowConfig) -> Callable[[], None]:
    """Bound every MLflow HTTP request from now on by ``mlflow.request_retries`` / ``mlflow.request_timeout_s``
    (MLflow's MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT, read per request); variables the user set win.
    Returns the call that takes them back. MLflow's defaults (7 retries, 120 s) let one call to a server
    that is gone take minutes; a large model upload (`galip register`) needs them, so this is scoped."""
    added = []
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", settings.request_retries), ("MLFLOW_HTTP_REQUEST_TIMEOUT", settings.request_timeout_s)):
        if name not in os.environ:
            added.append(name)
            os.environ[name] = str(value)

    def unbound() -> None:
        for name in added:
            os.environ.pop(name, None)

    return unbound


@contextlib.contextmanager
def bounded_requests(settings: MlflowConfig) -> Iterator[None]:
    unbound = bound_requests(settings)
    try:
        yield
    finally:
        unbound()


def unreachable(exc: BaseException) -> bool:
    """MLflow could not be reached or did not answer in time (after its retries), as opposed to a server
    that answered and refused the call (RestException: a bad request, a deleted run)."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, MlflowException) and not isinstance(exc, RestException) and "API request to" in str(exc)


class Tracker:
    """No-op unless enabled. Logging runs on one background thread, so training never waits for the
    tracking server; every call is guarded, so tracking never breaks the job.

    A tracking outage: the first failed call is reported once, then the server is left alone for
    ``outage_backoff_s`` (calls in that time are not sent). Calls that were not logged are kept, with
    their original timestamps, and replayed in order as soon as a call succeeds again (and once more at
    the end of the run). What is still missing at the end is counted and reported; the rows are in
    train_log.csv / eval_log.csv and the images in samples/ either way.

    MLflow's own asynchronous logging (``synchronous=False``) is not used: it covers metrics, params and
    tags but not the image artifacts, keeps an unbounded queue, and its exit hook waits out every queued
    batch's HTTP retries against a dead server. Its HTTP settings are used: each request is bounded by
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``, set from ``mlflow.request_retries``
    / ``mlflow.request_timeout_s`` for the tracker's lifetime unless the environment already sets them.
    """

    def __init__(self, enabled: bool, settings: MlflowConfig) -> None:
        self.run_id = os.environ.get("MLFLOW_RUN_ID", "") if enabled else ""
        self._client = None
        self.calls = 0
        self.replayed = 0
        self._dropped = 0
        self._first_failure = ""
        self._backoff = settings.outage_backoff_s
        self._paused_until = 0.0
        self._missed: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._unbound: Callable[[], None] = lambda: None
        if self.run_id:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            self._unbound = bound_requests(settings)
            from mlflow.tracking import MlflowClient

            # The run id comes from the environment (set by the flow), so does its store: an in-process
            # mlflow.set_tracking_uri (registry, a caller) must not send this run's logs elsewhere.
            self._client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="galip-mlflow")

    @property
    def active(self) -> bool:
        return self._client is not None

    @property
    def failures(self) -> int:
        """Calls not logged (yet): failed, or not sent during an outage."""
        return len(self._missed) + self._dropped

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        """Queue one logging call; the training thread returns at once."""
        if self._pool is None:
            return
        self.calls += 1
        self._pool.submit(self._attempt, what, fn)

    def _attempt(self, what: str, fn: Callable[[], None]) -> None:
        """On the logging thread: send one call (after any backlog), or keep it for later during an outage."""
        with self._lock:
            if time.monotonic() < self._paused_until or not self._replay() or not self._send(what, fn):
                self._keep(what, fn)

    def _send(self, what: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal
            self._paused_until = time.monotonic() + self._backoff
            if not self._first_failure:
                self._first_failure = f"{what}: {type(exc).__name__}: {redact(str(exc))}"
                log.warning(
                    "MLflow %s failed; training goes on without waiting for it: MLflow is tried again every %g s, "
                    "and what is not logged meanwhile is replayed when it answers (the files in train.out_dir hold it all)",
                    self._first_failure, self._backoff,
                )  # fmt: skip
            else:
                log.debug("MLflow %s failed (%s)", what, type(exc).__name__)
            return False
        return True

    def _keep(self, what: str, fn: Callable[[], None]) -> None:
        if len(self._missed) >= MAX_KEPT:
            self._missed.popleft()
            self._dropped += 1
        self._missed.append((what, fn))

    def _replay(self) -> bool:
        """Send the calls that were not logged, oldest first; False (and paused) at the first failure."""
        n = 0
        while self._missed:
            if not self._send(*self._missed[0]):
                return False
            self._missed.popleft()
            n += 1
        if n:
            self.replayed += n
            log.warning("MLflow answers again: %d call(s) not logged during the outage were replayed into run %s", n, self.run_id)
        return True

    def flush(self) -> None:
        """Wait until every queued call was sent or set aside (bounded by the HTTP settings per call)."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def report(self) -> int:
        """End of run: one last try to replay, then the number of calls not logged, as a log line and as
        the run's tag; returns it. Ends the logging thread."""
        if self._pool is None:
            return 0
        self.flush()
        self._pool.shutdown(wait=True)
        self._pool = None
        self.calls += 1
        tag = functools.partial(self._client.set_tag, self.run_id, FAILURES_TAG)
        with self._lock:
            if not self._replay() or not self._send("set_tag", lambda: tag(str(self.failures))):
                self._keep("set_tag", lambda: None)
        self._unbound()
        if self.failures:
            log.warning(
                "MLflow: %d of %d logging calls to run %s failed or were not sent (first failure: %s; %d replayed after an outage); "
                "the MLflow run is incomplete, the files in train.out_dir are the full record",
                self.failures, self.calls, self.run_id, self._first_failure, self.replayed,
            )  # fmt: skip
        elif self.replayed:
            log.info("MLflow: all %d logging calls to run %s logged, %d of them replayed after an outage", self.calls, self.run_id, self.replayed)
        else:
            log.info("MLflow: all %d logging calls to run %s succeeded", self.calls, self.run_id)
        return self.failures

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)  # taken now: a replayed metric keeps when it was measured
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self._guard("log_metrics", functools.partial(self._client.log_batch, self.run_id, metrics=batch))

    def log_grid(self, path: Path, step: int, key: str = "samples") -> None:
        """A sample grid, as :func:`log_grid` logs it: two calls, each replayed on its own after an outage."""
        if self._client is None:
            return
        from PIL import Image

        def _log(key: str, step: int) -> None:
            with Image.open(path) as img:
                self._client.log_image(self.run_id, img.copy(), key=key, step=step)

        self._guard("log_image", functools.partial(_log, key, step))
        self._guard("log_image", functools.partial(_log, NEWEST_IMAGE_PREFIX + key, 0))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._client is None:
            return
        self._guard("log_artifact", functools.partial(self._client.log_artifact, self.run_id, str(path), artifact_path))
