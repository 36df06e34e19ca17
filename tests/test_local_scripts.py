"""The local servers' addresses (scripts/prefect-local.sh) and what a flow run logs as MLflow params."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port


def pick_port(home: Path, name: str, default: int, **env: str) -> subprocess.CompletedProcess:
    command = f"source scripts/prefect-local.sh && _pick_port {name} {default}"
    full_env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(home), "PY": sys.executable, **env}
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60, check=True)


def test_ui_ports_are_the_default_then_the_recorded_one(tmp_path):
    default = free_port()
    assert pick_port(tmp_path, "prefect", default).stdout.strip() == str(default)
    assert (tmp_path / "prefect.port").read_text().strip() == str(default)
    with socket.socket() as busy:  # another program took the port: a free one, said so, and recorded
        busy.bind(("127.0.0.1", default))
        busy.listen()
        moved = pick_port(tmp_path, "prefect", default)
    port = int(moved.stdout.strip())
    assert port != default and f"port {default} is in use" in moved.stderr
    # `make ui` after `make stop`: the address printed last time, not the default
    assert pick_port(tmp_path, "prefect", default).stdout.strip() == str(port)
    explicit = free_port()
    assert pick_port(tmp_path, "prefect", default, GALIP_PREFECT_PORT=str(explicit)).stdout.strip() == str(explicit)
    assert pick_port(tmp_path, "mlflow", 5000).stdout.strip() != "", "each UI has its own record"


def test_run_config_tags_are_the_recipe_and_what_differs_from_the_preset():
    """Every entry point tags the run with these same config values (galip.ops.pipeline_run.config_tags;
    the run has no MLflow params); the full config is an artifact. No tag a stage records later is named
    as a config key, so none overwrites a config value."""
    from galip.config import flatten, load_config
    from galip.ops.pipeline_run import CLIP_TAGS, DATA_SUMMARY_TAGS, DATA_VERSION_TAGS, RECIPE_KEYS, WORLD_SIZE_TAG, config_tags
    from galip.ops.tracking import FAILURES_TAG

    cfg = load_config("params.yaml", profile="demo")
    logged = config_tags(cfg)
    assert set(logged) == {"profile", WORLD_SIZE_TAG, *RECIPE_KEYS}, "params.yaml is the demo preset: only the recipe keys"
    assert logged["train.max_steps"] == str(cfg.train.max_steps) and logged["profile"] == "demo"
    config = flatten(cfg.to_dict())
    assert len(logged) < len(config) / 3
    changed = config_tags(load_config("params.yaml", ["train.sim_w=2", "kube.nodes=2"], profile="demo"))
    assert changed["train.sim_w"] == "2.0" and changed["kube.nodes"] == "2", "a changed key is always tagged"
    records = {*DATA_VERSION_TAGS, *DATA_SUMMARY_TAGS.values(), *CLIP_TAGS, WORLD_SIZE_TAG, FAILURES_TAG, "galip.stages", "galip.profile"}
    assert not records & {*config, *cfg.to_dict()}, "a record tag named as a config key would overwrite its value"


def test_flow_parameters_reject_a_gate_metric_evaluation_does_not_report():
    from pydantic import ValidationError

    from flows.galip_train import GalipTrainParams

    with pytest.raises(ValidationError, match="mlflow.gate_metric: 'fid' is not reported by eval.metrics"):
        GalipTrainParams(profile="demo", overrides=["mlflow.gate_metric=fid"])
    GalipTrainParams(profile="demo", overrides=["mlflow.gate_metric=fid"], register_model=False)


def test_stage_output_reaches_the_run_log_without_terminal_control_codes():
    """Two stacked tqdm bars (a reference-statistics bar inside the training bar) move the cursor with ESC[A."""
    from flows.galip_train import stream_process

    script = (
        "import sys\nfrom tqdm import tqdm\n"
        "outer = tqdm(total=2, desc='train', file=sys.stdout)\n"
        "for _ in tqdm(range(3), desc='fd_clip reference', file=sys.stdout): pass\n"
        "outer.update(2); outer.close(); print('\\x1b[1;33mdone\\x1b[0m')\n"
    )
    lines: list[str] = []
    stream_process([sys.executable, "-c", script], {"PATH": "/usr/bin:/bin"}, lines.append)
    assert lines and not [line for line in lines if "\x1b" in line], lines
    assert lines[-1] == "done" and any(line.startswith("fd_clip reference: 100%") for line in lines), lines
