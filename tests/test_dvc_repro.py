"""dvc.yaml: its stages are galip/pipeline.py's command lines for any profile; `dvc repro` runs the demo end
to end into one MLflow run; every config key a stage reads is in that stage's `params:` (recorded while
the stages run); changing a key makes exactly that stage and its downstream stale; `dvc exp run -S` on a
key the profile sets reaches the run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TELEMETRY_OFF, make_tiny_project, venv_bin
from helpers import run_config_tags

from galip.config import SECTIONS, flatten, load_config, write_profile
from galip.pipeline import STAGES, stage_command

REPO = Path(__file__).resolve().parents[1]


def dvc(project: Path, *args: str, timeout: float = 600, **env: str) -> str:
    full = {**os.environ, **TELEMETRY_OFF, "PATH": f"{Path(venv_bin('dvc')).parent}:{os.environ['PATH']}", **env}
    for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"):
        full.pop(k, None)  # the project's own store (mlflow.tracking_uri), as for a user
    proc = subprocess.run([venv_bin("dvc"), *args], cwd=project, env=full, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def rendered_stages(project: Path) -> dict[str, dict]:
    """dvc.yaml as DVC renders it for the params.yaml in ``project`` (its own templating engine)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {s.name: {"cmd": s.cmd, "params": [p for dep in s.params for p in (dep.params or [])]} for s in repo.index.stages}


def declared(stage: str) -> tuple[set[str], set[str]]:
    """(keys and sections in the stage's params:, keys templated into the stage)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    text = yaml.safe_dump(spec)
    return set(spec.get("params", [])), set(re.findall(r"\$\{([^}]+)\}", text))


def covered(key: str, params: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in params)


@pytest.mark.parametrize("profile", ["demo", "cc12m"])
def test_dvc_yaml_renders_to_the_pipeline_commands_for_every_profile(tmp_path, profile):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    cfg = write_profile(profile, tmp_path / "params.yaml")
    stages = rendered_stages(tmp_path)
    assert list(stages) == list(STAGES)
    for stage in STAGES:
        assert stages[stage]["cmd"] == shlex.join(stage_command(stage, cfg)), stage
    assert cfg.train.out_dir == f"runs/{profile}"


def test_every_param_dvc_yaml_names_is_a_config_key():
    keys = set(flatten(load_config(REPO / "params.yaml").to_dict())) | set(SECTIONS) | {"profile"}
    for stage in STAGES:
        params, templated = declared(stage)
        assert params and params <= keys, (stage, params - keys)
        assert templated <= keys, (stage, templated - keys)


def stage_reads(log: Path) -> dict[str, set[str]]:
    command_stage = {"download": "download", "train-clip": "clip", "train": "train", "evaluate": "evaluate", "register": "register"}
    reads: dict[str, set[str]] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        reads.setdefault(command_stage[entry["command"]], set()).update(entry["reads"])
    return reads


def check_reads_are_declared(reads: dict[str, set[str]]) -> None:
    """What each stage read while it ran is in its params: (or templated into it): dvc.yaml cannot drift from the code."""
    for stage, keys in reads.items():
        params, templated = declared(stage)
        missing = sorted(k for k in keys if not covered(k, params) and k not in templated)
        assert not missing, f"stage {stage} reads {missing}, which dvc.yaml's {stage} stage does not list under params:"


def would_run(project: Path, key: str, value) -> list[str]:
    """The stages `dvc repro` would run after params.yaml's ``key`` changes (params.yaml restored after)."""
    params = project / "params.yaml"
    before = params.read_text()
    tree = yaml.safe_load(before)
    section, name = key.split(".")
    tree[section][name] = value
    params.write_text(yaml.safe_dump(tree, sort_keys=False))
    try:
        status = dvc(project, "status")
        dry = dvc(project, "repro", "--dry", "--force-downstream")
    finally:
        params.write_text(before)
    changed = [s for s in STAGES if re.search(rf"^{s}:", status, re.M)]
    assert len(changed) == 1, f"{key}: dvc status names {changed}, expected only the stage that reads it first"
    return re.findall(r"Running stage '(\w+)'", dry)


@pytest.mark.slow
def test_dvc_repro_runs_the_demo_into_one_mlflow_run_then_noop_then_an_experiment(tmp_path):
    from mlflow import MlflowClient

    # the demo's two CLIP attempts (the other tiny projects train one): a one-epoch CLIP is weak, so the stage retries
    tiny_project = make_tiny_project(tmp_path / "project", {"clip_pretrain.attempts": 2})

    subprocess.run([venv_bin("galip"), "demo-data"], cwd=tiny_project, check=True, capture_output=True)
    reads_log = tiny_project / "reads.jsonl"
    out = dvc(tiny_project, "repro", GALIP_RECORD_CONFIG_READS=str(reads_log))
    assert re.findall(r"Running stage '(\w+)'", out) == list(STAGES)
    check_reads_are_declared(stage_reads(reads_log))

    metrics = json.loads((tiny_project / "runs/demo/eval/metrics.json").read_text())
    assert {"prompt_fidelity", "prompt_fidelity_held_in_attr_mean", "prompt_fidelity_held_out_all_attrs", "clip_score_train"} <= set(metrics)
    # the demo's evaluation CLIP has random weights: nothing computed from it is reported
    assert not {"r_precision", "fd_clip", "clip_score_eval", "clip_cosine_eval"} & set(metrics)
    clip_report = json.loads((tiny_project / "runs/demo/clip/report.json").read_text())
    assert 0 <= clip_report["separation"]["held_out"]["image_text"]["position"] <= 100
    # a one-epoch CLIP separates little: the stage trains again with the next seed and keeps the better run
    tries = clip_report["attempts"]
    assert [t["seed"] for t in tries] == [0, 1][: len(tries)]
    assert len(tries) == 2 or tries[0]["held_in_image_text"]["min"] >= 75
    assert clip_report["seed"] in (0, 1) and clip_report["separation"]["held_in"]["image_text"]["min"] == max(
        t["held_in_image_text"]["min"] for t in tries)
    assert sorted(p.name for p in (tiny_project / "runs/demo/clip").iterdir()) == ["galip-tiny.pt", "open_clip_train.log", "report.json"]
    # open_clip_train stepped with the fused AdamW (clip_pretrain._fused_adamw), not torch's for-loop CPU default
    assert "fused: True" in (tiny_project / "runs/demo/clip/open_clip_train.log").read_text()
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())["stages"]
    assert lock["train"]["params"]["params.yaml"]["train"]["max_steps"] == 6
    manifest_out = {o["path"]: o for o in lock["download"]["outs"]}["data/demo/manifest.json"]

    # one MLflow run holds every stage's record, and the model registered from it
    client = MlflowClient(f"sqlite:///{tiny_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("galip")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["galip.stages"] == ",".join(STAGES) and run.info.status == "FINISHED"
    assert run.data.tags["data.manifest_md5"] == manifest_out["md5"], "the run names the data version dvc.lock records"
    assert {"prompt_fidelity", "loss_g"} <= set(run.data.metrics) and not any("/" in k and not k.startswith("train_eval/") for k in run.data.metrics)
    assert {"data.successes", "clip.held_in_min_separation"} <= set(run.data.tags), "data and CLIP summaries are tags"
    assert run.inputs.dataset_inputs[0].dataset.digest == run.data.tags["data.manifest_hash"]
    version = client.get_model_version("galip", "1")
    assert version.run_id == run.info.run_id and version.tags["data.manifest_md5"] == manifest_out["md5"]
    assert version.tags["data.shards_dir"] == run.data.tags["data.shards_dir"] and "data.url_list" not in version.tags, "the data version, not every data.* config tag"

    assert "Running stage" not in dvc(tiny_project, "repro")

    # a key the demo profile sets (its own lr_g): the experiment re-trains with it, the data and CLIP stay
    exp = dvc(tiny_project, "exp", "run", "-S", "train.lr_g=0.0003")
    assert re.findall(r"Running stage '(\w+)'", exp) == ["train", "evaluate", "register"]
    assert yaml.safe_load((tiny_project / "runs/demo/config.yaml").read_text())["train"]["lr_g"] == pytest.approx(3e-4)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and runs[0].data.tags["train.lr_g"] == "0.0003" and runs[0].data.params == runs[1].data.params == {}
    # the run the train stage opened got the upstream records too: the same lineage as the first
    assert runs[0].data.tags["data.manifest_md5"] == manifest_out["md5"] and runs[0].inputs.dataset_inputs
    assert set(run_config_tags(client, runs[0])) == set(run_config_tags(client, runs[1])), "the same config tags"

    # changing a key makes the stage that reads it and its downstream stale, no other
    for key, value, stages in [
        ("data.processes", 1, STAGES),
        ("clip_pretrain.epochs", 2, STAGES[1:]),
        ("train.sim_w", 2.0, STAGES[2:]),
        ("eval.grid_n", 3, STAGES[3:]),
        ("mlflow.gate_bar", 5.0, STAGES[4:]),
    ]:
        assert would_run(tiny_project, key, value) == list(stages), key
