"""Multi-node training on Kubernetes: render the resources from the typed config, submit, follow.

Stable API. The Prefect train task calls ``train_job(cfg, ...)`` when ``runs_as_job(cfg)``
(``kube.nodes > 1``); a single node trains in the flow-run pod itself (``torchrun --standalone``)
and needs none of this. ``train_job`` is these two calls::

    from galip.ops.kube import render_train_job, submit_and_follow

    resources = render_train_job(
        cfg, image=cfg.kube.image, nodes=cfg.kube.nodes, gpus_per_node=cfg.kube.gpus_per_node,
        run_id=flow_run_id, namespace=cfg.kube.namespace,
        mlflow_run_id=mlflow_run_id,            # optional: the run the trainer logs to
        mlflow_tracking_uri=None,               # optional: defaults to cfg.kube.mlflow_tracking_uri
    )
    status = submit_and_follow(resources, cfg.kube.namespace, log=logger.info)  # raises TrainJobFailed

``render_train_job`` is pure (dicts in, dicts out; no cluster, no client import) and returns, in
creation order:

1. a ConfigMap holding the *resolved* params.yaml (the exact config the caller resolved), so every
   pod trains the configuration the flow decided, whatever params.yaml is baked into the image;
2. a headless Service whose name is the pods' ``subdomain``: it gives pod ``i`` the stable DNS name
   ``<job>-<i>.<svc>``, and pod 0 hosts the c10d rendezvous store;
3. an Indexed Job (``completions = parallelism = nodes``) whose pods each run
   ``torchrun --nnodes=N --nproc-per-node=G --node-rank=$(NODE_RANK) --rdzv-backend=c10d
   --rdzv-endpoint=<job>-0.<svc>.<ns>.svc.<domain>:<port> --rdzv-id=<run_id> --max-restarts=K
   -m galip train --params /etc/galip/params.yaml --profile <profile> --resume``.

``submit_and_follow`` creates them with the official ``kubernetes`` client (an existing resource
of the same name is adopted, so a retried task re-attaches instead of starting a second run),
streams pod 0's log, and returns when the Job completes or raises ``TrainJobFailed`` when it fails.
If the caller is interrupted (Prefect cancellation raises a BaseException in the task) or
``timeout_s`` passes, the Job is deleted so no GPUs stay allocated; the next run resumes from the
latest checkpoint. If only the API is lost for long, the Job is left running and a retried task
re-attaches to it by name.

Restarts: a crashed worker process is restarted in place by torchrun (``--max-restarts``); a lost
pod is recreated by the Job controller with the same index (``backoffLimit``; preemptions are not
counted); every (re)start passes ``--resume``, so training continues from the newest checkpoint in
``train.out_dir``. That directory must be on the ReadWriteMany volume ``kube.runs_pvc`` (mounted
at ``kube.runs_mount`` = ``<kube.workdir>/runs``, as in the work pool's flow-run pods) because every
rank loads the checkpoint that rank 0 picked. A relative ``runs/<name>`` lands there, and names the
same directory whether a run trains in the flow-run pod (one node) or in this Job (several), so a
run may change its node count between restarts and still resume.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import yaml

from ..config import Config, resolve

PARAMS_MOUNT = "/etc/galip"
PARAMS_FILE = "params.yaml"
CONTAINER = "trainer"
JOB_LABEL = "galip.io/train-job"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Job name + "-<index>" becomes each pod's hostname, a DNS label of at most 63 characters.
MAX_NAME = 52

Resource = dict[str, Any]


class TrainJobFailed(RuntimeError):
    """The training Job reached the Failed condition (backoff limit, deadline, or pod failure policy)."""


# --------------------------------------------------------------------------------------------
# Rendering (pure)
# --------------------------------------------------------------------------------------------


def job_name(run_id: str) -> str:
    """A DNS-1123 name derived from the run id; long ids keep a hash suffix so names stay unique."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    if not slug:
        raise ValueError(f"run_id {run_id!r} has no usable characters for a Kubernetes name")
    name = f"galip-train-{slug}"
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(run_id.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"
    return name


def rendezvous_endpoint(name: str, service: str, namespace: str, port: int, cluster_domain: str) -> str:
    # The fully qualified name is in pod 0's own /etc/hosts (the kubelet writes it when `subdomain`
    # is set), so pod 0 recognises itself as the c10d store host before DNS has published the record.
    return f"{name}-0.{service}.{namespace}.svc.{cluster_domain}:{port}"


def _under(path: str, workdir: str, mount: str) -> bool:
    full = PurePosixPath(workdir) / path  # an absolute path replaces workdir
    return ".." not in full.parts and full.is_relative_to(PurePosixPath(mount))


def pod_params(cfg: Config) -> dict[str, Any]:
    """The resolved config as a params.yaml tree that ``load_config`` turns back into the same Config."""
    tree = cfg.to_dict()
    resolve(tree)  # fail here, not in N pods, if the tree does not load back
    return tree


def _check_paths(cfg: Config) -> None:
    kube = cfg.kube
    if not _under(cfg.train.out_dir, kube.workdir, kube.runs_mount):
        raise ValueError(
            f"train.out_dir {cfg.train.out_dir!r} is not on the shared volume ({kube.runs_mount}, seen from "
            f"{kube.workdir}): every pod must see the checkpoints; use a path like runs/<name>"
        )
    where = cfg.data.shards or cfg.data.shards_dir
    if "://" in where or where.startswith("pipe:") or _under(where, kube.workdir, kube.runs_mount):
        return
    raise ValueError(
        f"data.shards/shards_dir is {where!r}: pods of a multi-node Job cannot read the flow-run pod's "
        f"disk; set data.shards to an s3:// URI (or a path under {kube.runs_mount})"
    )


def torchrun_command(
    *, nodes: int, gpus_per_node: int, endpoint: str, run_id: str, max_restarts: int, join_timeout: int, profile: str
) -> list[str]:
    return [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={gpus_per_node}",
        # c10d assigns ranks itself (torchrun ignores --node-rank then); kept so logs name the pod.
        # $(NODE_RANK) is expanded by the kubelet from the env below.
        "--node-rank=$(NODE_RANK)",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        # GPU nodes may be scaled up and pull a multi-GB image one after another.
        f"--rdzv-conf=join_timeout={join_timeout}",
        f"--max-restarts={max_restarts}",
        "-m",
        "galip",
        "train",
        "--params",
        f"{PARAMS_MOUNT}/{PARAMS_FILE}",
        "--profile",
        profile,
        "--resume",
    ]


def _env(cfg: Config, mlflow_tracking_uri: str, mlflow_run_id: str | None) -> list[dict[str, Any]]:
    secret = cfg.kube.s3_secret

    def from_secret(key: str, optional: bool = False) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": secret, "key": key}
        if optional:
            ref["optional"] = True
        return {"name": key, "valueFrom": {"secretKeyRef": ref}}

    env: list[dict[str, Any]] = [
        # Defined explicitly rather than relying on the controller-injected JOB_COMPLETION_INDEX, so
        # the $(NODE_RANK) expansion in the command has a variable declared in this very spec.
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "MLFLOW_TRACKING_URI", "value": mlflow_tracking_uri},
        {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
        from_secret("AWS_ACCESS_KEY_ID"),
        from_secret("AWS_SECRET_ACCESS_KEY"),
        from_secret("AWS_DEFAULT_REGION", optional=True),
        from_secret("AWS_ENDPOINT_URL", optional=True),  # MinIO/Ceph; absent on AWS
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # log lines reach `kubectl logs` as they happen
        # Worker restarts after a crashed rank re-rendezvous reliably only with a fresh store per group.
        {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"},
    ]
    if mlflow_run_id:
        env.insert(2, {"name": "MLFLOW_RUN_ID", "value": mlflow_run_id})
    # MLFLOW_RUN_ID is reserved even when unset: the run is the caller's to name, not the config's.
    taken = {e["name"] for e in env} | {"MLFLOW_RUN_ID"}
    clash = taken & set(cfg.kube.env)
    if clash:
        raise ValueError(f"kube.env must not redefine {sorted(clash)}: galip.ops.kube sets them")
    env += [{"name": k, "value": v} for k, v in sorted(cfg.kube.env.items())]
    return env


def _tolerations(cfg: Config) -> list[dict[str, str]]:
    out = []
    for t in cfg.kube.tolerations:
        d = {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect}
        out.append({k: v for k, v in d.items() if v})
    return out


def _object(api_version: str, kind: str, name: str, namespace: str, labels: dict[str, str], **body: Any) -> Resource:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace, "labels": labels}, **body}


def render_train_job(
    cfg: Config,
    *,
    image: str,
    nodes: int,
    gpus_per_node: int,
    run_id: str,
    namespace: str,
    mlflow_run_id: str | None = None,
    mlflow_tracking_uri: str | None = None,
) -> list[Resource]:
    """ConfigMap (resolved params), headless Service and Indexed Job for one multi-node training run."""
    kube = cfg.kube
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes ({nodes}) and gpus_per_node ({gpus_per_node}) must be >= 1")
    if not image:
        raise ValueError("image must be set (kube.image)")
    if not kube.runs_pvc:
        raise ValueError(
            "kube.runs_pvc is empty: multi-node training needs a ReadWriteMany volume for train.out_dir "
            "(every rank loads the checkpoint rank 0 picked on resume)"
        )
    _check_paths(cfg)

    name = job_name(run_id)
    service = name
    params_cm = f"{name}-params"
    labels = {"app.kubernetes.io/name": "galip", "app.kubernetes.io/component": "train", JOB_LABEL: name}
    endpoint = rendezvous_endpoint(name, service, namespace, kube.rdzv_port, kube.cluster_domain)

    config_map = _object(
        "v1", "ConfigMap", params_cm, namespace, labels,
        data={PARAMS_FILE: yaml.safe_dump(pod_params(cfg), sort_keys=False)},
    )  # fmt: skip
    headless = _object(
        "v1", "Service", service, namespace, labels,
        spec={
            "clusterIP": "None",
            "selector": {JOB_LABEL: name},
            # Pods have no readiness probe worth waiting for: peers must resolve pod 0 as soon as it has an IP.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": kube.rdzv_port, "targetPort": kube.rdzv_port, "protocol": "TCP"}],
        },
    )  # fmt: skip
    gpu = str(gpus_per_node)
    container: Resource = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": kube.workdir,
        "command": torchrun_command(
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            endpoint=endpoint,
            run_id=run_id,
            max_restarts=kube.max_restarts,
            join_timeout=kube.rdzv_join_timeout,
            profile=cfg.profile,
        ),
        "env": _env(cfg, mlflow_tracking_uri or kube.mlflow_tracking_uri, mlflow_run_id),
        "ports": [{"name": "rdzv", "containerPort": kube.rdzv_port, "protocol": "TCP"}],
        "resources": {
            # No CPU limit: CFS throttling stalls the data loaders that feed the GPUs.
            "requests": {"cpu": kube.cpu_per_node, "memory": kube.memory_per_node, "nvidia.com/gpu": gpu},
            "limits": {"memory": kube.memory_per_node, "nvidia.com/gpu": gpu},
        },
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "runs", "mountPath": kube.runs_mount},
            {"name": "params", "mountPath": PARAMS_MOUNT, "readOnly": True},
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: Resource = {
        "subdomain": service,
        "restartPolicy": "Never",
        # Training talks to S3 and MLflow, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        "nodeSelector": dict(kube.node_selector),
        "tolerations": _tolerations(cfg),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 60,
        "containers": [container],
        "volumes": [
            # The container runtime's default /dev/shm is 64 MB; DataLoader workers and NCCL need more.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": kube.shm_size}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": kube.runs_pvc}},
            {"name": "params", "configMap": {"name": params_cm}},
        ],
    }
    job = _object(
        "batch/v1", "Job", name, namespace, labels,
        spec={
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": kube.backoff_limit,
            # Two pods with one index would share a hostname: replace a pod only once it is gone.
            "podReplacementPolicy": "Failed",
            # Spot/preempted GPU nodes are routine on multi-day runs; they must not use up retries.
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
            "ttlSecondsAfterFinished": kube.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    )  # fmt: skip
    return [config_map, headless, job]


# --------------------------------------------------------------------------------------------
# Submitting and following (needs a cluster; kept small)
# --------------------------------------------------------------------------------------------


@dataclass
class KubeAPI:
    """The two API groups used; tests pass fakes with the same methods."""

    core: Any  # kubernetes.client.CoreV1Api
    batch: Any  # kubernetes.client.BatchV1Api


def connect() -> KubeAPI:
    """In-cluster credentials (the flow-run pod's service account), else the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return KubeAPI(core=client.CoreV1Api(), batch=client.BatchV1Api())


def _api_status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None) if type(exc).__name__ == "ApiException" else None


def _create(api: KubeAPI, res: Resource, namespace: str, log: Callable[[str], None]) -> None:
    create = {
        "ConfigMap": api.core.create_namespaced_config_map,
        "Service": api.core.create_namespaced_service,
        "Job": api.batch.create_namespaced_job,
    }[res["kind"]]
    try:
        create(namespace=namespace, body=res)
        log(f"created {res['kind']}/{res['metadata']['name']}")
    except Exception as exc:
        if _api_status(exc) != 409:
            raise
        # Same run id = same name: a retried task follows the run already in flight.
        log(f"{res['kind']}/{res['metadata']['name']} already exists; following it")


def _adopt(api: KubeAPI, res: Resource, namespace: str, job: str, job_uid: str) -> None:
    # Owned by the Job, so the Job's TTL (or `kubectl delete job`) cleans up the Service and ConfigMap.
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": job_uid, "blockOwnerDeletion": False}
    body = {"metadata": {"ownerReferences": [owner]}}
    patch = {"ConfigMap": api.core.patch_namespaced_config_map, "Service": api.core.patch_namespaced_service}[res["kind"]]
    patch(name=res["metadata"]["name"], namespace=namespace, body=body)


def job_state(job: Any) -> str | None:
    """'Complete', 'Failed', or None while running (reads a V1Job)."""
    for cond in (job.status.conditions or []) if job.status else []:
        if cond.type in ("Complete", "Failed") and cond.status == "True":
            return cond.type
    return None


def _leader_pod(api: KubeAPI, name: str, namespace: str) -> Any | None:
    """The newest pod with completion index 0 (a replaced pod keeps its index)."""
    pods = api.core.list_namespaced_pod(namespace=namespace, label_selector=f"{JOB_LABEL}={name}").items
    leaders = [p for p in pods if (p.metadata.annotations or {}).get(INDEX_ANNOTATION) == "0"]
    return max(leaders, key=lambda p: p.metadata.creation_timestamp, default=None)


def _log_lines(api: KubeAPI, pod: str, namespace: str, since_seconds: int | None) -> Iterator[str]:
    from kubernetes.watch.watch import iter_resp_lines

    kwargs: dict[str, Any] = {"since_seconds": since_seconds} if since_seconds else {}
    resp = api.core.read_namespaced_pod_log(
        name=pod, namespace=namespace, container=CONTAINER, follow=True, _preload_content=False, **kwargs
    )
    try:
        yield from iter_resp_lines(resp)
    finally:
        resp.close()
        resp.release_conn()


def follow(
    api: KubeAPI,
    name: str,
    namespace: str,
    *,
    log: Callable[[str], None] = print,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    max_api_errors: int = 30,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Stream pod 0's log until the Job completes ('Complete') or fails (raises TrainJobFailed).

    The Job's status is the truth; the log is best effort. API hiccups (a multi-day run sees
    API-server restarts) are retried; ``max_api_errors`` consecutive failures re-raise the last one.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stream_ended: dict[str, float] = {}  # pod uid -> when its log stream last ended
    errors = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Job {namespace}/{name} still running after {timeout_s} s")
        try:
            job = api.batch.read_namespaced_job_status(name=name, namespace=namespace)
            pod = _leader_pod(api, name, namespace)
            errors = 0
        except Exception as exc:
            errors += 1
            if errors >= max_api_errors:
                raise
            log(f"Kubernetes API error while following {name} ({type(exc).__name__}: {exc}); retrying")
            sleep(poll_s)
            continue
        state = job_state(job)
        if state == "Complete":
            return state
        if state == "Failed":
            reasons = [f"{c.reason}: {c.message}" for c in job.status.conditions if c.type == "Failed"]
            raise TrainJobFailed(f"Job {namespace}/{name} failed: {'; '.join(reasons)}")
        phase = pod.status.phase if pod is not None else None
        uid = pod.metadata.uid if pod is not None else ""
        # A stream that ended while the pod still runs (connection reset) is resumed, not replayed.
        if phase == "Running" or (phase in ("Succeeded", "Failed") and uid not in stream_ended):
            since = int(time.monotonic() - stream_ended[uid]) + 1 if uid in stream_ended else None
            try:
                for line in _log_lines(api, pod.metadata.name, namespace, since):
                    log(line)
            except Exception as exc:  # noqa: BLE001 - the log is best effort, the Job status decides
                log(f"log stream of {pod.metadata.name} interrupted ({type(exc).__name__}: {exc}); retrying")
            stream_ended[uid] = time.monotonic()
            sleep(min(poll_s, 1.0))
            continue
        sleep(poll_s)


def _wait_if_terminating(
    api: KubeAPI, name: str, namespace: str, *, log: Callable[[str], None], poll_s: float, sleep: Callable[[float], None]
) -> None:
    """A Job of this name that is being deleted (a cancelled attempt) must be gone before we recreate it."""
    while True:
        try:
            job = api.batch.read_namespaced_job(name=name, namespace=namespace)
        except Exception as exc:
            if _api_status(exc) == 404:
                return
            raise
        if job.metadata.deletion_timestamp is None:
            return  # running or finished: adopted by _create's 409 path
        log(f"Job {namespace}/{name} is being deleted; waiting before resubmitting")
        sleep(poll_s)


def submit_and_follow(
    resources: Sequence[Resource],
    namespace: str,
    *,
    api: KubeAPI | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Create what ``render_train_job`` returned, follow the Job; 'Complete' or TrainJobFailed."""
    api = api or connect()
    jobs = [r for r in resources if r["kind"] == "Job"]
    if len(jobs) != 1:
        raise ValueError(f"expected exactly one Job among the resources, got {len(jobs)}")
    name = jobs[0]["metadata"]["name"]
    _wait_if_terminating(api, name, namespace, log=log, poll_s=poll_s, sleep=sleep)
    for res in resources:
        _create(api, res, namespace, log)
    uid = api.batch.read_namespaced_job(name=name, namespace=namespace).metadata.uid
    for res in resources:
        if res["kind"] != "Job":
            _adopt(api, res, namespace, name, uid)
    try:
        return follow(api, name, namespace, log=log, poll_s=poll_s, timeout_s=timeout_s, sleep=sleep)
    except TrainJobFailed:
        raise  # keep the failed Job and its pods for `kubectl describe`/logs; the TTL removes them
    except TimeoutError:
        _stop(api, name, namespace, log)
        raise
    except Exception:
        raise  # we lost the API, not the run: it keeps training and a retried task re-attaches by name
    except BaseException:
        # Cancelled or interrupted (Prefect raises TerminationSignal in the task): free the GPUs.
        _stop(api, name, namespace, log)
        raise


def _stop(api: KubeAPI, name: str, namespace: str, log: Callable[[str], None]) -> None:
    log(f"stopping: deleting Job {namespace}/{name}; the next run resumes from the latest checkpoint")
    # Foreground: the Job object outlives its pods, Service and ConfigMap, so a resubmission under
    # the same name (rescheduled flow run) waits for it to vanish and starts clean.
    api.batch.delete_namespaced_job(name=name, namespace=namespace, propagation_policy="Foreground")


def runs_as_job(cfg: Config) -> bool:
    """Whether training runs as a multi-node Indexed Job (``kube.nodes > 1``) rather than in this pod."""
    return cfg.kube.nodes > 1


def train_job(
    cfg: Config,
    *,
    run_id: str,
    mlflow_run_id: str | None = None,
    api: KubeAPI | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Train ``cfg`` on ``kube.nodes`` pods: render, submit and follow the Job; 'Complete' or TrainJobFailed.

    ``run_id`` names the Job: the same id (a retried task of the same flow run) re-attaches to the run
    in flight. The pods log to ``kube.mlflow_tracking_uri`` (the in-cluster server), not to the
    caller's URI, which may be a local file or carry credentials.
    """
    kube = cfg.kube
    resources = render_train_job(
        cfg, image=kube.image, nodes=kube.nodes, gpus_per_node=kube.gpus_per_node, run_id=run_id,
        namespace=kube.namespace, mlflow_run_id=mlflow_run_id,
    )  # fmt: skip
    log(f"training on {kube.nodes} nodes x {kube.gpus_per_node} GPUs: Job {kube.namespace}/{job_name(run_id)}")
    return submit_and_follow(resources, kube.namespace, api=api, log=log, poll_s=poll_s, sleep=sleep)
