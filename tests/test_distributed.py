"""Real torchrun runs with 2 CPU processes (gloo): replicas stay identical, data is split, restarts resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from galip.train.checkpoint import load_checkpoint

from helpers import write_shards

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        # torchrun 2.x restarts reliably on CPU only without the shared rendezvous TCP store
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    )
    return env


def _train_cmd(tmp: Path, shards: Path, *extra: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        f"--max-restarts={restarts}", "-m", "galip", "train", "--profile", "demo", "--resume",
        "-S", f"data.shards_dir={shards}", "-S", "data.workers=0", "-S", "data.shuffle_buffer=8",
        "-S", f"train.out_dir={tmp}", "-S", "train.batch_size=2", "-S", "train.sample_every=1000",
        "-S", "train.log_every=1", "-S", "train.keep_checkpoints=20",
        "-S", "model.ngf=8", "-S", "model.ndf=8", "-S", "model.code_channels=8",
        "-S", "model.code_mid_channels=8", "-S", "model.mapper_blocks=1", "-S", "train.eval_every=0", *extra,
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # unique captions so the split test can tell samples apart
    return write_shards(tmp_path_factory.mktemp("dshards"), n_samples=32, per_shard=8, unique=True)


def test_two_processes_keep_identical_replicas(tmp_path, shards):
    proc = subprocess.run(_train_cmd(tmp_path, shards, "-S", "train.max_steps=3", "-S", "train.ckpt_every=3"),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = load_checkpoint(tmp_path / "checkpoints/ckpt_00000003.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["noise_rng"]) == 2
    sums = ckpt["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert ckpt["noise_rng"][0].tolist() != ckpt["noise_rng"][1].tolist()  # per-rank noise streams


def test_ranks_see_disjoint_data(tmp_path, shards):
    out = tmp_path / "seen.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(TESTS / "dist_probe.py"), str(tmp_path), str(shards), str(out), "4"]  # 4 batches of 4: one pass of 16 per rank
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen0, seen1 = json.loads(out.read_text())
    assert len(seen0) == len(set(seen0)) == 16 and len(seen1) == len(set(seen1)) == 16  # each once
    assert not set(seen0) & set(seen1)  # disjoint ...
    assert len(set(seen0) | set(seen1)) == 32  # ... and together they cover the data set


def _worker_pids(parent: psutil.Process) -> list[psutil.Process]:
    return [p for p in parent.children(recursive=True) if "galip train" in " ".join(p.cmdline())]


def test_killed_worker_restarts_and_resumes_to_the_same_weights(tmp_path, shards):
    common = ("-S", "train.max_steps=10", "-S", "train.ckpt_every=2")
    straight = subprocess.run(_train_cmd(tmp_path / "straight", shards, *common), env=_env(),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-4000:]

    run_dir = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_train_cmd(run_dir, shards, *common, restarts=2), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        first = run_dir / "checkpoints/ckpt_00000002.pt"
        deadline = time.time() + 240
        while not first.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert first.exists(), "no checkpoint appeared"
        assert not (run_dir / "checkpoints/ckpt_00000010.pt").exists(), "run finished before the kill"
        victim = _worker_pids(psutil.Process(proc.pid))[-1]
        os.kill(victim.pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "killed.log").read_text()
    assert "exitcode: -9" in text, text[-3000:]  # torchrun saw the kill and restarted the group
    a = load_checkpoint(tmp_path / "straight/checkpoints/ckpt_00000010.pt")
    b = load_checkpoint(run_dir / "checkpoints/ckpt_00000010.pt")
    for name in ("netG", "netD", "netC"):
        for k in a[name]:
            assert (a[name][k] == b[name][k]).all(), f"{name}.{k} differs after restart"
