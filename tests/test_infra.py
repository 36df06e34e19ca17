"""infra/ and galip.ops.kube without a cluster: schema validation, cross-file consistency, the submitter on fakes.

Kubernetes objects are validated (strict: unknown fields are errors) with kubernetes-validate's
bundled schemas for K8S_VERSION, the oldest minor we support (Indexed Job + podReplacementPolicy).
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shlex
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hcl2
import kubernetes_validate
import pytest
import yaml
from hcl2.utils import SerializationOptions
from kubernetes.client.exceptions import ApiException

from galip.ops import kube
from galip.cli import main as cli_main
from galip.config import Config, load_config
from galip.telemetry import TELEMETRY_OFF

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_VERSION = "1.31"
RUN_ID = "3f2a0c1e-0d7a-4c1b-9a51-6f0d1f2b9c11"
SHARDS = "s3://galip-data/cc12m/shards/{00000..01242}.tar"


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def by_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in infra/k8s, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(ROOT / "params.yaml", [f"data.shards={SHARDS}"], profile="cc12m")


@pytest.fixture(scope="module")
def rendered(cfg) -> list[dict[str, Any]]:
    return kube.render_train_job(
        cfg, image="registry.example/galip:1.2.3", nodes=4, gpus_per_node=8, run_id=RUN_ID,
        namespace="galip", mlflow_run_id="0123abcd",
    )  # fmt: skip


def parts(resources):
    cm, svc, job = resources
    pod = job["spec"]["template"]["spec"]
    return cm, svc, job, pod, pod["containers"][0]


def env_of(container) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


# ------------------------------------------------------------------ manifests in infra/k8s


def test_every_manifest_is_schema_valid_and_namespaced():
    docs = k8s_docs()
    assert {d["kind"] for _, d in docs} >= {
        "Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
        "StatefulSet", "Deployment", "Service", "ConfigMap",
    }  # fmt: skip
    for name, doc in docs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "galip", f"{name}: {doc['kind']} outside the galip namespace"


def test_validator_rejects_broken_objects():
    dep = copy.deepcopy(by_kind("Deployment", "mlflow"))
    dep["spec"]["replicas"] = "1"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    dep = copy.deepcopy(by_kind("Deployment", "mlflow"))
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo: unknown field under strict
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)


def test_no_secret_values_in_infra():
    assert all(d["kind"] != "Secret" for _, d in k8s_docs()), "Secrets are created by hand, never committed"
    sensitive = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|STORE_URI|CONNECTION")
    for name, doc in k8s_docs():
        for pod in _pod_specs(doc):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    if sensitive.search(e["name"]):
                        assert "secretKeyRef" in e.get("valueFrom", {}), f"{name}: {e['name']} must come from a Secret"


def _pod_specs(doc) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def test_server_workloads_have_probes_resources_and_security_context():
    workloads = [d for _, d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["metadata"]["name"] for d in workloads} == {"mlflow", "postgres"}
    for doc in workloads:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            where = f"{doc['metadata']['name']}/{c['name']}"
            assert {"readinessProbe", "livenessProbe"} <= set(c), f"{where}: probes"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"], where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where


def test_rbac_lets_flow_runs_launch_training(cfg):
    sa = by_kind("ServiceAccount", cfg.kube.service_account)
    binding = by_kind("RoleBinding")
    role = by_kind("Role", binding["roleRef"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "galip"}]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in role["rules"])

    # Exactly the calls galip.ops.kube.submit_and_follow makes.
    for group, resource, verb in [
        ("batch", "jobs", "create"), ("batch", "jobs", "get"), ("batch", "jobs", "delete"), ("batch", "jobs/status", "get"),
        ("", "services", "create"), ("", "services", "patch"), ("", "configmaps", "create"), ("", "configmaps", "patch"),
        ("", "pods", "list"), ("", "pods/log", "get"),
    ]:  # fmt: skip
        assert allowed(group, resource, verb), f"{verb} {group}/{resource}"
    assert not allowed("", "secrets", "get"), "flow runs never need to read Secrets through the API"


def test_runs_volume_is_shared(cfg):
    pvc = by_kind("PersistentVolumeClaim", cfg.kube.runs_pvc)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_mlflow_server_matches_what_clients_use(cfg):
    from urllib.parse import urlsplit

    uri = urlsplit(cfg.kube.mlflow_tracking_uri)
    svc = by_kind("Service", "mlflow")
    dep = by_kind("Deployment", "mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert uri.hostname == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert uri.port == svc["spec"]["ports"][0]["port"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert uri.netloc in args["allowed-hosts"].split(","), "MLflow would reject the in-cluster Host header"
    assert c["image"] == cfg.kube.image
    assert args["artifacts-destination"].startswith(f"s3://{terraform_buckets()['artifacts']}/")
    env = env_of(c)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"


# ------------------------------------------------------------------ galip.ops.kube.render_train_job


def test_rendered_resources_are_schema_valid(rendered):
    assert [r["kind"] for r in rendered] == ["ConfigMap", "Service", "Job"]
    for r in rendered:
        validate(r)


def test_misrendered_job_fails_validation(rendered):
    job = copy.deepcopy(rendered[2])
    job["spec"]["completions"] = "4"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)
    job = copy.deepcopy(rendered[2])
    job["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["fieldRef"]["path"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_indexed_job_shape(cfg, rendered):
    cm, svc, job, pod, c = parts(rendered)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == cfg.kube.backoff_limit
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    # DNS: pod i is <job>-i.<svc>; the selector must pick exactly this Job's pods.
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["port"] == cfg.kube.rdzv_port
    assert c["image"] == "registry.example/galip:1.2.3"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == cfg.kube.node_selector
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": cfg.kube.shm_size}
    assert volumes[mounts[cfg.kube.runs_mount]]["persistentVolumeClaim"]["claimName"] == cfg.kube.runs_pvc
    assert volumes[mounts[kube.PARAMS_MOUNT]]["configMap"]["name"] == cm["metadata"]["name"]
    assert c["workingDir"] == cfg.kube.workdir
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False


def test_env_comes_from_config_and_secret(cfg, rendered):
    *_, c = parts(rendered)
    env = env_of(c)
    assert env["MLFLOW_TRACKING_URI"]["value"] == cfg.kube.mlflow_tracking_uri
    assert env["MLFLOW_RUN_ID"]["value"] == "0123abcd"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": cfg.kube.s3_secret, "key": key}
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{kube.INDEX_ANNOTATION}']"
    # The kubelet expands $(VAR) only for variables declared in the container's env.
    for var in re.findall(r"\$\((\w+)\)", " ".join(c["command"])):
        assert var in env, f"$({var}) in the command is not declared in env"

    no_run = kube.render_train_job(cfg, image="i:1", nodes=2, gpus_per_node=1, run_id="r", namespace="galip")
    assert "MLFLOW_RUN_ID" not in env_of(parts(no_run)[4])


def test_torchrun_command_parses_with_torchrun_and_galip(cfg, rendered, tmp_path, capsys):
    from torch.distributed.run import get_args_parser

    cm, svc, job, pod, c = parts(rendered)
    # What the kubelet runs in pod 2: $(NODE_RANK) expanded from the completion index.
    argv = [a.replace("$(NODE_RANK)", "2") for a in c["command"]]
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.node_rank) == ("4", "8", "c10d", 2)
    assert args.max_restarts == cfg.kube.max_restarts and args.rdzv_id == RUN_ID
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}.galip.svc.cluster.local"
    assert int(port) == cfg.kube.rdzv_port
    assert args.module and args.training_script == "galip"
    stage, *train_args = args.training_script_args
    assert stage == "train"
    assert "--resume" in train_args and train_args[train_args.index("--profile") + 1] == "cc12m"
    # What `galip train` receives must parse, with the params the ConfigMap carries.
    params = tmp_path / "params.yaml"
    params.write_text(cm["data"][kube.PARAMS_FILE])
    train_args[train_args.index("--params") + 1] = str(params)
    assert cli_main(["train", *train_args, "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == cfg.to_dict()


def test_configmap_carries_the_resolved_config(cfg, tmp_path):
    tuned = load_config(ROOT / "params.yaml", [f"data.shards={SHARDS}", "train.lr_g=2e-4", "kube.nodes=2"], profile="cc12m")
    cm = kube.render_train_job(tuned, image="i:1", nodes=2, gpus_per_node=8, run_id="r", namespace="galip")[0]
    path = tmp_path / "params.yaml"
    path.write_text(cm["data"][kube.PARAMS_FILE])
    assert load_config(path) == tuned != cfg

    demo = load_config(ROOT / "params.yaml", [f"data.shards={SHARDS}"], profile="demo")
    cm = kube.render_train_job(demo, image="i:1", nodes=2, gpus_per_node=1, run_id="r", namespace="galip")[0]
    path.write_text(cm["data"][kube.PARAMS_FILE])
    assert load_config(path) == demo


def test_job_names_are_dns_labels_and_unique():
    long_a, long_b = "x" * 80 + "a", "x" * 80 + "b"
    for run_id in (RUN_ID, "Flow Run #12", long_a):
        name = kube.job_name(run_id)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= kube.MAX_NAME
        assert len(f"{name}-999") <= 63  # pod hostname
    assert kube.job_name(long_a) != kube.job_name(long_b)
    with pytest.raises(ValueError):
        kube.job_name("###")


@pytest.mark.parametrize(
    "overrides, kwargs, message",
    [
        ([], {"nodes": 0}, "nodes"),
        (["kube.runs_pvc="], {}, "runs_pvc"),
        (["data.shards="], {}, "s3://"),
        (["train.out_dir=/tmp/elsewhere"], {}, "shared volume"),
        (["train.out_dir=../up"], {}, "shared volume"),
        (["kube.env={MLFLOW_RUN_ID: x}"], {}, "redefine"),
    ],
)
def test_render_refuses_configs_that_cannot_work(overrides, kwargs, message):
    bad = load_config(ROOT / "params.yaml", [f"data.shards={SHARDS}", *overrides], profile="cc12m")
    call = dict(image="i:1", nodes=2, gpus_per_node=8, run_id="r", namespace="galip") | kwargs
    with pytest.raises(ValueError, match=message):
        kube.render_train_job(bad, **call)


# ------------------------------------------------------------------ galip.ops.kube.submit_and_follow on fakes


class FakeLogResponse:
    def __init__(self, text: str):
        self.text, self.closed = text, False

    def stream(self, amt=None, decode_content=False):
        yield self.text.encode()

    def close(self):
        self.closed = True

    def release_conn(self):
        pass


def _pod(name: str, index: str, phase: str, age_s: int) -> SimpleNamespace:
    created = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=age_s)
    meta = SimpleNamespace(name=name, uid=f"uid-{name}", annotations={kube.INDEX_ANNOTATION: index}, creation_timestamp=created)
    return SimpleNamespace(metadata=meta, status=SimpleNamespace(phase=phase))


def _job(*conditions: tuple[str, str], deleting: bool = False) -> SimpleNamespace:
    conds = [SimpleNamespace(type=t, status="True", reason=r, message="m") for t, r in conditions]
    meta = SimpleNamespace(uid="job-uid", deletion_timestamp="2026-01-01T00:00:00Z" if deleting else None)
    return SimpleNamespace(metadata=meta, status=SimpleNamespace(conditions=conds or None))


class FakeAPI:
    """Records calls; Job status follows a script, one entry per status read."""

    def __init__(self, states: list, pods: list, logs: dict[str, str], existing: set[str] = frozenset(), before=()):
        self.calls: list[tuple] = []
        self.created: list[dict[str, Any]] = []  # bodies as submitted
        self.states, self.pods, self.logs, self.existing = list(states), pods, logs, set(existing)
        self.before = list(before)  # answers to read_namespaced_job before anything is created
        self.core, self.batch = self, self

    def _create(self, kind, namespace, body):
        self.calls.append(("create", kind, body["metadata"]["name"]))
        self.created.append(copy.deepcopy(body))
        if body["metadata"]["name"] in self.existing:
            raise ApiException(status=409, reason="AlreadyExists")

    def create_namespaced_config_map(self, namespace, body):
        self._create("ConfigMap", namespace, body)

    def create_namespaced_service(self, namespace, body):
        self._create("Service", namespace, body)

    def create_namespaced_job(self, namespace, body):
        self._create("Job", namespace, body)

    def read_namespaced_job(self, name, namespace):
        if self.before:
            answer = self.before.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return _job()

    def patch_namespaced_config_map(self, name, namespace, body):
        self.calls.append(("patch", "ConfigMap", name, body["metadata"]["ownerReferences"][0]["uid"]))

    def patch_namespaced_service(self, name, namespace, body):
        self.calls.append(("patch", "Service", name, body["metadata"]["ownerReferences"][0]["uid"]))

    def read_namespaced_job_status(self, name, namespace):
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(state, Exception):
            raise state
        return state

    def list_namespaced_pod(self, namespace, label_selector):
        assert label_selector.startswith(kube.JOB_LABEL + "=")
        return SimpleNamespace(items=self.pods)

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content, **kw):
        assert container == kube.CONTAINER and follow and _preload_content is False
        self.calls.append(("log", name))
        text = self.logs.get(name, "")
        if isinstance(text, Exception):
            raise text
        return FakeLogResponse(text)

    def delete_namespaced_job(self, name, namespace, propagation_policy):
        self.calls.append(("delete", name, propagation_policy))


def run_follow(api, resources, **kw):
    lines: list[str] = []
    kw.setdefault("log", lines.append)
    result = kube.submit_and_follow(resources, "galip", api=api, poll_s=0, sleep=lambda s: None, **kw)
    return result, lines


def test_submit_creates_in_order_adopts_and_streams_pod_zero(rendered):
    name = rendered[2]["metadata"]["name"]
    pods = [_pod("p1", "1", "Running", 5), _pod("p0-old", "0", "Failed", 0), _pod("p0", "0", "Running", 10)]
    api = FakeAPI(states=[_job(), _job(), _job(("Complete", "Completed"))], pods=pods, logs={"p0": "step 1\nstep 2\n", "p0-old": "x\n"})
    result, lines = run_follow(api, rendered)
    assert result == "Complete"
    assert [c for c in api.calls if c[0] == "create"] == [
        ("create", "ConfigMap", f"{name}-params"), ("create", "Service", name), ("create", "Job", name)
    ]  # fmt: skip
    assert ("patch", "ConfigMap", f"{name}-params", "job-uid") in api.calls and ("patch", "Service", name, "job-uid") in api.calls
    assert ("log", "p0") in api.calls and ("log", "p1") not in api.calls and ("log", "p0-old") not in api.calls
    assert "step 1" in lines and "step 2" in lines


def test_submit_adopts_an_existing_run(rendered):
    names = {r["metadata"]["name"] for r in rendered}
    api = FakeAPI(states=[_job(("Complete", "Completed"))], pods=[], logs={}, existing=names)
    result, lines = run_follow(api, rendered)
    assert result == "Complete" and any("already exists" in line for line in lines)


def test_failed_job_raises_and_is_kept(rendered):
    api = FakeAPI(states=[_job(("Failed", "BackoffLimitExceeded"))], pods=[], logs={})
    with pytest.raises(kube.TrainJobFailed, match="BackoffLimitExceeded"):
        run_follow(api, rendered)
    assert not [c for c in api.calls if c[0] == "delete"]


def test_interrupt_deletes_the_job(rendered):
    name = rendered[2]["metadata"]["name"]
    api = FakeAPI(states=[_job()], pods=[_pod("p0", "0", "Running", 0)], logs={"p0": "line\n"})

    def interrupted(line: str) -> None:
        if line == "line":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_follow(api, rendered, log=interrupted)
    assert ("delete", name, "Foreground") in api.calls


def test_api_hiccups_do_not_end_the_run(rendered):
    pods = [_pod("p0", "0", "Running", 0)]
    states = [ApiException(status=503, reason="Unavailable"), _job(), _job(("Complete", "Completed"))]
    api = FakeAPI(states=states, pods=pods, logs={"p0": ConnectionResetError("reset by peer")})
    result, lines = run_follow(api, rendered)
    assert result == "Complete"
    assert any("API error" in line for line in lines) and any("interrupted" in line for line in lines)
    assert not [c for c in api.calls if c[0] == "delete"]


def test_losing_the_api_leaves_the_run_but_a_timeout_stops_it(rendered):
    name = rendered[2]["metadata"]["name"]
    api = FakeAPI(states=[ApiException(status=503, reason="Unavailable")], pods=[], logs={})
    with pytest.raises(ApiException):
        run_follow(api, rendered)
    assert not [c for c in api.calls if c[0] == "delete"], "training must survive the follower losing the API"
    api = FakeAPI(states=[_job()], pods=[], logs={})
    with pytest.raises(TimeoutError):
        run_follow(api, rendered, timeout_s=0)
    assert ("delete", name, "Foreground") in api.calls


def test_resubmission_waits_for_a_terminating_job(rendered):
    before = [_job(deleting=True), _job(deleting=True), ApiException(status=404, reason="NotFound")]
    api = FakeAPI(states=[_job(("Complete", "Completed"))], pods=[], logs={}, before=before)
    result, lines = run_follow(api, rendered)
    assert result == "Complete" and sum("being deleted" in line for line in lines) == 2
    assert not api.before


def test_resources_must_hold_one_job(rendered):
    with pytest.raises(ValueError, match="exactly one Job"):
        kube.submit_and_follow(rendered[:2], "galip", api=FakeAPI([_job()], [], {}))


# ------------------------------------------------------------------ the flow's train task: Job or torchrun here


def flow_params(*overrides: str):
    from flows.galip_train import GalipTrainParams

    return GalipTrainParams(profile="cc12m", overrides=[f"data.shards={SHARDS}", *overrides], register_model=False)


def test_flow_trains_on_several_nodes_through_an_indexed_job():
    from flows.galip_train import launch_training

    params = flow_params("kube.nodes=3", "kube.gpus_per_node=2")
    pods = [_pod("p0", "0", "Running", 0)]
    api = FakeAPI(states=[_job(), _job(("Complete", "Completed"))], pods=pods, logs={"p0": "step 10 loss_d 1.2\n"})
    lines: list[str] = []
    launch_training(params, params.config(), "mlflow-run-1", "sqlite:///not-for-pods.db", RUN_ID, lines.append, kube_api=api)

    assert [c[1] for c in api.calls if c[0] == "create"] == ["ConfigMap", "Service", "Job"]
    for body in api.created:
        validate(body)
    cm, _, job, _, container = parts(api.created)
    assert job["metadata"]["name"] == kube.job_name(RUN_ID) and job["spec"]["completions"] == 3
    assert {"--nnodes=3", "--nproc-per-node=2", f"--rdzv-id={RUN_ID}", "--resume"} <= set(container["command"])
    env = env_of(container)
    assert env["MLFLOW_RUN_ID"]["value"] == "mlflow-run-1", "the pods log into the flow's MLflow run"
    assert env["MLFLOW_TRACKING_URI"]["value"] == params.config().kube.mlflow_tracking_uri, "the in-cluster server, not the caller's file"
    shipped = yaml.safe_load(cm["data"][kube.PARAMS_FILE])
    assert Config.model_validate({k: v for k, v in shipped.items() if k != "profiles"}) == params.config()
    assert "[train] step 10 loss_d 1.2" in lines


def test_flow_train_task_fails_with_the_job():
    from flows.galip_train import launch_training

    api = FakeAPI(states=[_job(("Failed", "BackoffLimitExceeded"))], pods=[], logs={})
    with pytest.raises(kube.TrainJobFailed, match="BackoffLimitExceeded"):
        params = flow_params("kube.nodes=2")
        launch_training(params, params.config(), "r", "sqlite:///unused.db", RUN_ID, print, kube_api=api)


@pytest.mark.slow
def test_flow_trains_one_node_with_torchrun_here(tmp_path):
    from flows.galip_train import StageFailed, launch_training

    # One node: torchrun --standalone in this pod, no Kubernetes call. The stage fails fast here
    # (the CLIP weights file is missing), and the failure names the command it ran.
    api = FakeAPI(states=[_job()], pods=[], logs={})
    params = flow_params("flow.nproc_per_node=1", "train.device=cpu", f"train.out_dir={tmp_path}/run", f"model.clip_pretrained={tmp_path}/no.pt")
    with pytest.raises(StageFailed, match=r"torchrun --standalone --nproc_per_node=1 -m galip train"):
        launch_training(params, params.config(), "", "", RUN_ID, print, kube_api=api)
    assert api.calls == []


# ------------------------------------------------------------------ Prefect work pool base job template


def base_job_template() -> dict[str, Any]:
    return json.loads((INFRA / "prefect" / "base-job-template.json").read_text())


def render_flow_run_job(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest Prefect's Kubernetes worker would submit for a flow run (no server, no cluster)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    class NoClient:  # the template has no block/variable references, so the client is never used
        pass

    conf = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=NoClient()))
    conf.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="quiet-otter", flow_id=uuid.uuid4()))
    return conf.job_manifest


def test_work_pool_template_is_accepted_by_prefect():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = base_job_template()
    assert set(template) == {"job_configuration", "variables"}
    WorkPoolCreate(name="galip-k8s", type="kubernetes", base_job_template=template)
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["gpus"]
    with pytest.raises(ValueError, match="gpus"):
        WorkPoolCreate(name="galip-k8s", type="kubernetes", base_job_template=broken)


def test_flow_run_job_is_schema_valid_and_carries_the_config(cfg):
    job = render_flow_run_job(base_job_template(), {})
    pod = job["spec"]["template"]["spec"]
    # prefect-kubernetes requires parallelism/completions inside the pod template (its own manifest
    # check); the API server drops them there. Everything else must be valid Kubernetes.
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    validate(job)
    c = pod["containers"][0]
    env = env_of(c)
    assert c["image"] == cfg.kube.image and job["metadata"]["namespace"] == cfg.kube.namespace
    assert pod["serviceAccountName"] == cfg.kube.service_account
    assert pod["nodeSelector"] == cfg.kube.node_selector
    assert pod["tolerations"] == [t.model_dump(exclude_defaults=True) | {"operator": t.operator} for t in cfg.kube.tolerations]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == cfg.kube.gpus_per_node
    assert env["MLFLOW_TRACKING_URI"]["value"] == cfg.kube.mlflow_tracking_uri
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == cfg.kube.s3_secret
    assert env["PREFECT__FLOW_RUN_ID"]  # the worker's own env still gets through
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts[cfg.kube.runs_mount]]["persistentVolumeClaim"]["claimName"] == cfg.kube.runs_pvc
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"] == cfg.kube.shm_size
    assert c["workingDir"] == cfg.kube.workdir


def test_flow_run_job_variables_override(cfg):
    job = render_flow_run_job(base_job_template(), {"gpus": 0, "node_selector": {}, "env": {"EXTRA": "1"}})
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 0 and pod["nodeSelector"] == {}
    env = env_of(c)
    assert env["EXTRA"]["value"] == "1" and env["MLFLOW_TRACKING_URI"]["value"] == cfg.kube.mlflow_tracking_uri


# ------------------------------------------------------------------ Helm values


def helm_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((INFRA / "helm" / f"{name}-values.yaml").read_text())


def pinned_prefect() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"prefect==([0-9.]+)"', text).group(1)


def test_worker_values_point_at_pool_server_and_namespace(cfg):
    worker = helm_values("prefect-worker")["worker"]
    server = helm_values("prefect-server")
    assert worker["config"]["workPool"] == cfg.kube.work_pool
    assert worker["config"]["type"] == "kubernetes" and worker["config"]["jobNamespace"] == cfg.kube.namespace
    assert worker["apiConfig"] == "selfHostedServer"
    expected = f"http://{server['fullnameOverride']}.{cfg.kube.namespace}.svc.cluster.local:{server['service']['port']}/api"
    assert worker["selfHostedServerApiConfig"]["apiUrl"] == expected
    assert worker["image"]["prefectTag"].startswith(pinned_prefect() + "-") and worker["image"]["prefectTag"].endswith("-kubernetes")
    # The template is passed with --set-file (one copy in the repo), not pasted into the values.
    assert not worker["config"].get("baseJobTemplate")
    assert "--set-file worker.config.baseJobTemplate.configuration=infra/prefect/base-job-template.json" in readme_section()
    assert f"PREFECT_API_URL={expected}" in readme_section()


def test_server_values_use_external_postgres_from_a_secret():
    server = helm_values("prefect-server")
    assert server["global"]["prefect"]["image"]["prefectTag"].startswith(pinned_prefect() + "-")
    assert server["postgresql"]["enabled"] is False and server["sqlite"]["enabled"] is False
    db = server["externalDatabase"]
    assert db["existingSecret"] and db["connectionStringSecretKey"]
    assert not {"password", "connectionString"} & {k for k, v in db.items() if v}
    assert server["secret"]["create"] is False


# ------------------------------------------------------------------ Terraform, Dockerfile, README


def terraform() -> dict[str, list]:
    opts = SerializationOptions(explicit_blocks=False, strip_string_quotes=True, with_comments=False)
    merged: dict[str, list] = {}
    for path in sorted((INFRA / "terraform").glob("*.tf")):
        with path.open() as fh:
            for key, blocks in hcl2.load(fh, serialization_options=opts).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def tf_resources(kind: str) -> dict[str, dict[str, Any]]:
    return {name: body for block in terraform()["resource"] for k, v in block.items() if k == kind for name, body in v.items()}


def terraform_buckets() -> dict[str, str]:
    prefix = next(v["bucket_prefix"]["default"] for v in terraform()["variable"] if "bucket_prefix" in v)
    buckets = next(b["buckets"] for b in terraform()["locals"] if "buckets" in b)
    return {role: name.replace("${var.bucket_prefix}", prefix) for role, name in buckets.items()}


def test_terraform_buckets_versioning_and_lifecycle():
    assert set(terraform_buckets()) == {"data", "artifacts", "checkpoints"}
    assert tf_resources("aws_s3_bucket")["this"]["for_each"] == "${local.buckets}"
    versioning = tf_resources("aws_s3_bucket_versioning")
    assert list(versioning) == ["data"] and versioning["data"]["versioning_configuration"] == [{"status": "Enabled"}]
    lifecycle = tf_resources("aws_s3_bucket_lifecycle_configuration")
    ckpt_rule = lifecycle["checkpoints"]["rule"][0]
    assert ckpt_rule["status"] == "Enabled" and ckpt_rule["expiration"][0]["days"] == "${var.checkpoint_retention_days}"
    assert "abort_incomplete_multipart_upload" in ckpt_rule
    assert "noncurrent_version_expiration" in lifecycle["data"]["rule"][0]
    block = tf_resources("aws_s3_bucket_public_access_block")["this"]
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"))


def test_dockerfile_matches_pod_specs(cfg):
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(cfg.kube.workdir)}$", text, re.M)
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert "pip install -r requirements.lock" in text
    for key, value in TELEMETRY_OFF.items():  # the cluster's processes run with telemetry off, as make's do
        assert re.search(rf"^\s+{key}={value}\b", text, re.M), key


def readme_section() -> str:
    return (INFRA / "README.md").read_text()  # the walkthrough from an empty cluster


def test_readme_walks_to_the_cc12m_deployment(cfg):
    section = readme_section()
    for needle in [
        "prefect deployment run galip-train/cc12m", "kubectl apply -f infra/k8s/", "terraform", "helm upgrade --install",
        "infra/helm/prefect-server-values.yaml", "infra/helm/prefect-worker-values.yaml", "docker build -f infra/docker/Dockerfile",
        "kubectl create secret generic galip-s3", "kubectl create secret generic mlflow-db",
        "kubectl create secret generic prefect-db", "kubectl create secret generic postgres-auth",
    ]:  # fmt: skip
        assert needle in section, needle
    # Every Secret the manifests reference is created in the walkthrough.
    referenced = {cfg.kube.s3_secret, helm_values("prefect-server")["externalDatabase"]["existingSecret"]}
    for _, doc in k8s_docs():
        for pod in _pod_specs(doc):
            for c in pod["containers"]:
                referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    for secret in referenced:
        assert f"kubectl create secret generic {secret}" in section, secret
    shlex.split(section.split("```bash", 1)[1].split("```", 1)[0], comments=True)  # the shell block is well-formed


def test_cc12m_deployment_uses_the_kubernetes_pool(cfg):
    deployments = {d.get("name"): d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text()).get("deployments") or []}
    assert deployments["cc12m"]["work_pool"]["name"] == cfg.kube.work_pool
