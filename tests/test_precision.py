"""The GPU recipe's CPU-checkable parts: one bf16 train step vs fp32, low-precision CLIP weights, the fp16
scaler floor, the compiled step, exact resume with persistent loader workers, the device script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from galip.train.checkpoint import load_checkpoint
from galip.train.distributed import DistEnv
from galip.model.precision import FP16_GROWTH_INTERVAL, Precision, apply_scale_floor
from galip.train.trainer import Trainer, run

from helpers import assert_bitwise_equal, tiny_config, write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


# bf16 keeps 8 significant bits: each rounding moves a value by at most U = 2**-8 of itself.
U = 2.0**-8
# A forward + backward through these nets rounds at every matmul and convolution, but errors of
# independent roundings mostly cancel: across train.seed 1-8 and 100 the largest gaps were 3 U
# (losses of order 1, G's gradient norm) and 2.4 U (the MA-GP norm). K rounding steps is the bound.
K = 8


def _one_step(cfg) -> tuple[dict[str, float], dict[str, float]]:
    """Losses and gradient norms of one train step on fixed inputs and fixed (seeded) weights.

    Learning rates of 1e-12 keep D unchanged by its update (Adam moves each weight by at most lr),
    so G's gradients are taken at the same D in both precisions: nothing chaotic is compared.
    """
    trainer = Trainer.create(cfg, DistEnv())
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64, generator=gen) * 2 - 1
    tokens = trainer.clip.tokenize([f"a {c} square on the {s}" for c, s in
                                    [("red", "left"), ("blue", "right"), ("green", "left"), ("yellow", "right")]])
    trainer.train_step([(images, tokens)])
    # After the step, D and C hold the D phase's gradients and G the G phase's (each phase clears its own).
    norms = {name: torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])).item()
             for name, net in (("G", trainer.net_g), ("D", trainer.net_d), ("C", trainer.net_c))}
    return trainer.read_stats(), norms


def test_bf16_step_matches_fp32_within_bf16_rounding(tmp_path, shards):
    """One D and G step, bf16 autocast + bf16 CLIP weights vs fp32, same weights and inputs.

    Bounds in units of bf16's rounding step U: quantities of order 1 (logits, the cosine, the hinge
    and the G loss) within K*U absolute; gradient norms within K*U relative. MA-GP raises a gradient
    norm to the power magp_p, which multiplies its relative error by magp_p: its p-th root is held to
    K*U, and D/C gradients (which MA-GP's term dominates) to magp_p*K*U.
    """
    extra = ("train.lr_g=1e-12", "train.lr_d=1e-12", "train.ema_decay=0")
    cfg32 = tiny_config(tmp_path, shards, "train.precision=fp32", *extra)
    (s32, g32), (s16, g16) = _one_step(cfg32), _one_step(tiny_config(tmp_path, shards, "train.precision=bf16", *extra))
    for key in ("loss_g", "d_real", "d_fake", "d_mis", "clip_sim"):
        assert s16[key] == pytest.approx(s32[key], abs=K * U), key
    p = cfg32.train.magp_p
    assert s32["magp"] > 0 and (s16["magp"] / s32["magp"]) ** (1 / p) == pytest.approx(1, abs=K * U)
    hinge32, hinge16 = s32["loss_d"] - s32["magp"], s16["loss_d"] - s16["magp"]
    assert hinge16 == pytest.approx(hinge32, abs=K * U)
    assert g16["G"] == pytest.approx(g32["G"], rel=K * U)
    for net in ("D", "C"):
        assert g16[net] == pytest.approx(g32[net], rel=p * K * U), net
    # and bf16 really ran in bf16: the losses differ from fp32's
    assert s16["loss_g"] != s32["loss_g"] and s16["loss_d"] != s32["loss_d"]


def test_clip_weights_are_cast_once_layernorm_stays_fp32(tmp_path, shards):
    cfg = tiny_config(tmp_path, shards, "train.precision=bf16")
    trainer = Trainer.create(cfg, DistEnv())
    visual = trainer.clip.visual
    block = visual.transformer.resblocks[0]
    assert block.attn.in_proj_weight.dtype == torch.bfloat16
    assert block.mlp.c_fc.weight.dtype == torch.bfloat16
    assert block.ln_1.weight.dtype == torch.float32 and visual.ln_post.weight.dtype == torch.float32
    # the trainable nets stay fp32 (autocast computes in bf16, the optimiser updates fp32 masters)
    assert all(p.dtype == torch.float32 for p in trainer.net_g.parameters())
    # entry points work with or without an enclosing autocast
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    feats, emb = trainer.clip.image_features(images)
    ref = Trainer.create(tiny_config(tmp_path, shards, "train.precision=fp32"), DistEnv()).clip
    ref_feats, ref_emb = ref.image_features(images)
    assert torch.nn.functional.cosine_similarity(emb.float(), ref_emb, dim=-1).min() > 0.99
    assert (feats.float() - ref_feats).norm() / ref_feats.norm() < 0.05


def test_fp16_scaler_follows_the_reference():
    scaler = Precision("fp16", "cpu").grad_scaler()
    assert scaler.is_enabled() and scaler.get_growth_interval() == FP16_GROWTH_INTERVAL == 2000
    scaler.scale(torch.ones(()))  # materialises the scale tensor
    for below in (63.0, 1.0, 2.0**-10):
        scaler.update(below)
        apply_scale_floor(scaler)
        assert scaler.get_scale() == 16384.0
    for kept in (64.0, 128.0, 65536.0):
        scaler.update(kept)
        apply_scale_floor(scaler)
        assert scaler.get_scale() == kept
    disabled = Precision("bf16", "cpu").grad_scaler()
    apply_scale_floor(disabled)  # a no-op, no error
    assert not disabled.is_enabled()


def test_fp16_step_applies_the_floor_and_skips_overflow(tmp_path, shards):
    trainer = Trainer.create(tiny_config(tmp_path, shards, "train.precision=fp16"), DistEnv())
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    tokens = trainer.clip.tokenize(["a red square on the left"] * 4)
    trainer.scaler_d.scale(torch.ones(()))
    trainer.scaler_d.update(8.0)  # as if a burst of overflows had pushed it down
    trainer.train_step([(images, tokens)])
    assert trainer.scaler_d.get_scale() == 16384.0
    trainer.check_finite()  # a skipped fp16 overflow step is not an error


def test_precision_resolution():
    assert Precision.resolve("auto", torch.device("cpu")).name == "fp32"
    assert Precision.resolve("bf16", torch.device("cpu")).dtype == torch.bfloat16
    assert Precision.resolve("fp16", torch.device("cpu")).use_scaler
    with pytest.raises(ValueError, match="train.precision"):
        Precision.resolve("fp8", torch.device("cpu"))


def _state(path):
    ckpt = load_checkpoint(path)
    return {k: ckpt[k] for k in ("netG", "netD", "netC", "netG_ema", "optG", "optD")}


@pytest.mark.slow
def test_resume_is_exact_with_persistent_workers_from_any_step(tmp_path, shards):
    """Two DataLoader workers that live across checkpoint segments; the run is stopped at step 3
    (not a checkpoint boundary: ckpt_every=2) and resumed to 5: weights, EMA and optimisers equal the
    straight run's bit for bit."""
    extra = ("data.workers=2", "train.ckpt_every=2", "train.max_steps=5", "train.ema_decay=0.9")
    straight = tiny_config(tmp_path / "a", shards, *extra)
    assert run(straight)["step"] == 5
    split = tiny_config(tmp_path / "b", shards, *extra)
    assert run(split, max_steps=3)["step"] == 3
    assert run(split, resume=True)["step"] == 5
    assert_bitwise_equal(_state(tmp_path / "a/run/checkpoints/ckpt_00000005.pt"), _state(tmp_path / "b/run/checkpoints/ckpt_00000005.pt"))


@pytest.mark.slow
def test_compiled_train_step_runs_on_cpu(tmp_path, shards):
    """train.compile: G, the fake path of D/C and the CLIP image pass under torch.compile (inductor
    builds C++ kernels with the system compiler); the MA-GP path stays eager (double backward)."""
    cfg = tiny_config(tmp_path, shards, "train.compile=true", "model.mapper_blocks=1")
    trainer = Trainer.create(cfg, DistEnv())
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    tokens = trainer.clip.tokenize(["a red square on the left"] * 4)
    before = [p.detach().clone() for p in trainer.net_g.parameters()]
    trainer.train_step([(images, tokens)])
    trainer.check_finite()
    stats = trainer.read_stats()
    assert all(v == v for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.net_g.parameters()))


@pytest.mark.slow
def test_device_script_runs_its_cpu_parts(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    rc = gpu_check.main(["--device", "cpu", "--quick", "--results-dir", str(tmp_path), "--budget", "900"])
    (result,) = tmp_path.glob("gpu_cpu_*_quick.json")
    data = json.loads(result.read_text())
    failed = {k: v.get("error") for k, v in data["sections"].items() if not v.get("ok")}
    assert rc == 0 and not failed, failed
    secs = data["sections"]
    assert {"env", "correctness", "train_fp32", "train_bf16", "generate", "ddp_1", "loader", "flops"} <= set(secs)
    assert secs["flops"]["flops_per_iter"] > 0 and secs["loader"]["cpus"] >= 1
    assert secs["ddp_1"]["checkpoints"][-1] == "ckpt_00000006.pt"


def test_readme_speed_tables_match_the_result_files():
    """bench/README.md's numbers are rendered from bench/results by bench/speed_table.py, never typed in."""
    sys.path.insert(0, str(ROOT / "bench"))
    import speed_table

    assert speed_table.main(["--check"]) == 0, "run: python bench/speed_table.py"


def test_readme_demo_sweep_table_matches_the_result_files():
    sys.path.insert(0, str(ROOT / "bench"))
    import demo_sweep

    assert demo_sweep.main(["--table", "--check"]) == 0, "run: python bench/demo_sweep.py --table"


def test_readme_demo_results_match_the_result_files():
    """The measured make demo in README.md, bench/README.md and docs/data.md is rendered from its files."""
    sys.path.insert(0, str(ROOT / "bench"))
    import demo_results

    assert demo_results.main(["--check"]) == 0, "run: python bench/demo_results.py"


def test_readme_vs_reference_table_matches_the_result_file():
    sys.path.insert(0, str(ROOT / "bench"))
    import vs_reference

    assert vs_reference.main(["--table", "--check-table"]) == 0, "run: python bench/vs_reference.py --table"


def test_suite_time_table_matches_the_result_file_and_reads_a_pytest_log():
    sys.path.insert(0, str(ROOT / "bench"))
    import suite_time

    assert suite_time.main(["--check"]) == 0, "run: python bench/suite_time.py"
    log = """============================= slowest 15 durations =============================
283.30s call     tests/test_train.py::test_demo_recipe_learns_colour
201.03s setup    tests/test_production.py::test_cc12m
================= 324 passed, 1 failed, 17 warnings in 916.77s (0:15:16) =================
====================== 1 passed, 325 deselected in 31.60s ======================"""
    row = suite_time.parse_log(log)
    assert row["passed"] == 325 and row["failed"] == 1 and row["suite_s"] == [916.77, 31.6]
    assert row["slowest"][1] == [201.03, "setup", "test_production.py::test_cc12m"]


@pytest.mark.slow
def test_demo_sweep_runs_variants_side_by_side(tmp_path, shards):
    """bench/demo_sweep.py: real training processes, one per variant, each evaluated in training; the
    report and bundle hold every evaluation row and the newest sample grid."""
    import subprocess
    import tarfile

    tiny = ",".join(["data.workers=0", "data.shuffle_buffer=8", "train.batch_size=4", "model.ngf=8", "model.ndf=8",
                     "model.code_channels=8", "model.code_mid_channels=8", "model.mapper_blocks=1"])
    out = tmp_path / "sweep"
    cmd = [sys.executable, "bench/demo_sweep.py", "--clip", "", "--shards", str(shards), "--out", str(out),
           "--device", "cpu", "--max-steps", "4", "--eval-every", "2", "--eval-samples", "8", "--sample-every", "2",
           "--threads", "1", "--deadline-s", "400", "--bundle", str(tmp_path / "b.tar.gz"),
           "--variant", f"a:{tiny}", "--variant", f"b:{tiny},model.feature_blocks=[0,2],train.lr_g=0.0003"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "sweep.json").read_text())
    assert report["variants"]["b"]["overrides"][-2:] == ["model.feature_blocks=[0,2]", "train.lr_g=0.0003"]
    for name, v in report["variants"].items():
        assert v["exit_code"] == 0 and v["steps"] == 4, (name, v)
        assert [r["step"] for r in v["eval"]] == [2, 4]
        assert {"prompt_fidelity", "held_in_shape", "held_out", "held_out_count"} <= set(v["eval"][-1])
    import yaml

    resolved = yaml.safe_load((out / "b" / "config.yaml").read_text())
    assert resolved["model"]["feature_blocks"] == [0, 2] and resolved["train"]["lr_g"] == 0.0003
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"sweep.json", "a/eval_log.csv", "a/step_00000004.png", "b/train.log"} <= names
