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


def test_run_params_are_the_sections_its_stages_read():
    from flows.galip_train import GalipTrainParams, run_params
    from galip.ops.tracking import stage_params

    cfg = GalipTrainParams(profile="demo").config()
    logged = run_params(cfg, ["download", "clip", "train", "evaluate", "register"], world_size=1)
    sections = {k.split(".")[0] for k in logged}
    assert sections == {"profile", "data", "model", "train", "eval", "clip_pretrain", "mlflow", "flow", "world_size"}
    from galip.config import flatten

    everything = flatten(cfg.to_dict())
    assert len(logged) < len(everything) - 20, "kube.* and the other unused sections are left out"
    assert logged["train.max_steps"] == str(cfg.train.max_steps)
    trainer = stage_params(cfg, ["train"])
    assert set(trainer) == {"profile", "data", "model", "train"}, "the trainer logs a subset with the same names"


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
