"""Render bench/README.md's speed tables from the committed result files in bench/results/.

    python bench/speed_table.py           # rewrite the tables between bench/README.md's speed-table markers
    python bench/speed_table.py --check   # exit 1 if bench/README.md and the result files disagree (a test runs this)

Every row names the file it comes from and the machine figure it was measured with (the card, or the
CPU threads and the load average at the time), so numbers from different machines are not mixed up.
Repeated measurements of one configuration in one file (bench/train_step.py alternating two settings
in one run) share a row that lists them in run order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _readme import BENCH_README, sync_block  # noqa: E402
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- speed-table:begin (bench/speed_table.py) -->", "<!-- speed-table:end -->"


def records(path: Path) -> Iterator[dict[str, Any]]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        yield from (json.loads(line) for line in text.splitlines() if line.strip())
    else:
        yield json.loads(text)


def _cpu_machine(r: dict[str, Any]) -> str:
    parts = [f"{r['torch_threads']} threads" if "torch_threads" in r else "2-core VM"]
    if "load_avg_1m" in r:
        parts.append(f"load {r['load_avg_1m']}")
    return ", ".join(parts)


def _cpu_row(r: dict[str, Any]) -> tuple[str, tuple[str, ...], str] | None:
    """(what was measured, its numbers, machine) of one record; None for records that are not timings."""
    bench = r.get("bench")
    if bench in ("train_step", "generate"):
        what = f"{bench}: {r['clip_model']} {r['image_size']} px, batch {r['batch']}, {r['precision']}"
        what += f", ngf {r['ngf']}" if "ngf" in r else ""
        what += f", {r['label']}" if r.get("label") else ""
        return what, (f"{r['images_per_s']} img/s", f"{r['sec_per_iter']} s/iter"), _cpu_machine(r)
    if bench == "loader":
        return f"loader: {r['image_size']} px, {r['workers']} workers, batch {r['batch']}", (f"{r['images_per_s']} img/s",), _cpu_machine(r)
    if bench == "ddp_throughput":
        return f"torchrun demo training: {r['nprocs']} process(es) x batch {r['batch_per_proc']}", (f"{r['images_per_s']} img/s",), _cpu_machine(r)
    if bench == "clip_step":
        (base, base_s), (fused, fused_s) = r["median"].items()
        what = f"clip stage step: {r['model']} {r['image_size']} px, batch {r['batch']}, {base} vs {fused}"
        what += f", {r['label']}" if r.get("label") else ""
        return what, (f"{base_s} vs {fused_s} s/step ({r['ratio_fused_vs_for_loop']}x)", f"median of {r['rounds']} alternated rounds"), _cpu_machine(r)
    if bench == "interference":
        cases = " / ".join(f"{n} {m:.3f} s ({r['slowdown_vs_alone'][n]}x)" for n, m in r["median"].items())
        return f"{r['step']}: {', '.join(r['median'])}" + (f", {r['label']}" if r.get("label") else ""), (cases, f"median of {r['rounds']} alternated rounds"), "2-core VM"
    if bench == "process_cpu":
        used = ", ".join(f"{k} {v:.0f} s" for k, v in r["cpu_s"].items() if v >= 1)
        return f"`make demo` (install included): CPU seconds of each kind of process over {r['wall_s']} s" + (f", {r['label']}" if r.get("label") else ""), (used,), "2-core VM"
    if bench == "make_demo":
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["stages_s"].items())
        machine = f"machine figure: {r['machine_figure']}" + (f", load {r['load_avg_1m']}" if "load_avg_1m" in r else "")
        return f"`make demo` after install ({stages})", (f"{r['total_s'] / 60:.1f} min",), machine
    return None


def cpu_rows() -> list[list[str]]:
    rows = []
    for path in sorted(RESULTS.glob("cpu_*.json*")):
        if path.name == "cpu_make_demo_timings.jsonl":
            continue  # make demo runs side by side have their own table (bench/demo_results.py)
        groups: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for r in records(path):
            row = _cpu_row(r)
            if row is not None:
                groups.setdefault(row[0], []).append(row[1:])
        for what, runs in groups.items():
            if len(runs) == 1:
                (values, machine), = runs
                result = values[0] + (f" ({values[1]})" if len(values) > 1 else "")
            else:  # repeats of one setting, alternated with another in the same run: listed in run order
                what += f"; {len(runs)} runs, alternated with the file's other setting"
                # "40.25 img/s", "40.44 img/s" -> "40.25, 40.44 img/s"
                merged = [", ".join(v[i].split(" ", 1)[0] for v, _ in runs) + " " + runs[0][0][i].split(" ", 1)[1] for i in range(len(runs[0][0]))]
                result = merged[0] + (f" ({merged[1]})" if len(merged) > 1 else "")
                machine = runs[0][1]
            rows.append([what, result, machine, path.name])
    return rows


def gpu_rows() -> list[list[str]]:
    rows = []
    for path in sorted(RESULTS.glob("gpu_*.json")):
        data = json.loads(path.read_text())
        secs = data["sections"]
        # a run limited with --only before env was always recorded: the card is in the file name
        card = secs.get("env", {}).get("card") or path.stem.split("_")[1].replace("-", " ").upper()
        for name, s in secs.items():
            if not s.get("ok"):
                continue
            if name.startswith(("train_", "generate")):
                extra = f", peak {s['peak_mem_gib']} GiB" if "peak_mem_gib" in s else ""
                kind = "train" if name.startswith("train_") else "generate"
                rows.append([f"{kind} {name.split('_', 1)[1] if kind == 'train' else name}, batch {s['batch']}",
                             f"{s['images_per_s']} img/s{extra}", card, path.name])
            elif name == "flops":
                rows.append(["one training iteration, batch 64 (flop_counter)", f"{s['tflop_per_iter']} TFLOP", card, path.name])
            elif name == "loader":
                for k, v in s.items():
                    if k.endswith("images_per_s"):
                        rows.append([f"training stream 224 px, {k.split('_')[1]} workers", f"{v} img/s", f"{card} host, {s['cpus']} CPUs", path.name])
    return rows


def render() -> str:
    head = "| what | result | measured with | file |\n|---|---|---|---|\n"
    cpu = "".join(f"| {' | '.join(r)} |\n" for r in cpu_rows())
    gpu = "".join(f"| {' | '.join(r)} |\n" for r in gpu_rows())
    return f"{BEGIN}\nCPU (2-core machines like CI's):\n\n{head}{cpu}\nGPU:\n\n{head}{gpu}{END}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    return sync_block(BEGIN, END, render(), args.check, "python bench/speed_table.py", BENCH_README)

if __name__ == "__main__":
    sys.exit(main())
