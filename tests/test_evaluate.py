"""`galip evaluate` end to end on real tiny models: a checkpoint written by the Trainer, real shards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from galip.cli import main
from galip.config import load_config
from galip.train.distributed import DistEnv
from galip.eval.evaluate import load_eval_generator, run
from galip.eval.metrics.fid import INCEPTION_FILE, INCEPTION_URL
from galip.train.trainer import Trainer

from helpers import eval_clip_checkpoint, write_shards

TESTS = Path(__file__).parent
CORE_KEYS = {"fd_clip", "clip_score_train", "clip_score_eval", "clip_cosine_train", "clip_cosine_eval", "r_precision"}


def eval_clip_file(shards: Path) -> Path:
    """A fixed evaluation CLIP checkpoint beside the shards (the `shards` fixture writes it): metrics from a
    CLIP with random weights are not computed, a checkpoint file's are."""
    return shards.parent / "eval_clip.pt"


def overrides(tmp: Path, shards: Path, *extra: str) -> list[str]:
    """The demo profile shrunk to seconds; evaluation of 16 samples on CPU."""
    return [
        f"data.shards_dir={shards}",
        f"eval.eval_clip_pretrained={eval_clip_file(shards)}",
        f"train.out_dir={tmp / 'run'}",
        "model.ngf=8",
        "model.ndf=8",
        "model.code_channels=8",
        "model.code_mid_channels=8",
        "model.mapper_blocks=1",
        f"eval.out_dir={tmp / 'run' / 'eval'}",
        f"eval.ref_stats_dir={tmp / 'ref_stats'}",
        "eval.device=cpu",
        "eval.prompt_source=reference",
        "eval.n_samples=16",
        "eval.batch_size=8",
        "eval.grid_n=3",
        "eval.metrics=[fd_clip, clip_score, r_precision]",
        *extra,
    ]


def cli_args(opts: list[str]) -> list[str]:
    return ["evaluate", "--profile", "demo", *[a for o in opts for a in ("-S", o)]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = write_shards(tmp_path_factory.mktemp("data") / "shards", n_samples=40, per_shard=10)
    eval_clip_checkpoint(eval_clip_file(out))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """An untrained generator saved by the Trainer itself (the real checkpoint payload)."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = load_config("params.yaml", overrides(tmp, shards), profile="demo")
    trainer = Trainer.create(cfg, DistEnv())
    ckpt = trainer.save(Path(cfg.train.out_dir) / "checkpoints")
    return tmp, cfg, ckpt, trainer.clip.state_dict()


def test_cli_writes_metrics_and_grid_and_reuses_reference_stats(trained, shards, capsys):
    tmp, cfg, ckpt, _ = trained
    opts = overrides(tmp, shards)
    assert main(cli_args(opts)) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = Path(cfg.eval.out_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == printed
    assert set(saved) == CORE_KEYS | {"protocol"}
    assert all(isinstance(saved[k], float) and math.isfinite(saved[k]) for k in CORE_KEYS)
    assert saved["fd_clip"] > 0
    assert 0 <= saved["clip_score_train"] <= 100 and -1 <= saved["clip_cosine_train"] <= 1
    assert saved["clip_score_train"] >= 100 * saved["clip_cosine_train"] - 1e-4  # max(cos, 0) >= cos
    assert 0 <= saved["r_precision"] <= 100

    p = saved["protocol"]
    assert p["checkpoint"] == str(ckpt) and p["step"] == 0 and p["n_samples"] == 16 and p["resolution"] == 64
    assert p["train_clip"].startswith("galip-tiny/random init") and p["eval_clip"] == f"galip-tiny/{eval_clip_file(shards)}"
    fd = p["metrics"]["fd_clip"]
    assert fd["generated_images"] == 16 and fd["reference_images"] == 16 and fd["cache_hit"] is False
    assert fd["reference_set"]["shards"] == 4 and "galip-tiny" in fd["feature_extractor"]
    assert Path(fd["reference_stats"]).is_file() and Path(fd["reference_stats"]).parent == tmp / "ref_stats"
    assert p["metrics"]["r_precision"]["candidates"] >= 2

    with Image.open(out / "samples.png") as grid:  # prompt text + 3 columns, one row of 64 px per fixed prompt (+ padding)
        assert grid.size[0] > 3 * 64 + 120 and grid.size[1] == len(cfg.train.sample_prompts) * 66 + 2

    assert main(cli_args(opts)) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["protocol"]["metrics"]["fd_clip"]["cache_hit"] is True
    assert again["fd_clip"] == pytest.approx(saved["fd_clip"], rel=1e-9)
    # a different resolution is a different reference set: no stale cache hit
    assert main(cli_args(opts + ["eval.ref_samples=12"])) == 0
    third = json.loads((out / "metrics.json").read_text())["protocol"]["metrics"]["fd_clip"]
    assert third["cache_hit"] is False and third["reference_images"] == 12


def test_a_random_evaluation_clip_gives_no_numbers(trained, shards, caplog):
    """fd_clip, r_precision and the *_eval CLIP scores from a network with random weights would look like
    results and mean nothing: they are left out, and one log line says so."""
    tmp, _, ckpt, _ = trained
    opts = overrides(tmp, shards, "eval.eval_clip_pretrained=", "eval.metrics=[fd_clip, clip_score, r_precision, prompt_fidelity]",
                     "eval.prompt_source=demo")
    with caplog.at_level("WARNING", logger="galip.evaluate"):
        result = run(load_config("params.yaml", opts, profile="demo"), ckpt)
    saved = json.loads((tmp / "run" / "eval" / "metrics.json").read_text())
    assert saved == result
    assert {"clip_score_train", "clip_cosine_train", "prompt_fidelity"} <= set(saved)
    assert not {k for k in saved if k.endswith("_eval")} and "fd_clip" not in saved and "r_precision" not in saved
    assert saved["protocol"]["metrics"]["clip_score"]["eval_clip"] == "not used: random weights"
    lines = [r.getMessage() for r in caplog.records if "not computed" in r.getMessage()]
    assert len(lines) == 1 and "clip_score_eval, clip_cosine_eval" in lines[0] and "eval.eval_clip_pretrained" in lines[0]


def test_numbers_do_not_depend_on_batch_size(trained, shards):
    tmp, _, ckpt, _ = trained
    a = run(load_config("params.yaml", overrides(tmp, shards, "eval.batch_size=16"), profile="demo"), ckpt)
    b = run(load_config("params.yaml", overrides(tmp, shards, "eval.batch_size=5"), profile="demo"), ckpt)
    for key in CORE_KEYS:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key


def test_generator_is_scored_with_the_clip_it_was_trained_with(trained):
    _, _, ckpt, train_clip_state = trained
    _, clip, ckpt_cfg, step = load_eval_generator(ckpt, torch.device("cpu"))
    assert step == 0 and ckpt_cfg.model.clip_model == "galip-tiny"
    state = clip.state_dict()
    assert state.keys() == train_clip_state.keys()
    assert all(torch.equal(state[k], train_clip_state[k]) for k in state)


def test_fid_without_inception_weights_is_a_clear_error(trained, shards, tmp_path, monkeypatch, capsys, no_network):
    tmp, _, _, _ = trained
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    out = tmp_path / "out"
    rc = main(cli_args(overrides(tmp, shards, "eval.metrics=[fid, fd_clip]", f"eval.out_dir={out}")))
    err = capsys.readouterr().err
    assert rc == 2
    assert INCEPTION_FILE in err and INCEPTION_URL in err and "eval.inception_weights" in err
    assert not (out / "metrics.json").exists()
    assert no_network == []


def test_input_errors_name_what_to_fix(trained, shards, tmp_path, capsys):
    tmp, _, _, _ = trained
    assert main(cli_args(overrides(tmp, shards, "eval.metrics=[fid, is]"))) == 2
    assert "unknown metric(s) ['is']" in capsys.readouterr().err
    assert main(cli_args(overrides(tmp, shards, f"train.out_dir={tmp_path}"))) == 2
    assert f"no checkpoint in {tmp_path / 'checkpoints'}" in capsys.readouterr().err
    assert main(cli_args(overrides(tmp, shards, f"eval.ref_shards={tmp_path}"))) == 2
    assert "eval.ref_shards" in capsys.readouterr().err
    assert main([*cli_args(overrides(tmp, shards)), "--dry-run"]) == 0
    assert "n_samples: 16" in capsys.readouterr().out


@pytest.mark.slow
def test_fid_with_staged_weights_runs_offline(trained, shards, torch_home_with_inception, no_network):
    tmp, _, ckpt, _ = trained
    cfg = load_config("params.yaml", overrides(tmp, shards, "eval.metrics=[fid]", "eval.n_samples=6"), profile="demo")
    result = run(cfg, ckpt)
    assert set(result) == {"fid", "protocol"} and math.isfinite(result["fid"]) and result["fid"] >= 0
    proto = result["protocol"]["metrics"]["fid"]
    assert "inception-v3-compat" in proto["feature_extractor"] and proto["weights"] == INCEPTION_FILE
    assert proto["generated_images"] == 6 and proto["resolution"] == 64
    assert no_network == []


@pytest.mark.slow
def test_two_ranks_give_the_single_process_numbers(trained, shards, tmp_path):
    tmp, _, ckpt, _ = trained
    single = run(load_config("params.yaml", overrides(tmp, shards), profile="demo"), ckpt)
    out = tmp_path / "dist"
    opts = overrides(tmp, shards, f"eval.out_dir={out}", f"eval.ref_stats_dir={tmp_path / 'dist_ref'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "galip", "evaluate", "--checkpoint", str(ckpt), "--profile", "demo", *[a for o in opts for a in ("-S", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dist = json.loads((out / "metrics.json").read_text())
    assert dist["protocol"]["world_size"] == 2
    assert dist["protocol"]["metrics"]["fd_clip"]["generated_images"] == 16
    for key in CORE_KEYS:
        assert dist[key] == pytest.approx(single[key], rel=1e-4, abs=1e-4), key


def test_demo_prompts_score_prompt_fidelity_per_split(trained, shards):
    from galip.eval.metrics.prompt_fidelity import result_keys, summary_score

    tmp, _, ckpt, _ = trained
    opts = overrides(tmp, shards, "eval.prompt_source=demo", "eval.metrics=[prompt_fidelity, r_precision]")
    result = run(load_config("params.yaml", opts, profile="demo"), ckpt)
    assert set(result_keys()) | {"r_precision", "protocol"} == set(result)
    assert {"prompt_fidelity_held_in_position", "prompt_fidelity_held_out_shape"} <= set(result)
    assert all(0 <= result[k] <= 100 for k in result_keys())
    assert result["prompt_fidelity"] == pytest.approx(summary_score(result))
    # an untrained generator does not draw the prompted scenes
    assert result["prompt_fidelity"] < 50
    proto = result["protocol"]["metrics"]["prompt_fidelity"]
    assert min(proto["decoder_accuracy_on_renders"].values()) >= 0.95
