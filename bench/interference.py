"""What a little work beside a 2-thread step costs on a 2-core machine. The demo's stages step with two
torch threads, one per core; while they run, the Prefect server, worker and flow engine wake up every few
seconds (bench/results/cpu_make_demo_process_cpu.json: together ~10 % of one core). A thread that loses
its core for a moment holds up the other at the next parallel region, so the step loses more than the
CPU time taken from it. This times the demo's CLIP step (bench/clip_step.py's, fused AdamW) alone and
beside a process that wakes every --period-ms and computes for --burn-ms, in alternated rounds, with
OpenMP's default waiting and with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep instead of spinning).

    python bench/interference.py --rounds 3 --out bench/results/cpu_interference.jsonl --label <commit>
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import append_line  # noqa: E402

BURNER = """import sys, time
period, burn, end = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000, time.time() + float(sys.argv[3])
while time.time() < end:
    t = time.perf_counter()
    while time.perf_counter() - t < burn:
        pass
    time.sleep(period)
"""


def fused_step_s(env: dict[str, str], iters: int) -> float:
    out = subprocess.run([sys.executable, str(HERE / "clip_step.py"), "--rounds", "1", "--iters", str(iters)], env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return float(re.search(r"^fused AdamW\s.*median ([0-9.]+)", out, re.M).group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--period-ms", type=float, default=10.0)
    p.add_argument("--burn-ms", type=float, default=1.0)
    p.add_argument("--out", default="")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    share = round(100 * args.burn_ms / (args.period_ms + args.burn_ms), 1)
    cases = {
        "alone": ({}, False),
        f"beside a process using {share} % of one core": ({}, True),
        "alone, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
        f"beside a process using {share} % of one core, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, True),
    }
    per_round: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (extra, beside) in cases.items():
            burner = None
            if beside:
                burner = subprocess.Popen([sys.executable, "-c", BURNER, str(args.period_ms), str(args.burn_ms), "600"])
                time.sleep(1)
            try:
                per_round[name].append(fused_step_s({**os.environ, **extra}, args.iters))
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
    medians = {name: statistics.median(v) for name, v in per_round.items()}
    base = medians["alone"]
    result = {"bench": "interference", "label": args.label, "host": platform.node(), "rounds": args.rounds,
              "step": "demo CLIP step (galip-tiny, batch 50, 64 px, fused AdamW, 2 threads)", "beside_share_of_one_core_pct": share,
              "s_per_step": per_round, "median": medians, "slowdown_vs_alone": {n: round(m / base, 3) for n, m in medians.items()}}  # fmt: skip
    for name, times in per_round.items():
        print(f"{name:70s} {times}  median {medians[name]:.4f} s ({medians[name] / base:.2f}x alone)")
    append_line(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
