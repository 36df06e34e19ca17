"""Demo-recipe sweep: several demo-profile trainings side by side, each stopped at a common deadline,
compared by their in-training prompt fidelity (train.eval_every) step by step.

On a GPU machine the demo's small networks leave the card mostly idle, so one card runs several
variants at once, each for thousands of steps: how many steps (not seconds) a recipe needs before the
generator draws what its prompts ask is the same on any device, and tells which recipe can fit the
CPU demo's budget.

    python bench/demo_sweep.py --clip runs/demo/clip/galip-tiny.pt --shards data/demo/shards \\
        --out /tmp/sweep --deadline-s 420 [--variant NAME:key=value,key=value ...]
    python bench/demo_sweep.py --table [--check]   # bench/README.md's table from bench/results/demo_sweep_*.json

Writes <out>/sweep.json (per variant: steps reached, s/step, every in-training evaluation row) and
prints a table of the best and last rows. Variants default to VARIANTS below. Commit a sweep.json as
bench/results/demo_sweep_<card>_<date>_<tag>.json; --table renders every such file into bench/README.md
between the demo-sweep markers (a test checks they agree).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _readme import BENCH_README, sync_block  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- demo-sweep:begin (bench/demo_sweep.py --table) -->", "<!-- demo-sweep:end -->"

# name -> params overrides on top of the demo profile
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "lr_ref": ["train.lr_g=0.0001", "train.lr_d=0.0004"],
    "lr_x2": ["train.lr_g=0.0004", "train.lr_d=0.0016"],
    "b64": ["train.batch_size=64"],
    "simw0": ["train.sim_w=0"],
    "ema999": ["train.ema_decay=0.999"],
    "fb0123": ["model.feature_blocks=[0,1,2,3]"],
    "ngf32": ["model.ngf=32"],
}
COLUMNS = ("prompt_fidelity", "held_in_shape", "held_in_colour", "held_in_position", "held_in_size", "held_in_count",
           "held_out")
TABLE_STEPS = (500, 1000, 2000, 3000)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    return name, [s for s in re.split(r",(?![^\[]*\])", sets) if s]  # commas inside [...] belong to a list value


def launch(name: str, overrides: list[str], args: argparse.Namespace, out: Path) -> subprocess.Popen:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "galip", "train", "--params", str(ROOT / "params.yaml"), "--profile", "demo",
        "-S", f"model.clip_pretrained={args.clip}", "-S", f"data.shards_dir={args.shards}",
        "-S", f"train.out_dir={run_dir}", "-S", f"eval.out_dir={run_dir / 'eval'}",
        "-S", f"train.device={args.device}", "-S", f"train.max_steps={args.max_steps}",
        "-S", f"train.eval_every={args.eval_every}", "-S", f"train.ckpt_every={args.eval_every}",
        "-S", f"train.sample_every={args.sample_every}", "-S", "train.keep_checkpoints=1",
        "-S", f"train.eval_samples={args.eval_samples}", "-S", "train.log_every=50",
        "-S", f"mlflow.tracking_uri=sqlite:///{run_dir / 'mlflow.db'}",
    ]
    for o in overrides:
        cmd += ["-S", o]
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(args.threads), "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_RUN_ID", None)
    log = open(run_dir / "train.log", "w")
    return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def read_rows(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def short(row: dict[str, float]) -> dict[str, float]:
    """An eval_log.csv row with the metric prefix dropped: prompt_fidelity_held_in_shape -> held_in_shape, ..._held_out_all_attrs -> held_out."""
    # `held_out` was the name of held_out_all_attrs before metric names said what they measure: old results render too
    return {k.removeprefix("prompt_fidelity_").removesuffix("_all_attrs"): v for k, v in row.items()}


def bundle(out: Path, names: list[str], path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(out / "sweep.json", arcname="sweep.json")
        for name in names:
            run = out / name
            for f in ("eval_log.csv", "train_log.csv", "train.log"):
                if (run / f).exists():
                    tar.add(run / f, arcname=f"{name}/{f}")
            grids = sorted((run / "samples").glob("step_*.png"))
            if grids:
                tar.add(grids[-1], arcname=f"{name}/{grids[-1].name}")


def _cell(row: dict[str, float] | None) -> str:
    if row is None:
        return ""
    return f"{row['prompt_fidelity']:.0f} · {row['held_in_shape']:.0f} · {row['held_in_count']:.0f} · {row['held_out']:.0f}"


def render_table() -> str:
    """One row per variant of every committed sweep: at fixed steps, prompt fidelity · held-in shape ·
    held-in count · held-out all five (%, 200 prompts, EMA generator)."""
    head = ("| sweep | variant | overrides (on that commit's demo profile) | steps run | "
            + " | ".join(f"step {s}" for s in TABLE_STEPS) + " | last evaluation |\n"
            + "|---" * (5 + len(TABLE_STEPS)) + "|\n")
    lines = []
    for path in sorted(RESULTS.glob("demo_sweep_*.json")):
        data = json.loads(path.read_text())
        for name, v in data["variants"].items():
            by_step = {int(r["step"]): r for r in v["eval"]}
            last = v["eval"][-1] if v["eval"] else None
            cells = [_cell(by_step.get(s)) for s in TABLE_STEPS]
            last_cell = f"{int(last['step'])}: {_cell(last)}" if last else "none"
            lines.append(f"| {path.name} | {name} | {' '.join(v['overrides']) or '-'} | {v['steps']} | {' | '.join(cells)} | {last_cell} |\n")
    return f"{BEGIN}\n{head}{''.join(lines)}{END}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="render bench/README.md's table from bench/results and exit")
    p.add_argument("--check", action="store_true", help="with --table: exit 1 if bench/README.md differs")
    p.add_argument("--clip", help="the demo CLIP checkpoint (the clip stage's output)")
    p.add_argument("--shards", help="folder of demo webdataset shards")
    p.add_argument("--out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline-s", type=float, default=420.0, help="stop every run this long after the start")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2, help="OMP threads per run")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value (repeatable)")
    p.add_argument("--bundle", default="", help="also write this .tar.gz of each run's logs, curves and newest sample grid")
    args = p.parse_args(argv)
    if args.table:
        return sync_block(BEGIN, END, render_table(), args.check, "python bench/demo_sweep.py --table", BENCH_README)
    if args.clip is None or not (args.shards and args.out):
        p.error("a sweep needs --clip (a checkpoint, or '' for random CLIP weights), --shards and --out")
    # runs start in their own folders: relative paths are resolved here
    args.clip = Path(args.clip).resolve() if args.clip else ""
    args.shards = Path(args.shards).resolve()
    variants = dict(parse_variant(v) for v in args.variant) if args.variant else VARIANTS
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    procs = {name: launch(name, sets, args, out) for name, sets in variants.items()}
    print(f"started {len(procs)} runs: {', '.join(procs)}; deadline {args.deadline_s:.0f} s", flush=True)
    while time.monotonic() - t0 < args.deadline_s and any(pr.poll() is None for pr in procs.values()):
        time.sleep(10)
        progress = {n: int(read_rows(out / n / "eval_log.csv")[-1]["step"]) if read_rows(out / n / "eval_log.csv") else 0
                    for n in procs}
        print(f"[{time.monotonic() - t0:5.0f} s] evaluated up to: {progress}", flush=True)
    wall = time.monotonic() - t0
    for pr in procs.values():
        if pr.poll() is None:
            os.killpg(pr.pid, signal.SIGTERM)
    for pr in procs.values():
        try:
            pr.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pr.pid, signal.SIGKILL)

    report: dict = {"device": args.device, "host": platform.node(), "deadline_s": args.deadline_s, "wall_s": round(wall, 1),
                    "concurrent_runs": len(procs), "eval_samples": args.eval_samples, "variants": {}}
    if args.device.startswith("cuda"):
        import torch

        report["card"] = torch.cuda.get_device_name(0)
    for name, sets in variants.items():
        rows = read_rows(out / name / "eval_log.csv")
        train_rows = read_rows(out / name / "train_log.csv")
        last_step = int(max([r["step"] for r in train_rows + rows] or [0]))
        tail = (out / name / "train.log").read_text(errors="replace").splitlines()[-5:]
        report["variants"][name] = {
            "overrides": sets, "steps": last_step, "s_per_step_concurrent": round(wall / last_step, 4) if last_step else None,
            "exit_code": procs[name].returncode, "eval": [short(r) for r in rows],
            **({"log_tail": tail} if not rows else {}),
        }
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    if args.bundle:
        bundle(out, list(variants), Path(args.bundle))

    print(f"\n{'variant':<14}{'steps':>7}  best pf @step | last: " + " ".join(f"{c[:12]:>12}" for c in COLUMNS))
    for name, v in report["variants"].items():
        if not v["eval"]:
            print(f"{name:<14}{v['steps']:>7}  no evaluation: {' | '.join(v.get('log_tail', []))[-300:]}")
            continue
        best = max(v["eval"], key=lambda r: r.get("prompt_fidelity", -1))
        last = v["eval"][-1]
        print(f"{name:<14}{v['steps']:>7}  {best['prompt_fidelity']:5.1f} @{int(best['step']):>6} | "
              + " ".join(f"{last.get(c, float('nan')):12.1f}" for c in COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
