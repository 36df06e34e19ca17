"""DVC: the repository's configuration, dvc.yaml's stage commands, data.dvc reproducibility, and an S3 push/pull
round trip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from configobj import ConfigObj

from galip.telemetry import TELEMETRY_OFF

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def _run(cmd: list[str], cwd: Path, **env: str) -> str:
    full_env = {**os.environ, **TELEMETRY_OFF, "DVC": DVC, **env}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_repository_dvc_config_is_offline_and_local():
    cfg = ConfigObj(str(REPO / ".dvc/config"))  # the parser DVC itself uses
    assert cfg["core"]["analytics"] == "false" and cfg["core"]["check_update"] == "false"
    assert cfg["core"]["remote"] == "local"
    assert cfg['remote "local"']["url"] == "../.dvcstore"


@pytest.mark.slow
def test_data_dvc_matches_a_regenerated_demo_source_and_round_trips_over_s3(tmp_path, s3_bucket):
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path)
    if not (clone / "data.dvc").exists():
        pytest.fail("data.dvc is not committed")
    _run([sys.executable, "-m", "galip", "demo-data", "--profile", "demo"], clone)
    # commit re-hashes the workspace into data.dvc: identical bytes leave the file unchanged
    _run([DVC, "commit", "-f", "-q", "data.dvc"], clone)
    _run(["git", "diff", "--exit-code", "data.dvc"], clone)
    assert "up to date" in _run([DVC, "status", "data.dvc"], clone)

    # the project's own tracked data through an S3 remote configured from the environment
    endpoint, bucket = s3_bucket
    _run([str(REPO / "scripts/dvc-remote-s3.sh")], clone, GALIP_DVC_BUCKET=bucket, GALIP_DVC_PREFIX="p", AWS_ENDPOINT_URL=endpoint)
    _run([DVC, "push", "-q", "data.dvc"], clone)
    source = clone / "data/demo/source"
    before = {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    shutil.rmtree(source)
    shutil.rmtree(clone / ".dvc/cache")
    _run([DVC, "pull", "-q", "data.dvc"], clone)
    assert "up to date" in _run([DVC, "status", "data.dvc"], clone)
    assert {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_push_then_pull_into_an_empty_cache_round_trips_over_s3(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    repo = tmp_path / "repo"
    (repo / "data/lists").mkdir(parents=True)
    (repo / "data/lists/cc12m-sample.tsv").write_text("http://127.0.0.1:1/a.jpg\ta caption\n" * 50)
    (repo / "data/lists/extra.bin").write_bytes(os.urandom(4096))
    _run(["git", "init", "-q"], repo)
    _run([DVC, "init", "-q"], repo)
    _run([DVC, "config", "core.analytics", "false"], repo)
    _run([str(REPO / "scripts/dvc-remote-s3.sh"), bucket, "galip/dvc", endpoint], repo)
    _run([DVC, "add", "-q", "data/lists"], repo)
    _run([DVC, "push", "-q"], repo)
    originals = {p.name: p.read_bytes() for p in (repo / "data/lists").iterdir()}

    import boto3

    stored = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix="galip/dvc/")
    assert stored["KeyCount"] >= 3  # two files + the directory listing object

    shutil.rmtree(repo / "data/lists")
    shutil.rmtree(repo / ".dvc/cache")
    _run([DVC, "pull", "-q"], repo)
    assert {p.name: p.read_bytes() for p in (repo / "data/lists").iterdir()} == originals
