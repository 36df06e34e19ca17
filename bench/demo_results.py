"""Render the measured `make demo` from its committed files into README.md, bench/README.md and docs/data.md.

    python bench/demo_results.py           # rewrite the three blocks
    python bench/demo_results.py --check   # exit 1 if a block and the result files disagree (a test runs this)

The measured `make demo`, in two parts: its time, measured only on an otherwise idle machine,
  bench/results/cpu_make_demo.json              stage times + machine figure (runs/demo/demo_timing.json)
  bench/results/cpu_make_demo_data_report.json  that run's data/demo/data_report.json (the download rate)
and its quality, from one run of the same profile (on any machine: the load changes times, not results),
  bench/results/cpu_make_demo_metrics.json      runs/demo/eval/metrics.json
  bench/results/cpu_make_demo_clip_report.json  runs/demo/clip/report.json
  bench/results/cpu_make_demo_samples.png       runs/demo/eval/samples.png (shown in README.md)
Earlier runs, whose metrics files were not kept, are rows of bench/results/cpu_make_demo_earlier_runs.jsonl,
each naming where its numbers were recorded. Timed runs set side by side (before and after a change, on one
machine, each with its machine figure) are rows of bench/results/cpu_make_demo_timings.jsonl: a row is a
run's runs/demo/demo_timing.json plus `label` and `commit`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _readme import BENCH_README, README, sync_block  # noqa: E402

from galip.data.demo_data import COLOURS, COUNTS, POSITIONS, SHAPES, SIZES  # noqa: E402
from galip.eval.metrics.prompt_fidelity import ATTRIBUTES  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATA_DOC = ROOT / "docs" / "data.md"
# CC12M as published (Changpinyo et al., CVPR 2021; google-research-datasets/conceptual-12m): rows of cc12m.tsv
CC12M_ROWS = 12_423_374
CHANCE = {a: 100 / len(v) for a, v in zip(ATTRIBUTES, (SHAPES, COLOURS, POSITIONS, SIZES, COUNTS))}
CHANCE_ALL = 100 / (len(SHAPES) * len(COLOURS) * len(POSITIONS) * len(SIZES) * len(COUNTS))
BLOCKS = {
    "summary": ("<!-- demo-summary:begin (bench/demo_results.py) -->", "<!-- demo-summary:end -->", README),
    "runs": ("<!-- demo-runs:begin (bench/demo_results.py) -->", "<!-- demo-runs:end -->", BENCH_README),
    "download": ("<!-- download-rate:begin (bench/demo_results.py) -->", "<!-- download-rate:end -->", DATA_DOC),
    "timings": ("<!-- demo-timings:begin (bench/demo_results.py) -->", "<!-- demo-timings:end -->", BENCH_README),
}
STAGES = ("download", "clip", "train", "evaluate")


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _pct(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _fidelity(m: dict[str, Any], split: str, attribute: str) -> float:
    return m[f"prompt_fidelity_{split}" + (f"_{attribute}" if attribute != "all" else "")]


def measured_quality() -> dict[str, Any]:
    """The quality of the README's run as one record (the shape of cpu_make_demo_earlier_runs.jsonl's rows)."""
    m, clip = _load("cpu_make_demo_metrics.json"), _load("cpu_make_demo_clip_report.json")
    sep = clip["separation"]["held_in"]["image_text"]
    return {
        "recipe": "batch 8 x 1000 steps, CLIP batch 50, retry below 75 (no retry needed): today's profile, the run in README.md", "prompt_fidelity": m["prompt_fidelity"], "fd_clip": m["fd_clip"],
        "n_samples": m["protocol"]["n_samples"],
        "held_in": {a: _fidelity(m, "held_in", a) for a in (*ATTRIBUTES, "all")},
        "held_out": {a: _fidelity(m, "held_out", a) for a in (*ATTRIBUTES, "all")},
        "clip_position_held_in": sep["position"], "clip_min_held_in": sep["min"], "clip_weakest": min(ATTRIBUTES, key=lambda a: sep[a]),
        "total_s": None,  # its time is not comparable: the machine was busy
        "source": "`cpu_make_demo_metrics.json`, `cpu_make_demo_clip_report.json`",
    }


def render_summary() -> str:
    timing, q = _load("cpu_make_demo.json"), measured_quality()
    s = timing["stages_s"]
    load = f", load average {timing['load_avg_1m']}" if "load_avg_1m" in timing else ""
    rows = [f"| {label} | " + " | ".join(f"{q[split][a]:.1f}" for a in (*ATTRIBUTES, "all")) + " |"
            for label, split in (("held-in pairs", "held_in"), ("held-out pairs", "held_out"))]
    rows.append("| chance | " + " | ".join(_pct(CHANCE[a]) for a in ATTRIBUTES) + f" | {_pct(CHANCE_ALL)} |")
    held_in_mean = sum(q["held_in"][a] for a in ATTRIBUTES) / len(ATTRIBUTES)
    return "\n".join([
        BLOCKS["summary"][0],
        f"Time, on an otherwise idle 2-core machine (`bench/results/cpu_make_demo.json`{load}): **{timing['total_s'] / 60:.1f} min**",
        f"end to end: download {s['download']:.0f} s, CLIP pre-training {s['clip']:.0f} s, GALIP training {s['train']:.0f} s, "
        f"evaluation {s['evaluate']:.0f} s, the rest Prefect and registration. Other runs beside it, each with its machine figure",
        "(one whose demo CLIP needs its second attempt takes minutes longer), and what bounds the time:",
        "[bench/README.md](bench/README.md#time-per-stage-runs-side-by-side).",
        f"Quality, from another run of the same profile ({q['source']} in `bench/results/`; its time is not comparable, the",
        f"machine was busy), on {q['n_samples']} evaluation prompts, and that run's evaluation grid, one row per prompt (the last",
        "two rows are colour+shape pairs the training data never shows):",
        "",
        "![make demo evaluation grid](bench/results/cpu_make_demo_samples.png)",
        "",
        "| prompt fidelity, % | " + " | ".join(ATTRIBUTES) + " | all five |",
        "|---" * (len(ATTRIBUTES) + 2) + "|",
        *rows,
        "",
        f"Gate metric `prompt_fidelity` {q['prompt_fidelity']:.1f} (= ½ · held-in attribute mean {held_in_mean:.1f} + ½ · held-out "
        f"all five {q['held_out']['all']:.1f}), fd_clip {q['fd_clip']:.3f}.",
        f"The run's demo CLIP separates every attribute of training-like scenes on at least {q['clip_min_held_in']:.1f} % of them",
        f"(weakest: {q['clip_weakest']}); the generator can follow only what it separates.",
        BLOCKS["summary"][1],
    ])


def _cell(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def _seconds(x: float | None) -> str:
    return "not timed" if x is None else f"{x:.0f} s"


def render_runs() -> str:
    runs = [json.loads(line) for line in (RESULTS / "cpu_make_demo_earlier_runs.jsonl").read_text().splitlines() if line.strip()]
    runs.append(measured_quality())
    lines = [
        BLOCKS["runs"][0],
        "| run | CLIP position (held-in image→text, %) | prompt fidelity | held-in colour / position / count | held-out all five | total | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        held_in = r.get("held_in", {})
        middle = " / ".join(_cell(held_in.get(a)) for a in ("colour", "position", "count")) if held_in else ""
        lines.append(f"| {r['recipe']} | {_cell(r['clip_position_held_in'])} | {r['prompt_fidelity']:.1f} | {middle} | "
                     f"{_cell(r.get('held_out', {}).get('all'))} | {_seconds(r['total_s'])} | {r['source']} |")
    lines.append(BLOCKS["runs"][1])
    return "\n".join(lines)


def render_download() -> str:
    d = _load("cpu_make_demo_data_report.json")
    hours = CC12M_ROWS / d["images_per_s"] / 3600
    return "\n".join([
        BLOCKS["download"][0],
        f"Measured (`bench/results/cpu_make_demo_data_report.json`, the download of the timed `make demo`): img2dataset",
        f"fetched and resized {d['successes']} of {d['rows']} rows in {d['duration_s']} s, **{d['images_per_s']:.0f} img/s**, "
        "on a 2-core machine from a server on loopback",
        f"(the {d['failed']} failures are the demo's deliberately broken entries). At that rate one node needs "
        f"**{hours:.1f} h** for CC12M's {CC12M_ROWS:,} rows.",
        "That is an upper bound: the demo's images are small and local, while a real download waits on DNS, the",
        "network and the sites, and resizes larger images.",
        BLOCKS["download"][1],
    ])


def render_timings() -> str:
    runs = [json.loads(line) for line in (RESULTS / "cpu_make_demo_timings.jsonl").read_text().splitlines() if line.strip()]
    lines = [
        BLOCKS["timings"][0],
        "| run | commit | total | download | clip | train | evaluate | the rest | machine figure (s/step, batch 16: mean / min) | load after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        st = r["stages_s"]
        rest = r["total_s"] - sum(st[k] for k in STAGES)
        figure = re.search(r"([0-9.]+) s/iter \(mean of \d+, min ([0-9.]+)\)", r["machine_figure"])
        lines.append(f"| {r['label']} | {r['commit']} | {r['total_s']:.0f} s | " + " | ".join(f"{st[k]:.0f} s" for k in STAGES)
                     + f" | {rest:.0f} s | {figure[1]} / {figure[2]} | {r.get('load_avg_1m', '')} |")
    lines.append(BLOCKS["timings"][1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a block differs from the result files")
    args = p.parse_args(argv)
    rendered = {"summary": render_summary(), "runs": render_runs(), "download": render_download(), "timings": render_timings()}
    rc = 0
    for key, (begin, end, readme) in BLOCKS.items():
        rc |= sync_block(begin, end, rendered[key], args.check, "python bench/demo_results.py", readme)
    return rc


if __name__ == "__main__":
    sys.exit(main())
