"""CPU seconds each kind of process of a pipeline run used: the stages' own work against the orchestration
around them (Prefect server, worker, flow engine, dvc, torchrun's agent), sampled every 10 s until a stop
file appears. Run it beside `make demo` on a fresh clone:

    python bench/process_cpu.py /tmp/clone /tmp/clone.stop --out bench/results/cpu_make_demo_process_cpu.json &
    (cd /tmp/clone && make demo); touch /tmp/clone.stop

Processes are attributed by their working directory (the clone) and command line. A process that ends
between two samples loses what it used since the last one, so short-lived ones are undercounted.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import psutil

KINDS = (  # (what its command line contains, kind), first match wins
    ("prefect server", "prefect server"), ("uvicorn", "prefect server"), ("prefect worker", "prefect worker"),
    ("prefect.engine", "flow engine"), ("deployment run", "prefect deployment run --watch"),
    ("galip train-clip", "clip stage"), ("-m galip train", "train stage"), ("-m galip evaluate", "evaluate stage"),
    ("galip download", "download stage"), ("galip register", "register stage"), ("bench/train_step.py", "machine figure"),
    ("torchrun", "torchrun agent"), ("dvc", "dvc"), ("pip install", "make install"),
)  # fmt: skip


def kind(cmdline: str) -> str:
    return next((k for needle, k in KINDS if needle in cmdline), "other")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="the clone make demo runs in")
    p.add_argument("stop", help="sampling ends when this file exists")
    p.add_argument("--out", required=True)
    p.add_argument("--every-s", type=float, default=10.0)
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    last: dict[tuple[int, float], float] = {}
    totals: dict[str, float] = {}
    t0 = time.time()
    while not os.path.exists(args.stop):
        for proc in psutil.process_iter(["pid", "cmdline", "cwd", "create_time"]):
            try:
                if not (proc.info["cwd"] or "").startswith(args.root):
                    continue
                times = proc.cpu_times()
            except psutil.Error:
                continue
            used = times.user + times.system
            key = (proc.info["pid"], proc.info["create_time"])
            k = kind(" ".join(proc.info["cmdline"] or []))
            totals[k] = totals.get(k, 0.0) + used - last.get(key, 0.0)
            last[key] = used
        wall = time.time() - t0
        result = {"bench": "process_cpu", "label": args.label, "wall_s": round(wall), "cpu_s": {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
                  "share_of_one_core_pct": {k: round(100 * v / wall, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}}  # fmt: skip
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        time.sleep(args.every_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
