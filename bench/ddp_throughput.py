"""Training throughput of N torchrun processes (gloo on CPU, NCCL on GPU) for the same per-process batch.

    python bench/ddp_throughput.py --nprocs 1 2 [--steps 30] [--batch 16] [--shards data/demo/shards]

Each run trains the demo profile from scratch for --steps steps in a temporary out_dir and reports the
median images/s of the logged steps after --skip start-up steps (global: batch x processes; the
trainer measures each log interval on its own, so process start-up, CLIP creation and the first
step's allocations are not in the number). On CPU the cores are split between the
processes (OMP_NUM_THREADS = cores / N).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nprocs: int, args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"ddp{nprocs}-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nprocs)),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}",
           "-m", "galip", "train", "--profile", args.profile, "-S", f"train.out_dir={out}",
           "-S", f"train.max_steps={args.steps}", "-S", f"train.batch_size={args.batch}",
           "-S", "train.log_every=1", "-S", f"train.sample_every={args.steps * 10}", "-S", f"train.ckpt_every={args.steps * 10}",
           "-S", f"data.shards_dir={args.shards}", *sum((["-S", s] for s in args.set), [])]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    with open(out / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    steady = sorted(float(r["images_per_s"]) for r in rows if int(r["step"]) > args.skip)
    if not steady:
        raise SystemExit(f"--steps {args.steps} leaves no step after --skip {args.skip}")
    return {"bench": "ddp_throughput", "nprocs": nprocs, "batch_per_proc": args.batch, "steps": args.steps,
            "skipped_steps": args.skip, "images_per_s": steady[len(steady) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="start-up steps left out of the median")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--profile", default="demo")
    p.add_argument("--shards", default="data/demo/shards")
    p.add_argument("-S", "--set", action="append", default=[])
    args = p.parse_args()
    for n in args.nprocs:
        print(json.dumps(run(n, args)), flush=True)


if __name__ == "__main__":
    main()
