"""One-call GPU check of the production recipe: correctness, speed and memory, DDP, data loading.

    python bench/gpu_check.py                          # on a GPU machine: ViT-B/32, 224 px, batch 64
    python bench/gpu_check.py --device cpu --quick     # the CPU-checkable parts (the test suite runs this)

Writes bench/results/gpu_<card>_<date>.json (and a copy under --out) and prints a table. CLIP weights
are random (speed does not depend on them). Every section is timed and guarded: one that fails is
recorded with its error and the rest still run; sections past --budget seconds are skipped.

Sections: env (card, driver, torch, CUDA, measured bf16 matmul peak); correctness (losses of the same
20 steps from the same seed and batch in fp32 vs bf16 vs fp16); train (img/s and peak memory per
recipe: fp32, the reference's recipe = fp16 autocast + fp16 CLIP + GradScaler + unfused Adam, bf16,
bf16 + torch.compile); flops (one iteration counted by torch.utils.flop_counter
-> achieved TFLOP/s vs the card's peak); generate (img/s at batch 256 through the serving path);
ddp (torchrun smoke runs over NCCL, 1 process and 2 if there are 2+ GPUs); loader (the training
stream's img/s at 224 px with the machine's cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from galip.model.clip import FrozenCLIP, clip_from_config  # noqa: E402
from galip.config import Config, load_config  # noqa: E402
from galip.train.distributed import DistEnv  # noqa: E402
from galip.train.trainer import STAT_NAMES, Trainer  # noqa: E402

# Dense (no sparsity) datasheet peaks, TFLOP/s, for the cards this project is benchmarked on.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


# --- plumbing ----------------------------------------------------------------------------------------
class Report:
    def __init__(self, budget_s: float, paths: list[Path]) -> None:
        self.t0, self.budget, self.paths = time.perf_counter(), budget_s, paths
        self.data: dict[str, Any] = {"sections": {}}

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.budget:
            self.data["sections"][name] = {"skipped": f"time budget spent ({elapsed:.0f} s > {self.budget:.0f} s)"}
            print(f"[{name}] skipped: budget spent", flush=True)
            return
        print(f"[{name}] ...", flush=True)
        t = time.perf_counter()
        try:
            out = fn()
            status = {"ok": True, **(out or {})}
        except Exception as exc:  # noqa: BLE001 - record and go on: one failure must not lose the rest
            status = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            print(status["traceback"], flush=True)
        status["section_s"] = round(time.perf_counter() - t, 1)
        self.data["sections"][name] = status
        print(f"[{name}] done in {status['section_s']} s: {json.dumps(_brief(status))[:600]}", flush=True)
        self.save()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def save(self) -> None:
        self.data["total_s"] = round(time.perf_counter() - self.t0, 1)
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(self.data, indent=1) + "\n")


def _brief(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("traceback", "trajectories", "per_step")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """How many times ``fn`` makes the host wait for the GPU (CUDA's sync debug mode warns on each)."""
    if device.type != "cuda":
        return None
    import warnings

    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def card_key(name: str) -> str | None:
    return next((k for k in PEAK_TFLOPS if k in name), None)


# --- configs -------------------------------------------------------------------------------------------
def make_config(args: argparse.Namespace, precision: str, *extra: str) -> Config:
    overrides = [
        "model.clip_pretrained=",
        f"train.device={args.device}",
        f"train.precision={precision}",
        f"train.batch_size={args.batch}",
        *extra,
    ]
    return load_config(str(ROOT / "params.yaml"), overrides, args.profile)


def fresh_clip(cfg: Config, dtype: torch.dtype | None, device: torch.device) -> FrozenCLIP:
    torch.manual_seed(cfg.train.seed)
    return clip_from_config(cfg.model).set_precision(dtype).to(device)


def fixed_batch(cfg: Config, trainer: Trainer, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    size = cfg.data.crop_size
    images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    colours, things = ["red", "green", "blue", "yellow"], ["bird", "car", "house", "tree"]
    prompts = [f"a photo of a {colours[i % 4]} {things[(i // 4) % 4]} number {i}" for i in range(batch)]
    return images, trainer.clip.tokenize(prompts).to(device)


def build_trainer(cfg: Config, device: torch.device, clip: FrozenCLIP | None = None, unfused_adam: bool = False) -> Trainer:
    trainer = Trainer.create(cfg, DistEnv(device=device), clip)
    if unfused_adam:  # the reference's optimiser: torch's default (multi-tensor) Adam, not fused
        t = cfg.train
        trainer.opt_g = torch.optim.Adam(trainer.net_g.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2))
        trainer.opt_d = torch.optim.Adam([*trainer.net_d.parameters(), *trainer.net_c.parameters()], lr=t.lr_d, betas=(t.beta1, t.beta2))
    return trainer


# --- sections ---------------------------------------------------------------------------------------------
def section_env(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(card=props.name, sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = smi.stdout.strip()
            out["driver"] = smi.stdout.split(",")[1].strip() if smi.stdout else None
        except (OSError, subprocess.SubprocessError) as exc:
            out["nvidia_smi"] = f"unavailable: {exc}"
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        t = median(timed(lambda: a @ b, 10, 3, device))
        out["measured_bf16_matmul_tflops"] = round(2 * n**3 / t / 1e12, 1)
        key = card_key(props.name)
        out["datasheet_peak_tflops"] = PEAK_TFLOPS.get(key) if key else None
    else:
        out["card"] = platform.processor() or "cpu"
        out["torch_threads"] = torch.get_num_threads()
    return out


def section_correctness(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The same steps from the same seed and batch in each precision; losses compared with fp32."""
    # CPUs have no fast fp16 kernels (a step is ~5x slower than fp32): fp16 is checked on GPUs only.
    precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]
    traj: dict[str, dict[str, list[float]]] = {}
    batch = min(args.batch, 16)
    for name in precisions:
        # fp32 is the reference: strict fp32 matmuls (no TF32) so the comparison measures bf16/fp16 alone.
        cfg = make_config(args, name, f"train.batch_size={batch}", "train.tf32=false", "train.cudnn_benchmark=false")
        trainer = build_trainer(cfg, device)
        images, tokens = fixed_batch(cfg, trainer, batch, device)
        rows = []
        for _ in range(args.correctness_steps):
            trainer.train_step([(images, tokens)])
            rows.append(trainer.read_stats())
        traj[name] = {k: [round(r[k], 5) for r in rows] for k in ("loss_d", "loss_g", "clip_sim")}
        del trainer
    out: dict[str, Any] = {"steps": args.correctness_steps, "batch": batch, "trajectories": traj}
    for name in precisions[1:]:
        for k in ("loss_d", "loss_g"):
            ref, got = traj["fp32"][k], traj[name][k]
            diffs = [abs(a - b) for a, b in zip(ref, got)]
            out[f"{name}_{k}_max_abs_diff"] = round(max(diffs), 5)
            out[f"{name}_{k}_first_step_abs_diff"] = round(diffs[0], 6)
        out[f"{name}_all_finite"] = all(v == v and abs(v) != float("inf") for k in traj[name] for v in traj[name][k])
    return out


TRAIN_RECIPES = {
    # name: (precision, extra overrides, CLIP weight dtype, unfused Adam)
    "fp32": ("fp32", [], None, False),
    "reference_fp16": ("fp16", [], torch.float16, True),
    "bf16": ("bf16", [], torch.bfloat16, False),
    "bf16_compile": ("bf16", ["train.compile=true"], torch.bfloat16, False),
}


def train_recipe(args: argparse.Namespace, device: torch.device, name: str) -> dict[str, Any]:
    precision, extra, clip_dtype, unfused = TRAIN_RECIPES[name]
    cfg = make_config(args, precision, *extra)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = build_trainer(cfg, device, fresh_clip(cfg, clip_dtype, device), unfused_adam=unfused)
    images, tokens = fixed_batch(cfg, trainer, args.batch, device)
    t_first = time.perf_counter()
    trainer.train_step([(images, tokens)])  # first step: compilation, cuDNN autotuning
    sync(device)
    first_s = time.perf_counter() - t_first
    times = timed(lambda: trainer.train_step([(images, tokens)]), args.iters, args.warmup, device)
    syncs = count_host_syncs(lambda: trainer.train_step([(images, tokens)]), device)
    stats = trainer.read_stats()
    out = {
        "batch": args.batch,
        "sec_per_iter_median": round(median(times), 4),
        "sec_per_iter_min": round(min(times), 4),
        "images_per_s": round(args.batch / median(times), 1),
        "first_step_s": round(first_s, 1),
        "losses_finite": all(v == v and abs(v) != float("inf") for v in stats.values()),
        "host_syncs_per_step": syncs,
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


class _GlobalOnly:
    parents = {"Global"}

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def section_flops(args: argparse.Namespace, device: torch.device, report: Report) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = make_config(args, "bf16" if device.type == "cuda" else "fp32")
    trainer = build_trainer(cfg, device, fresh_clip(cfg, torch.bfloat16 if device.type == "cuda" else None, device))
    images, tokens = fixed_batch(cfg, trainer, args.batch, device)
    trainer.train_step([(images, tokens)])
    counter = FlopCounterMode(display=False)
    # Its per-module attribution hooks every module's backward, which autograd.grad (MA-GP's double
    # backward) rejects; only the global total is needed, so the tracker is replaced by a no-op.
    counter.mod_tracker = _GlobalOnly()
    with counter:
        trainer.train_step([(images, tokens)])
    flops = counter.get_total_flops()
    out: dict[str, Any] = {"flops_per_iter": flops, "tflop_per_iter": round(flops / 1e12, 3), "gflop_per_image": round(flops / args.batch / 1e9, 1)}
    train = report.data["sections"]
    env = train.get("env", {})
    key = card_key(env.get("card", ""))
    for recipe in ("bf16", "bf16_compile", "reference_fp16", "fp32"):
        sec = train.get(f"train_{recipe}", {})
        if sec.get("ok"):
            achieved = flops / sec["sec_per_iter_median"] / 1e12
            out[f"{recipe}_achieved_tflops"] = round(achieved, 1)
            if key:
                peak = PEAK_TFLOPS[key]["tf32" if recipe == "fp32" else "bf16"]
                out[f"{recipe}_mfu_vs_datasheet"] = round(achieved / peak, 3)
            if env.get("measured_bf16_matmul_tflops") and recipe != "fp32":
                out[f"{recipe}_fraction_of_measured_matmul_peak"] = round(achieved / env["measured_bf16_matmul_tflops"], 3)
    return out


def section_generate(args: argparse.Namespace, device: torch.device, compile_g: bool = False) -> dict[str, Any]:
    from galip.eval.generate import generate_images
    from galip.model.models import NetG
    from galip.model.precision import Precision

    precision = Precision.resolve("auto", device)
    cfg = make_config(args, precision.name)
    clip = fresh_clip(cfg, precision.dtype, device)
    net_g = NetG(cfg.model, clip).to(device).eval()
    if compile_g:
        net_g = torch.compile(net_g)
    prompts = [f"a photo of object number {i}" for i in range(args.gen_batch)]
    out: dict[str, Any] = {"batch": args.gen_batch, "precision": precision.name, "compile": compile_g}
    t = time.perf_counter()
    generate_images(net_g, clip, prompts, n=1, batch_size=args.gen_batch, precision=precision)
    sync(device)
    out["first_call_s"] = round(time.perf_counter() - t, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(lambda: generate_images(net_g, clip, prompts, n=1, batch_size=args.gen_batch, precision=precision),
                  args.iters, args.warmup, device)
    out.update(sec_per_batch_median=round(median(times), 4), images_per_s=round(args.gen_batch / median(times), 1))
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def write_shards(folder: Path, n: int, size: int, per_shard: int) -> Path:
    """JPEG + caption webdataset shards of noisy colour fields (decode cost like photos of that size)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(folder / "shard-%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            base = rng.integers(0, 255, size=(1, 1, 3))
            img = np.clip(base + rng.normal(0, 40, size=(size, size + size // 3, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": f"a photo of a thing number {i}"})
    return folder


def section_loader(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    from galip.data.loader import StreamPlan, training_stream

    shards = write_shards(tmp / "loader_shards", args.loader_images, 256, max(args.loader_images // 16, 8))
    workers = os.cpu_count() or 1
    out: dict[str, Any] = {"cpus": workers, "image": "JPEG 256x341 -> resize 256 -> random crop 224 -> flip", "batch": 64}
    from galip.model.clip import load_clip

    tokenizer = load_clip("galip-tiny").tokenizer
    for n_workers in sorted({max(1, workers // 2), workers}) if device.type == "cuda" else [workers]:
        cfg = load_config(str(ROOT / "params.yaml"), [
            f"data.shards_dir={shards}", f"data.workers={n_workers}", "data.load_size=256", "data.crop_size=224",
            "data.shuffle_buffer=1000",
        ], "cc12m")
        stream, stats = training_stream(cfg.data, tokenizer, 64, seed=0, plan=StreamPlan(0, 10**9))
        next(stream)  # workers up, buffers filled
        n_batches = max(4, args.loader_images // 64)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(stream)
        dt_s = time.perf_counter() - t
        out[f"workers_{n_workers}_images_per_s"] = round(64 * n_batches / dt_s, 1)
        out[f"workers_{n_workers}_skipped"] = stats.skipped
        del stream
    return out


def section_ddp(args: argparse.Namespace, device: torch.device, tmp: Path, nproc: int) -> dict[str, Any]:
    shards = tmp / "ddp_shards"
    if not shards.exists():
        write_shards(shards, 128, 320, 16)
    out_dir = tmp / f"ddp_run_{nproc}"
    shutil.rmtree(out_dir, ignore_errors=True)
    batch = min(args.batch, 16)
    steps = 6
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "galip", "train",
        "--params", str(ROOT / "params.yaml"), "--profile", args.profile,
        "-S", "model.clip_pretrained=", "-S", f"data.shards_dir={shards}", "-S", "data.workers=2",
        "-S", f"train.device={'cuda' if device.type == 'cuda' else 'cpu'}", "-S", f"train.batch_size={batch}",
        "-S", f"train.max_steps={steps}", "-S", "train.ckpt_every=3", "-S", "train.log_every=3",
        "-S", "train.sample_every=1000", "-S", f"train.out_dir={out_dir}", "-S", "train.eval_every=0",
    ]
    if args.profile == "cc12m":
        cmd += ["-S", "data.load_size=288", "-S", "data.crop_size=256"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ddp_timeout, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    log = (proc.stdout + proc.stderr)[-4000:]
    ckpts = sorted(p.name for p in (out_dir / "checkpoints").glob("ckpt_*.pt")) if (out_dir / "checkpoints").is_dir() else []
    backend = "nccl" if device.type == "cuda" else "gloo (one process: no process group on CPU)"
    out = {"nproc": nproc, "backend": backend, "rc": proc.returncode, "wall_s": round(wall, 1), "steps": steps,
           "checkpoints": ckpts, "ok_run": proc.returncode == 0 and f"ckpt_{steps:08d}.pt" in ckpts}
    if proc.returncode != 0:
        out["log_tail"] = log
        raise RuntimeError(f"torchrun with {nproc} process(es) exited {proc.returncode}: {log[-1500:]}")
    m = re.findall(r'"step": (\d+)', proc.stdout)
    out["final_step"] = int(m[-1]) if m else None
    return out


# --- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="CPU-sized: demo profile, batch 4, few steps, no compile")
    p.add_argument("--profile", default=None, help="default: cc12m (ViT-B/32, 224 px); demo with --quick")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 64; 4 with --quick)")
    p.add_argument("--gen-batch", type=int, default=None, help="generation batch (default 256; 8 with --quick)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--correctness-steps", type=int, default=None)
    p.add_argument("--loader-images", type=int, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="include the torch.compile recipes")
    p.add_argument("--budget", type=float, default=450.0, help="seconds after which remaining sections are skipped")
    p.add_argument("--ddp-timeout", type=float, default=240.0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (folder)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--only", default="", help="comma-separated section names (default: all)")
    args = p.parse_args(argv)
    q = args.quick
    args.profile = args.profile or ("demo" if q else "cc12m")
    args.batch = args.batch or (4 if q else 64)
    args.gen_batch = args.gen_batch or (8 if q else 256)
    args.iters = args.iters or (1 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (0 if q else 5)
    args.correctness_steps = args.correctness_steps or (2 if q else 20)
    args.loader_images = args.loader_images or (64 if q else 4096)
    args.compile = (not q) if args.compile is None else args.compile
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible (use --device cpu --quick)")

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    name = f"gpu_{slug}_{dt.date.today().isoformat()}{'_quick' if q else ''}.json"
    paths = [args.results_dir / name] + ([args.out / name] if args.out else [])
    report = Report(args.budget, paths)
    report.data.update(command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                       date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), profile=args.profile,
                       batch=args.batch, gen_batch=args.gen_batch, iters=args.iters, warmup=args.warmup)
    only = {s for s in args.only.split(",") if s}
    tmp = Path(tempfile.mkdtemp(prefix="galip_gpu_check_"))

    def want(section: str) -> bool:
        return not only or section == "env" or section in only or section.split("_")[0] in only

    try:
        sections: list[tuple[str, Callable[[], Any]]] = [
            ("env", lambda: section_env(args, device)),
            ("correctness", lambda: section_correctness(args, device)),
            *[(f"train_{r}", (lambda r=r: train_recipe(args, device, r)))
              for r in ("fp32", "reference_fp16", "bf16") if device.type == "cuda" or r != "reference_fp16"],
            ("generate_bf16" if device.type == "cuda" else "generate", lambda: section_generate(args, device)),
            ("ddp_1", lambda: section_ddp(args, device, tmp, 1)),
            ("loader", lambda: section_loader(args, device, tmp)),
        ]
        if device.type == "cuda" and torch.cuda.device_count() >= 2:
            sections.append(("ddp_2", lambda: section_ddp(args, device, tmp, 2)))
        if args.compile:
            sections += [("train_bf16_compile", lambda: train_recipe(args, device, "bf16_compile")),
                         ("generate_compile", lambda: section_generate(args, device, compile_g=True))]
        sections.append(("flops", lambda: section_flops(args, device, report)))
        for sec_name, fn in sections:
            if want(sec_name):
                report.section(sec_name, fn)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report.save()
    print_table(report.data)
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 0 if all(s.get("ok", True) for s in report.data["sections"].values()) else 1


def print_table(data: dict[str, Any]) -> None:
    secs = data["sections"]
    env = secs.get("env", {})
    print(f"\n== {env.get('card', '?')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | driver {env.get('driver')} "
          f"| bf16 matmul {env.get('measured_bf16_matmul_tflops')} TFLOP/s")
    print(f"{'section':28} {'ok':4} {'img/s':>9} {'s/iter':>8} {'peak GiB':>9}  notes")
    for name, s in secs.items():
        if name == "env":
            continue
        ok = "skip" if "skipped" in s else ("yes" if s.get("ok") else "NO")
        notes = ""
        if name == "correctness" and s.get("ok"):
            notes = (f"max |dloss_d| bf16 {s.get('bf16_loss_d_max_abs_diff')} fp16 {s.get('fp16_loss_d_max_abs_diff')}; "
                     f"|dloss_g| bf16 {s.get('bf16_loss_g_max_abs_diff')} fp16 {s.get('fp16_loss_g_max_abs_diff')}")
        elif name == "flops" and s.get("ok"):
            notes = f"{s.get('tflop_per_iter')} TFLOP/iter; bf16 {s.get('bf16_achieved_tflops')} TFLOP/s (MFU {s.get('bf16_mfu_vs_datasheet')}); compile {s.get('bf16_compile_achieved_tflops')}"
        elif name.startswith("ddp") and s.get("ok"):
            notes = f"{s.get('backend')} rc {s.get('rc')} {s.get('wall_s')} s, ckpts {s.get('checkpoints')}"
        elif name == "loader" and s.get("ok"):
            notes = ", ".join(f"{k}={v}" for k, v in s.items() if k.endswith("images_per_s"))
        elif not s.get("ok", True):
            notes = s.get("error", s.get("skipped", ""))[:100]
        elif "skipped" in s:
            notes = s["skipped"]
        print(f"{name:28} {ok:4} {s.get('images_per_s', ''):>9} {s.get('sec_per_iter_median', s.get('sec_per_batch_median', '')):>8} "
              f"{s.get('peak_mem_gib', ''):>9}  {notes}")
    print(f"total {data.get('total_s')} s")


if __name__ == "__main__":
    sys.exit(main())
