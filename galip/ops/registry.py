"""MLflow model registry: log the generator as a pyfunc, register it, promote by alias after a gate.

Every registration gets the alias ``challenger``. ``champion`` moves to the new version only when its
gate metric (``mlflow.gate_metric``) meets the bar ``mlflow.gate_bar`` and beats the current champion's
(better = ``mlflow.gate_direction``); otherwise champion stays. Rule and decision are written into the
version's description (and its ``gate_decision`` tag). Consumers load ``models:/<name>@champion``; people
can move either alias by hand in the MLflow UI, and the next gate compares against whatever champion
then points at.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from ..config import Config
from ..errors import MissingInputError, UserError
from .pipeline_run import MODEL_VERSION_DATA_TAGS
from .redact import redact

# Versions registered before metric tags took the metrics.json name (`fid`) carry it as `gate.fid`.
LEGACY_METRIC_TAG_PREFIX = "gate."
ORIGIN_TAG_PREFIX = "origin."
# Runtime packages of the pyfunc; pinned to what this environment trained with.
SERVING_PACKAGES = ("torch", "torchvision", "open_clip_torch", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "mlflow")


class RegistryError(UserError, RuntimeError):
    """A registration input is missing or unusable, or MLflow did not take the model; the message names it."""


@contextlib.contextmanager
def _mlflow_step(what: str, cfg: Config, run_id: str) -> Iterator[None]:
    """Turn an MLflow failure during ``what`` into one RegistryError that says what did not happen."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as exc:
        uri = redact(tracking_uri(cfg))
        raise RegistryError(
            f"could not {what} (MLflow at {uri}, run {run_id}): {type(exc).__name__}: {redact(str(exc))}; "
            "no new version is registered. Check that the tracking server is reachable, then register again "
            "(`galip register --checkpoint <ckpt> --metrics <metrics.json>`, or retry the flow run)"
        ) from exc


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str
    version: str
    champion_version: str | None  # champion after the decision
    metric: str
    value: float | None
    champion_value: float | None


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` (production server) or ``mlflow.tracking_uri`` (embedded SQLite).

    MLflow prints "View run ... at: <tracking URI>/..." to stdout when a run ends, password included
    when the URI holds one: that printing is switched off here, for every caller that gets the URI."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def configure(cfg: Config) -> None:
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(tracking_uri(cfg))


def pip_requirements() -> list[str]:
    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            raise RegistryError(f"package {package} is not installed; the pyfunc cannot pin its requirements") from None
    return pins


def write_generator(checkpoint: Path, out: Path) -> Path:
    """NetG weights + resolved config + step only: what inference needs (D, C and optimizers are ~2/3)."""
    import torch

    from ..train.checkpoint import FORMAT_VERSION, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    slim = {"format_version": FORMAT_VERSION, "step": ckpt["step"], "config": ckpt["config"], "netG": ckpt["netG"]}
    torch.save(slim, out)
    return out


def model_artifacts(checkpoint: Path, workdir: Path) -> dict[str, str]:
    """Files logged with the pyfunc: generator, CLIP reference, and the CLIP weights when they are a local file."""
    from ..train.checkpoint import load_checkpoint
    from ..config import config_from_dict
    from .serving import clip_reference

    saved = config_from_dict(load_checkpoint(checkpoint)["config"])
    artifacts = {"generator": str(write_generator(checkpoint, workdir / "generator.pt"))}
    weights = saved.model.clip_pretrained
    local_weights = bool(weights) and Path(weights).is_file()
    if weights and not local_weights and (os.path.sep in weights or weights.endswith((".pt", ".pth", ".safetensors"))):
        raise RegistryError(f"the checkpoint's CLIP weights {weights!r} are not on this machine; cannot package the model")
    if local_weights:
        artifacts["clip_weights"] = weights
    reference = clip_reference(saved.model, saved.train.seed, Path(weights).name if local_weights else None)
    (workdir / "clip_reference.json").write_text(json.dumps(reference, indent=2))
    artifacts["clip_reference"] = str(workdir / "clip_reference.json")
    return artifacts


def origin_tags(checkpoint: Path) -> dict[str, str]:
    """``origin.*`` tags for weights imported from elsewhere (``galip import-reference``); {} for our own."""
    from ..train.checkpoint import load_checkpoint

    origin = load_checkpoint(checkpoint).get("origin") or {}
    return {f"{ORIGIN_TAG_PREFIX}{k}": ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in origin.items()}


def log_model(cfg: Config, checkpoint: Path, run_id: str) -> str:
    """Log the pyfunc to ``run_id`` (origin tags on the run); returns the model URI."""
    import mlflow

    from . import serving

    configure(cfg)
    origin = origin_tags(checkpoint)
    active = mlflow.active_run()
    with tempfile.TemporaryDirectory() as tmp, _mlflow_step("log the model", cfg, run_id), contextlib.ExitStack() as in_run:
        # The orchestrator may already hold run_id open (the flow's run); log into it rather than reopen it.
        if not (active and active.info.run_id == run_id):
            in_run.enter_context(mlflow.start_run(run_id=run_id))
        info = mlflow.pyfunc.log_model(
            name=cfg.mlflow.model_name,
            python_model=serving.GalipTextToImage(),
            artifacts=model_artifacts(checkpoint, Path(tmp)),
            signature=serving.signature(),
            pip_requirements=pip_requirements(),
            # The galip package travels with the model, so serving needs no checkout of this repository.
            code_paths=[str(Path(__file__).resolve().parents[1])],
            metadata=origin or None,
        )
        if origin:
            mlflow.set_tags(origin)
    return info.model_uri


def _better(value: float, than: float, direction: str) -> bool:
    return value > than if direction == "higher" else value < than


def _meets_bar(value: float, bar: float, direction: str) -> bool:
    return value >= bar if direction == "higher" else value <= bar


def _num(value: float) -> str:
    """Metric values as people read them: 4 significant digits, no float32 noise (1.399999976 -> 1.4)."""
    return f"{value:.4g}"


# Result keys of eval.metrics entries whose names differ from the entry (galip/eval/metrics/__init__.py).
_REPORTED_AS = {"clip_score": ("clip_score_train", "clip_score_eval", "clip_cosine_train", "clip_cosine_eval")}


def check_gate_metric(cfg: Config) -> None:
    """The gate compares a number evaluation reports; a typo would leave every version unpromoted."""
    from ..config import ConfigError

    metric, names = cfg.mlflow.gate_metric, cfg.eval.metrics
    if not any(metric == n or metric.startswith(n + "_") or metric in _REPORTED_AS.get(n, ()) for n in names):
        raise ConfigError(
            f"mlflow.gate_metric: {metric!r} is not reported by eval.metrics {list(names)}; "
            "choose one of their results (see galip/eval/metrics/__init__.py) or add its metric"
        )


def gate_rule(cfg: Config) -> str:
    m = cfg.mlflow
    bound, than = ("at least", "higher") if m.gate_direction == "higher" else ("at most", "lower")
    return (
        f"`{m.champion_alias}` moves to a new version when its `{m.gate_metric}` is {bound} {_num(m.gate_bar)} "
        f"(`mlflow.gate_bar`) and {than} than the current {m.champion_alias}'s (`mlflow.gate_direction: {m.gate_direction}`)"
    )


def _version_metric(client, name: str, version, metric: str) -> float | None:
    """The gate metric recorded at registration (tag), else the version's run metric."""
    tag = version.tags.get(metric, version.tags.get(LEGACY_METRIC_TAG_PREFIX + metric))
    if tag is not None:
        return float(tag)
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(metric)
        return float(value) if value is not None else None
    return None


def _current_champion(client, cfg: Config):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(cfg.mlflow.model_name, cfg.mlflow.champion_alias)
    except MlflowException:
        return None  # no champion yet


def gate(cfg: Config, version: str, value: float | None) -> GateDecision:
    """Move ``champion`` to ``version`` only if its gate metric meets the bar and beats the current champion's."""
    from mlflow import MlflowClient

    m = cfg.mlflow
    client = MlflowClient(tracking_uri(cfg))
    champion = _current_champion(client, cfg)
    champ_value = _version_metric(client, m.model_name, champion, m.gate_metric) if champion else None
    stays = f"{m.champion_alias} stays v{champion.version}" if champion else f"no {m.champion_alias} yet"

    def decide(promote: bool, reason: str) -> GateDecision:
        if promote:
            client.set_registered_model_alias(m.model_name, m.champion_alias, version)
        after = str(version) if promote else (str(champion.version) if champion else None)
        return GateDecision(promote, reason, version, after, m.gate_metric, value, champ_value)

    if value is None or math.isnan(value):
        return decide(False, f"v{version} has no finite {m.gate_metric}; {stays}")
    score = f"v{version} {m.gate_metric}={_num(value)}"
    bound = "at least" if m.gate_direction == "higher" else "at most"
    if not _meets_bar(value, m.gate_bar, m.gate_direction):
        return decide(False, f"{score} misses the bar ({bound} {_num(m.gate_bar)}); {stays}")
    if champion is None:
        return decide(True, f"{score} meets the bar ({bound} {_num(m.gate_bar)}) and there is no {m.champion_alias} yet: v{version} becomes {m.champion_alias}")
    if champion.version == version:
        return decide(False, f"v{version} already is {m.champion_alias}")
    if champ_value is None:
        return decide(
            False,
            f"{score} meets the bar, but {m.champion_alias} v{champion.version} has no {m.gate_metric} to compare with "
            f"(set by hand?); it stays. Move the alias in the MLflow UI to promote v{version}",
        )
    if _better(value, champ_value, m.gate_direction):
        return decide(True, f"{score} meets the bar and beats {m.champion_alias} v{champion.version} ({_num(champ_value)}): v{version} becomes {m.champion_alias}")
    return decide(False, f"{score} meets the bar but does not beat {m.champion_alias} v{champion.version} ({_num(champ_value)}); {stays}")


def describe(cfg: Config, decision: GateDecision, metrics: dict[str, Any], links: dict[str, str] | None = None) -> str:
    """The model version's description (markdown in the MLflow UI): the decision as plain text first (the
    registered-models list shows that line raw), then the gate rule, how the gate metric is made, the metrics."""
    lines = [
        f"Gate decision: {decision.reason}.",
        "",
        f"**Gate rule**: {gate_rule(cfg)}.",
    ]
    made = _how_made(cfg.mlflow.gate_metric)
    if made:
        lines += ["", f"**How {cfg.mlflow.gate_metric} is made**: `{made}` (each part is among the metrics below)."]
    lines += [
        "",
        "**Metrics**: " + ", ".join(f"{k} {_num(float(v))}" for k, v in metrics.items() if isinstance(v, (int, float))),
    ]
    if links:
        lines += ["", " · ".join(f"[{text}]({url})" for text, url in links.items())]
    return "\n".join(lines)


def _how_made(metric: str) -> str | None:
    """The formula of a summary metric (prompt_fidelity), None for a metric measured directly."""
    from ..eval.formulas import SUMMARY_FORMULAS

    return SUMMARY_FORMULAS.get(metric)


def selection_text(selected_by: Any, checkpoint: str | None = None) -> str:
    """Why this checkpoint was registered, in words (evaluate's protocol.selected_by)."""
    name = Path(checkpoint).name if checkpoint else "the checkpoint"
    if isinstance(selected_by, dict):
        return (f"{name}: the best {selected_by['metric']} ({selected_by['direction']} is better) of the in-training "
                f"evaluations, {float(selected_by['value']):.4g} at step {selected_by['step']}")
    return f"{name}: {selected_by or 'given'} (no in-training evaluation picked it)"


def register(
    cfg: Config, model_uri: str, run_id: str, metrics: dict[str, Any], links: dict[str, str] | None = None,
    selection: str | None = None,
) -> tuple[str, GateDecision]:
    """Register ``model_uri``, tag it with its metrics, alias it challenger, run the champion gate and
    write rule and decision into the version's description (``links``: text -> URL, e.g. the flow run;
    ``selection``: why this checkpoint, see selection_text)."""
    import mlflow
    from mlflow import MlflowClient

    m = cfg.mlflow
    configure(cfg)
    with _mlflow_step(f"register {model_uri} as {m.model_name}", cfg, run_id):
        version = mlflow.register_model(model_uri, m.model_name).version
    client = MlflowClient(tracking_uri(cfg))
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            client.set_model_version_tag(m.model_name, version, key, f"{float(value):.6g}")
    client.set_model_version_tag(m.model_name, version, "mlflow_run_id", run_id)
    if selection:
        client.set_model_version_tag(m.model_name, version, "checkpoint_selection", selection)
    for key, value in client.get_run(run_id).data.tags.items():
        # origin.*: set by log_model for imported weights; the data version and summary (not the run's other
        # data.* config tags)
        if key.startswith(ORIGIN_TAG_PREFIX) or key in MODEL_VERSION_DATA_TAGS:
            client.set_model_version_tag(m.model_name, version, key, value)
        elif key == "mlflow.source.git.commit":
            client.set_model_version_tag(m.model_name, version, "git.commit", value)
    client.set_registered_model_alias(m.model_name, m.challenger_alias, version)
    raw = metrics.get(m.gate_metric)
    decision = gate(cfg, str(version), float(raw) if isinstance(raw, (int, float)) else None)
    client.set_model_version_tag(m.model_name, version, "gate_decision", decision.reason)
    description = describe(cfg, decision, metrics, links)
    if selection:
        description += f"\n\n**Checkpoint**: {selection}"
    client.update_model_version(m.model_name, version, description=description)
    return str(version), decision


def load_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInputError(f"{path}: no metrics file (run `galip evaluate` first)")
    return json.loads(path.read_text())


def register_from_files(cfg: Config, metrics_path: Path | None, checkpoint: Path | None, run_id: str | None) -> dict[str, Any]:
    """CLI path: metrics.json (+ the checkpoint it names) -> logged, registered, gated model.

    A checkpoint without metrics registers too (alias challenger); with no gate metric the gate
    leaves champion where it is.
    """
    import mlflow

    metrics = load_metrics(Path(metrics_path)) if metrics_path else {}
    named = checkpoint or metrics.get("protocol", {}).get("checkpoint")
    if not named:
        raise MissingInputError("no checkpoint to register: pass --checkpoint (or --metrics from `galip evaluate`)")
    ckpt = Path(named)
    if not ckpt.is_file():
        raise MissingInputError(f"checkpoint {ckpt} not found (pass --checkpoint)")
    configure(cfg)
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    with _mlflow_step("log the metrics", cfg, run_id or "(new)"):
        if run_id is None:
            from .tracking import ensure_experiment

            mlflow.set_experiment(experiment_id=ensure_experiment(cfg.mlflow.experiment, tracking_uri(cfg)))
            with mlflow.start_run() as run:
                run_id = run.info.run_id
        mlflow.MlflowClient(tracking_uri(cfg)).log_batch(
            run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0) for k, v in flat.items()]
        )
    model_uri = log_model(cfg, ckpt, run_id)
    version, decision = register(cfg, model_uri, run_id, flat)
    return {"model_uri": model_uri, "name": cfg.mlflow.model_name, "version": version, "run_id": run_id, **asdict(decision)}
