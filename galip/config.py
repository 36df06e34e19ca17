"""Typed configuration parsed from params.yaml.

params.yaml holds the values in force, complete: every galip command, every dvc.yaml stage (through
its templated paths and `params:`) and the Prefect flow read it, and `dvc exp run -S train.lr_g=3e-4`
edits exactly the value that runs. Profiles are presets in profiles/: ``cc12m.yaml`` is the reference
GALIP recipe, complete; ``demo.yaml`` `extends` it and names only what it changes. ``galip profile
NAME`` writes a preset, resolved, to params.yaml; ``--profile NAME`` on a command that reads a
params.yaml holding another profile uses the preset instead (the Prefect cc12m deployment on a demo
checkout). Overrides (``-S train.lr_g=2e-4``, DVC's syntax) apply last. Unknown keys and wrong types
are rejected before any work starts, with the dotted key and the expected type in the message.

The models below hold types, constraints and descriptions but no values: every key must be set in
the params file, so no value can differ between the code and the file. A config saved with a
checkpoint before a key existed gets that key from the preset of its profile when it is loaded
(``config_from_dict``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import UserError
from .ops.redact import has_credentials, redact


log = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """An invalid params.yaml or override; the message names the key and what was expected."""


class _Section(BaseModel):
    # strict: "64" is not an int, 1.5 is not an int; ints are accepted where floats are expected.
    # allow_inf_nan=False: 1e999 is inf, which no setting means (and JSON would save as null).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _folder(v: str) -> str:
    # '' would be the current directory: a run would scatter its files among the user's own.
    if not v.strip():
        raise ValueError("must name a folder ('' would be the current directory)")
    return v


def _device(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return v


_SECRET_NAME = re.compile(r"(?i)secret|token|passw|pwd|credential|api_?key|access_?key|private_?key|auth")
Folder = Annotated[str, AfterValidator(_folder)]
Device = Annotated[str, AfterValidator(_device)]
# numpy's generators take 32-bit seeds; torch's overflow past 2**64.
SEED_LIMIT = 2**32
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


class DataConfig(_Section):
    """Where training data comes from and how it becomes shards (galip.data.download, galip.data.loader)."""

    url_list: str = Field(description="URL+caption list (cc12m.tsv or parquet)")
    url_col: str
    caption_col: str
    shards_dir: Folder
    shards: str = Field(description="webdataset shard spec (brace pattern, dir or s3://); '' = the shards data.manifest lists")
    manifest: str = Field(description="the shard manifest galip download writes (a local file: the data version DVC tracks)")
    report: str = Field(description="the data report galip download writes (local JSON)")
    image_size: int = Field(gt=0, description="img2dataset output size (shorter side with keep_ratio)")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"]
    encode_quality: int = Field(ge=1, le=100)
    samples_per_shard: PositiveInt
    processes: PositiveInt
    threads: PositiveInt
    retries: NonNegativeInt
    timeout: PositiveInt
    # Reference augmentation: resize to load_size, random crop to crop_size, horizontal flip.
    load_size: PositiveInt
    crop_size: PositiveInt
    hflip: bool
    shuffle_buffer: NonNegativeInt
    workers: NonNegativeInt
    resampled: bool
    s3_endpoint_url: str
    # demo source: > 0 generates that many procedural scenes (galip.data.demo_data) and serves them locally
    demo_images: NonNegativeInt
    demo_seed: Seed
    demo_broken: bool = Field(description="add one entry of each broken kind (404, HTML, truncated, empty, refused)")
    max_skip_fraction: float = Field(
        gt=0, le=1, description="stop when more than this share of samples is unusable (after 100 samples)"
    )

    @model_validator(mode="after")
    def _crop_fits(self) -> "DataConfig":
        if self.crop_size > self.load_size:
            raise ValueError(f"data.crop_size ({self.crop_size}) must be <= data.load_size ({self.load_size})")
        return self


class ModelConfig(_Section):
    """Networks. Sizes that depend on CLIP (width, grid, blocks, embed dim) are read from the CLIP model."""

    clip_model: str
    clip_pretrained: str = Field(description="open_clip pretrained tag, local checkpoint path, or '' for random")
    image_size: int = Field(gt=0, description="generator output size")
    nz: PositiveInt
    ngf: PositiveInt
    ndf: PositiveInt
    code_channels: PositiveInt
    code_mid_channels: PositiveInt
    mapper_blocks: PositiveInt
    # ViT block indices (0-based). Empty = derived from the depth as the reference's (1, 4, 8) and
    # 1..8 are for 12 blocks.
    feature_blocks: tuple[int, ...]
    prompt_blocks: tuple[int, ...]
    pixel_norm: Literal["reference", "standard"]

    @field_validator("feature_blocks", "prompt_blocks", mode="before")
    @classmethod
    def _listy(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v


class TrainConfig(_Section):
    out_dir: Folder
    batch_size: int = Field(gt=0, description="per process, per step")
    grad_accum: PositiveInt
    max_steps: PositiveInt
    lr_g: PositiveFloat
    lr_d: PositiveFloat
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)
    sim_w: float = Field(ge=0)
    magp_k: float = Field(ge=0)
    magp_p: PositiveFloat
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        description="bf16 (GPU default), fp16 = the reference's recipe with loss scaling, fp32 (CPU default)"
    )
    compile: bool = Field(description="torch.compile G, the fake-image path of D/C and the CLIP image pass")
    tf32: bool = Field(description="CUDA: TF32 tensor cores for fp32 matmuls/convolutions")
    cudnn_benchmark: bool = Field(description="CUDA: let cuDNN pick the fastest algorithm per shape")
    ema_decay: float = Field(ge=0, lt=1, description="EMA of G's weights for sampling/eval/registry; 0 = off")
    device: Device
    seed: Seed
    log_every: PositiveInt
    ckpt_every: PositiveInt
    sample_every: PositiveInt
    keep_checkpoints: PositiveInt
    checkpoint_uri: str = Field(description="optional s3:// prefix the checkpoints are uploaded to")
    require_checkpoint_upload: bool = Field(
        description="fail the run (after its local checkpoint) when its newest checkpoint did not reach checkpoint_uri"
    )
    storage_retries: int = Field(ge=0, description="retries of an object-store call before it counts as failed")
    storage_backoff_s: float = Field(ge=0, description="wait before the first retry; doubled for each further one")
    storage_deadline_s: float = Field(
        gt=0, description="longest one object-store call (tries, waits and timeouts) may take, e.g. listing checkpoints at --resume"
    )
    sample_prompts: tuple[str, ...]

    eval_every: int = Field(ge=0, description="in-training evaluation every N steps (at the next checkpoint step); 0 = off")
    eval_samples: int = Field(gt=0, description="images per in-training evaluation")
    eval_metrics: tuple[str, ...]

    @field_validator("sample_prompts", "eval_metrics", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("sample_prompts")
    @classmethod
    def _prompts_not_blank(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or not all(p.strip() for p in v):
            raise ValueError("need at least one prompt, and no empty or blank ones")
        return v


class EvalConfig(_Section):
    """galip.eval.evaluate: which metrics, on how many samples, against which reference set."""

    out_dir: Folder
    n_samples: PositiveInt
    batch_size: PositiveInt
    inception_weights: str = Field(description="path to weights-inception-2015-12-05-6726825d.pth; '' = torch hub cache")
    eval_clip_model: str
    eval_clip_pretrained: str = Field(description="open_clip tag, local checkpoint path, or '' for random weights")
    # Random-weight eval CLIPs (demo) are seeded apart from training's so they are a different network.
    eval_clip_seed: Seed
    metrics: tuple[str, ...]
    seed: Seed
    device: Device
    prompt_source: Literal["reference", "demo"] = Field(
        description="captions of the reference set, or the demo's procedural prompts (half held-in, half held-out pairs)"
    )
    ref_shards: str = Field(description="reference set (dir, brace pattern of .tar); '' = the training shards")
    ref_samples: int = Field(ge=0, description="reference images for FID/FD statistics; 0 = n_samples")
    ref_stats_dir: str = Field(description="cache of reference statistics; '' = <out_dir>/../ref_stats")
    r_precision_candidates: int = Field(ge=2, description="captions ranked per image (the true one + distractors)")
    grid_n: int = Field(gt=0, description="images per fixed prompt (train.sample_prompts) in the sample grid")

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v


class Toleration(_Section):
    """A Kubernetes pod toleration (GPU node pools are usually tainted so only GPU work lands there)."""

    key: str = ""
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str = ""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""


class KubeConfig(_Section):
    """Kubernetes placement of the training run (galip.ops.kube renders it; infra/ deploys the cluster side).

    nodes = 1 trains inside the Prefect flow-run pod; nodes > 1 makes the train task submit an Indexed
    Job whose pods rendezvous through c10d. Names here must match infra/ (pool, secrets, PVC).
    """

    image: str = Field(description="training image (infra/docker/Dockerfile)")
    namespace: str
    work_pool: str = Field(description="Prefect Kubernetes work pool (infra/prefect/base-job-template.json)")
    nodes: int = Field(gt=0, description="pods (machines); > 1 = multi-node Indexed Job")
    gpus_per_node: int = Field(gt=0, description="torchrun --nproc-per-node and nvidia.com/gpu per pod")
    cpu_per_node: str = Field(description="CPU request per pod (data loading + CLIP text encoding)")
    memory_per_node: str = Field(description="memory request = limit per pod")
    shm_size: str = Field(description="/dev/shm size; DataLoader workers pass batches through it")
    node_selector: dict[str, str]
    tolerations: tuple[Toleration, ...]
    service_account: str = Field(description="infra/k8s/rbac.yaml")
    s3_secret: str = Field(description="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (+ optional AWS_DEFAULT_REGION, AWS_ENDPOINT_URL)")
    mlflow_tracking_uri: str
    runs_pvc: str = Field(description="ReadWriteMany PVC shared by all pods: every rank loads the checkpoint rank 0 picked")
    # The image's WORKDIR with the PVC mounted at <workdir>/runs: the relative train.out_dir
    # (runs/cc12m) is then the same directory in the flow-run pod and in every Job pod.
    workdir: str
    runs_mount: str
    rdzv_port: int = Field(gt=0, lt=65536)
    rdzv_join_timeout: int = Field(gt=0, description="seconds to wait for all pods (GPU node scale-up, image pulls)")
    max_restarts: int = Field(ge=0, description="torchrun --max-restarts: in-place worker-group restarts per pod")
    backoff_limit: int = Field(ge=0, description="Job pod failures (not counting preemptions) before the run fails")
    ttl_seconds_after_finished: NonNegativeInt
    cluster_domain: str
    env: dict[str, str] = Field(description="extra container env (e.g. NCCL_SOCKET_IFNAME)")

    @field_validator("env")
    @classmethod
    def _env_holds_no_secret(cls, v: dict[str, str]) -> dict[str, str]:
        # The config is saved with every run and printed by --dry-run: secrets reach pods through a Secret.
        secret = sorted(k for k in v if _SECRET_NAME.search(k))
        if secret:
            raise ValueError(
                f"{', '.join(secret)} look(s) like a secret, and the config is saved with every run: put it in a "
                "Kubernetes Secret (kube.s3_secret holds the AWS keys) instead of kube.env"
            )
        return v

    @field_validator("tolerations", mode="before")
    @classmethod
    def _tolerations(cls, v: Any) -> Any:
        return tuple(Toleration.model_validate(t) if isinstance(t, dict) else t for t in v) if isinstance(v, list) else v


class ClipPretrainConfig(_Section):
    """galip train-clip: contrastive training of the (tiny) CLIP on the downloaded shards (open_clip_train).

    A randomly initialised CLIP gives G too weak a text signal for a short CPU demo, so the demo first
    trains its own tiny CLIP on the demo captions; later stages load it with
    ``model.clip_pretrained=<out_path>``.
    """

    enabled: bool = Field(description="run the CLIP training step (demo); production uses pretrained CLIP weights")
    out_path: str = Field(description="state_dict loadable with open_clip pretrained=<path>")
    epochs: PositiveInt
    batch_size: int = Field(gt=1, description="contrastive batch: the number of captions each image is ranked against")
    lr: PositiveFloat
    wd: float = Field(ge=0)
    warmup: int = Field(ge=0, description="warm-up steps")
    workers: NonNegativeInt
    seed: Seed
    attempts: PositiveInt = Field(description="train again with the next seed while an attribute stays unseparated (clip_probe.WEAK_SEPARATION)")
    report_path: str = Field(description="timing and per-attribute separation (galip.train.clip_probe)")
    separation_samples: PositiveInt = Field(description="rendered scenes per split for the separation measurement")


class MlflowConfig(_Section):
    """Tracking and registry. ``MLFLOW_TRACKING_URI`` in the environment wins over ``tracking_uri``."""

    tracking_uri: str = Field(description="sqlite:///<file> = embedded; MLFLOW_TRACKING_URI in the environment wins")
    experiment: str
    model_name: str = Field(description="registered model name")
    gate_metric: str = Field(description="metric from metrics.json that decides promotion to champion")
    gate_direction: Literal["higher", "lower"] = Field(description="which way is better for gate_metric")
    gate_bar: float = Field(
        allow_inf_nan=False, description="a version must reach this gate_metric value (at least / at most, per direction) to become champion"
    )
    ui_url: str = Field(description="MLflow UI address for links; '' = the tracking URI when it is a server, else http://127.0.0.1:5000")
    challenger_alias: str
    champion_alias: str
    request_retries: int = Field(ge=0, description="MLflow HTTP retries per request of the training log and of every stage's run bookkeeping, not the model upload (MLFLOW_HTTP_REQUEST_MAX_RETRIES wins)")
    request_timeout_s: int = Field(gt=0, description="MLflow HTTP timeout per request of the training log and of every stage's run bookkeeping, not the model upload (MLFLOW_HTTP_REQUEST_TIMEOUT wins)")
    outage_backoff_s: float = Field(ge=0, description="after a failed logging call, leave the tracking server alone this long; the calls are replayed later")


class FlowConfig(_Section):
    """How the Prefect flow galip-train runs the stages."""

    nproc_per_node: int = Field(gt=0, description="torchrun --nproc_per_node for train and evaluate")
    use_dvc: bool = Field(
        description="run each stage as `dvc repro --single-item <stage>` so dvc.lock records what the flow produced"
    )
    require_gpu: bool = Field(description="fail before any work when no CUDA device is visible (production)")
    download_retries: int = Field(ge=0, description="retries of the network-bound download task")


class Config(_Section):
    profile: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    kube: KubeConfig
    clip_pretrain: ClipPretrainConfig
    mlflow: MlflowConfig
    flow: FlowConfig

    @model_validator(mode="after")
    def _no_credentials(self) -> "Config":
        # The resolved config is saved with every run, checkpoint and MLflow run: no secret may ride in it.
        found = [key for key, value in flatten(self.to_dict()).items() if has_credentials(str(value))]
        if found:
            raise ValueError(
                f"{', '.join(found)} holds a password or token, and the config is saved with every run: "
                "give credentials through the environment (MLFLOW_TRACKING_URI or MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_not_reading = 0  # > 0 while a Config is built or bookkept: those reads are not what a stage depends on


def reference_spec(cfg: Config) -> tuple[str, str]:
    """Where the evaluation's reference set is read from: (spec, the config key it came from), i.e.
    eval.ref_shards, else the training shards. Here, not beside the reader, so the flow's preflight can
    check it without importing torch and the metrics (4 s of a run that may only have to fail fast)."""
    if cfg.eval.ref_shards:
        return cfg.eval.ref_shards, "eval.ref_shards"
    if cfg.data.shards:
        return cfg.data.shards, "data.shards"
    return cfg.data.shards_dir, "data.shards_dir"


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Reads inside are not a stage's inputs (validators; the pipeline's MLflow bookkeeping)."""
    global _not_reading
    _not_reading += 1
    try:
        yield
    finally:
        _not_reading -= 1


def _validate(tree: dict[str, Any]) -> "Config":
    with unrecorded():
        return Config.model_validate(tree)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr_g": 1}} -> {"train.lr_g": 1} (MLflow params, config comparisons)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


# Keys a resume may not change silently. model.*: the weights were shaped (and trained) by them.
# These train.* keys: the optimiser and the loss the saved state belongs to.
RECIPE_KEYS = ("lr_g", "lr_d", "beta1", "beta2", "sim_w", "magp_k", "magp_p", "batch_size", "grad_accum", "precision", "seed")


def resume_changes(saved: dict[str, Any], current: Config) -> tuple[list[str], list[str]]:
    """(model keys, train recipe keys) whose values differ between a checkpoint's config and ``current``,
    each as ``key=old -> new``."""
    def diff(section: str, keys: Sequence[str] | None) -> list[str]:
        old = flatten(saved.get(section, {}), f"{section}.")
        new = flatten(current.to_dict()[section], f"{section}.")
        names = sorted(old.keys() | new.keys()) if keys is None else [f"{section}.{k}" for k in keys]
        return [f"{k}={old.get(k)!r} -> {new.get(k)!r}" for k in names if old.get(k) != new.get(k)]

    return diff("model", None), diff("train", RECIPE_KEYS)


def _deep_merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr_g=2e-4`` -> (["train", "lr_g"], 2e-4); values are YAML, as in ``dvc exp run -S``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. -S train.lr_g=2e-4)")
    parsed = yaml.safe_load(value) if value.strip() else ""
    # YAML 1.1 reads "2e-4" as a string; users mean a number.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else parsed
        except ValueError:
            pass
    return key.strip().split("."), parsed


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see params.yaml for valid keys)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: missing (every key must be set in the params file: profiles/cc12m.yaml lists them all; the code has no defaults)")
        elif isinstance(e.get("input"), dict):  # a check across keys: the message names them
            lines.append(f"  {key + ': ' if key else ''}{msg}")
        else:
            lines.append(f"  {key}: {msg} (got {redact(repr(e.get('input')))})")
    if len(lines) == 1:
        return f"invalid configuration: {lines[0].strip()}"
    return "invalid configuration:\n" + "\n".join(lines)


PRESETS_DIR = "profiles"
# A preset names what it changes relative to the one it extends; a params file without `extends` is complete.
EXTENDS = "extends"


def _read_tree(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: no such params file (run from the repository root or pass --params)")
    if not path.is_file():
        raise ConfigError(f"--params {path} is not a file; pass the params.yaml file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"--params {path} is not a text file (not UTF-8); pass the params.yaml file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    if "profiles" in raw:
        raise ConfigError(
            f"{path}: a 'profiles' table is no longer read: profiles are files in {PRESETS_DIR}/ (e.g. {PRESETS_DIR}/demo.yaml), "
            "and params.yaml holds the values in force (`galip profile demo` writes it)"
        )
    return raw


def presets_dir(params_path: str | Path) -> Path:
    """profiles/ next to the params file (the repository root), else next to the package (editable installs)."""
    here = Path(params_path).resolve().parent / PRESETS_DIR
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / PRESETS_DIR


def preset_names(params_path: str | Path = "params.yaml") -> list[str]:
    return sorted(p.stem for p in presets_dir(params_path).glob("*.yaml"))


def preset_tree(name: str, params_path: str | Path = "params.yaml", _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The complete params tree of preset ``name`` (profiles/<name>.yaml merged onto what it extends)."""
    path = presets_dir(params_path) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile {name!r} is not defined: no {path} (have: {preset_names(params_path)})")
    if name in _seen:
        raise ConfigError(f"{path}: `extends` loops ({' -> '.join([*_seen, name])})")
    raw = _read_tree(path)
    base = raw.pop(EXTENDS, None)
    tree = _deep_merge(preset_tree(str(base), params_path, (*_seen, name)), raw) if base else raw
    tree["profile"] = name
    return tree


def resolve(raw: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A validated Config from a complete params tree and KEY=VALUE overrides (DVC's syntax)."""
    tree = copy.deepcopy(raw or {})
    for path, value in (parse_override(o) for o in overrides):
        _apply_override(tree, path, value)
    try:
        return _validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def _profile_override(overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """``-S profile=cc12m`` selects a profile like ``--profile cc12m`` (it is not a value to set)."""
    profile, rest = None, []
    for o in overrides:
        path, value = parse_override(o)
        if path == ["profile"]:
            profile = str(value)
        else:
            rest.append(o)
    return profile, rest


def load_tree(path: str | Path = "params.yaml", profile: str | None = None) -> dict[str, Any]:
    """The params tree in force: ``path`` (params.yaml: the values every stage and DVC read, including
    `dvc exp run -S` edits), or the preset profiles/<profile>.yaml when ``profile`` names another
    profile than the one ``path`` holds."""
    path = Path(path)
    raw = _read_tree(path)
    if profile and profile != raw.get("profile"):
        log.info("%s holds profile %r: using the preset %s/%s.yaml", path, raw.get("profile"), PRESETS_DIR, profile)
        return preset_tree(profile, path)
    base = raw.pop(EXTENDS, None)
    return _deep_merge(preset_tree(str(base), path), raw) if base else raw


def load_config(path: str | Path = "params.yaml", overrides: Sequence[str] = (), profile: str | None = None) -> Config:
    chosen, rest = _profile_override(overrides)
    return resolve(load_tree(path, chosen or profile), rest)


def write_profile(name: str, out: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Config:
    """Write preset ``name`` (+ overrides), complete and with the presets' comments, to ``out``: the file
    every stage, `dvc repro` and `dvc exp run -S <key>=<value>` then use. Validated before writing."""
    from ruamel.yaml import YAML

    cfg = resolve(preset_tree(name, out), overrides)
    rt = YAML()
    rt.width = 4096

    def load(preset: str) -> Any:
        doc = rt.load((presets_dir(out) / f"{preset}.yaml").read_text(encoding="utf-8"))
        base = doc.pop(EXTENDS, None)
        if base is None:
            return doc
        merged = load(str(base))
        _merge_commented(merged, doc)
        return merged

    doc = load(name)
    doc["profile"] = name
    _merge_commented(doc, _nest(cfg.to_dict(), keep=doc))
    header = (
        f"# The values every stage reads (galip commands, dvc repro, the Prefect flow): profile {name!r},\n"
        f"# written by `galip profile {name}` from {PRESETS_DIR}/{name}.yaml. Change any value here or with\n"
        "# `dvc exp run -S train.lr_g=3e-4`; `galip profile --diff` lists what differs from the preset.\n"
    )
    import io

    buf = io.StringIO()
    rt.dump(doc, buf)
    body = buf.getvalue()
    while body.startswith("#"):  # the preset's own header describes the preset, not this file
        body = body.split("\n", 1)[1]
    Path(out).write_text(header + body, encoding="utf-8")
    return cfg


def _nest(values: dict[str, Any], keep: Any) -> dict[str, Any]:
    """``values`` (the resolved config) keeping only what differs from ``keep`` (the commented document)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(keep.get(k), dict):
            sub = _nest(v, keep[k])
            if sub:
                out[k] = sub
        elif _plain(keep.get(k)) != v:
            out[k] = v
    return out


def _plain(node: Any) -> Any:
    return json.loads(json.dumps(node, default=list))


def _merge_commented(doc: Any, over: dict[str, Any]) -> None:
    """Set ``over``'s values in the round-trip document ``doc``, carrying the overlay's own comments."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict) and v:
            _merge_commented(doc[k], v)
            continue
        doc[k] = v
        comments = getattr(over, "ca", None)
        if comments is not None and hasattr(doc, "ca"):
            # the base's comment explains the base's value: the overlay's own comment, or none
            if k in comments.items:
                doc.ca.items[k] = comments.items[k]
            else:
                doc.ca.items.pop(k, None)


def profile_diff(path: str | Path = "params.yaml") -> tuple[str, list[str]]:
    """(profile, ``key: preset value -> value`` for every key where ``path`` differs from its preset)."""
    raw = load_tree(path)
    name = str(raw.get("profile", ""))
    current = flatten(resolve(raw).to_dict())
    preset = flatten(resolve(preset_tree(name, path)).to_dict())
    return name, [f"{k}: {preset.get(k)!r} -> {current.get(k)!r}" for k in sorted(current) if preset.get(k) != current.get(k)]


SECTIONS = tuple(name for name in Config.model_fields if name != "profile")


@contextlib.contextmanager
def recording_reads() -> Iterator[set[str]]:
    """Every ``section.key`` read from a Config while active: what a stage depends on, found by running
    it (tests/test_dvc_repro.py compares it with dvc.yaml's ``params:``). Serialising a config (saving
    it with a checkpoint, logging it) does not count as reading it."""
    names = {Config.model_fields[s].annotation: s for s in SECTIONS}
    reads: set[str] = set()
    original = _Section.__getattribute__

    def recording(self: Any, attr: str) -> Any:
        if _not_reading:
            return original(self, attr)
        section = names.get(type(self))
        if section and attr in type(self).model_fields:
            reads.add(f"{section}.{attr}")
        elif type(self) is Config and attr == "profile":
            reads.add("profile")
        return original(self, attr)

    _Section.__getattribute__ = recording  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        _Section.__getattribute__ = original  # type: ignore[method-assign]
# Where a saved config's missing keys come from: the working directory's params.yaml (the repository
# root, the image's WORKDIR), else the one next to the package (editable installs run from elsewhere).
PARAMS_CANDIDATES = (Path("params.yaml"), Path(__file__).resolve().parents[1] / "params.yaml")


def missing_keys(saved: dict[str, Any]) -> list[str]:
    """Dotted keys the Config needs that ``saved`` lacks (a config saved before those keys existed)."""
    out = [name for name in ("profile", *SECTIONS) if name not in saved]
    for name in SECTIONS:
        if isinstance(saved.get(name), dict):
            section = Config.model_fields[name].annotation
            out += [f"{name}.{k}" for k in section.model_fields if k not in saved[name]]
    return out


def fill_missing(saved: dict[str, Any], params: str | Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """``saved`` with the keys it lacks taken from params.yaml (the saved profile's values), and those keys."""
    missing = missing_keys(saved)
    if not missing:
        return saved, []
    path = Path(params) if params else next((c for c in PARAMS_CANDIDATES if c.is_file()), None)
    if path is None or not path.is_file():
        raise ConfigError(
            f"the saved config lacks {', '.join(missing)} (saved before these keys existed) and no params.yaml "
            f"was found to fill them from (looked at {', '.join(str(c) for c in PARAMS_CANDIDATES)}): run from the repository root"
        )
    profile = saved.get("profile")
    source = load_config(path, profile=profile if profile in preset_names(path) else "cc12m").to_dict()
    out = copy.deepcopy(saved)
    for key in missing:
        section, _, name = key.partition(".")
        if name:
            out[section][name] = copy.deepcopy(source[section][name])
        else:
            out[section] = copy.deepcopy(source[section])
    log.warning(
        "saved config lacks %s (saved before these keys existed): filled from %s (profile %s)",
        ", ".join(missing), path, source["profile"],
    )  # fmt: skip
    return out, missing


def config_from_dict(d: dict[str, Any], params: str | Path | None = None) -> Config:
    """Rebuild a Config saved in a checkpoint or run (already resolved). Keys it lacks because it was
    saved before they existed are filled from params.yaml (``params``, else the one found; the saved
    profile's values), with a warning naming them."""
    filled, _ = fill_missing(d, params)
    try:
        return _validate(filled)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None
