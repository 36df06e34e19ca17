"""How long `make test` takes: one row per fresh-clone run, kept in bench/results/cpu_suite.jsonl and
rendered into bench/README.md.

    CI=true bash .ci/run > ci.log 2>&1    # on a fresh clone, machine otherwise idle
    python bench/suite_time.py --log ci.log --commit <sha> --label "..." --install-and-suite-s N
    python bench/suite_time.py            # re-render the table from the result file (--check: compare only)

The row is read from pytest's own summary lines ("N passed ... in S s", "slowest N durations"), so it
states what the run printed. Rows from runs whose logs were not kept name where their numbers were
recorded (`source`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _readme import BENCH_README, ROOT, sync_block  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "cpu_suite.jsonl"
BEGIN, END = "<!-- suite-time:begin (bench/suite_time.py) -->", "<!-- suite-time:end -->"
SUMMARY = re.compile(r"^=+ (?P<counts>.*?) in (?P<seconds>[0-9.]+)s(?: \([0-9:]+\))? =+$")
DURATION = re.compile(r"^(?P<seconds>[0-9.]+)s (?P<phase>call|setup|teardown)\s+(?P<test>\S+)$")


def parse_log(text: str) -> dict:
    """Counts and seconds of each pytest session in a `make test` log, and the slowest tests it listed."""
    sessions, slowest, in_durations = [], [], False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("=") and "slowest" in line and "durations" in line:
            in_durations = True
            continue
        m = SUMMARY.match(line)
        if m:
            counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", m["counts"])}
            sessions.append({"counts": counts, "seconds": float(m["seconds"])})
            in_durations = False
            continue
        d = DURATION.match(line) if in_durations else None
        if d:
            slowest.append([float(d["seconds"]), d["phase"], d["test"].removeprefix("tests/")])
    if not sessions:
        raise SystemExit("no pytest summary line ('N passed in S s') in the log: pass the output of `make test`")
    total = lambda key: sum(s["counts"].get(key, 0) for s in sessions)  # noqa: E731
    return {
        "passed": total("passed"),
        "failed": total("failed") + total("error") + total("errors"),
        "suite_s": [s["seconds"] for s in sessions],
        "slowest": slowest[:5],
    }


def render(rows: list[dict]) -> str:
    lines = [
        BEGIN,
        "| run | commit | layout | passed | failed | suite s (parallel part + alone) | install + suite s | slowest tests (s) | source |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        suite = " + ".join(f"{s:.0f}" for s in r["suite_s"]) or "-"
        total = f"{r['install_and_suite_s']:.0f}" if r.get("install_and_suite_s") else "-"
        slow = ", ".join(f"{t.split('::')[0]}{' (setup)' if ph == 'setup' else ''} {s:.0f}" for s, ph, t in r.get("slowest", [])[:4]) or "-"
        lines.append(
            f"| {r['label']} | {r['commit']} | {r['layout']} | {r['passed']} | {r['failed']} | {suite} | {total} | {slow} | {r.get('source', 'log')} |"
        )
    return "\n".join(lines) + "\n" + END


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, help="output of `make test` / .ci/run to add as a row")
    p.add_argument("--commit", help="the commit the run tested")
    p.add_argument("--label", help="what the run was, e.g. 'session 27, fresh clone 1'")
    p.add_argument("--layout", default="xdist -n 2, then -m alone", help="how the suite ran")
    p.add_argument("--install-and-suite-s", type=float, default=None, help="wall seconds of the whole .ci/run")
    p.add_argument("--check", action="store_true", help="only compare bench/README.md with the result file")
    a = p.parse_args(argv)
    if a.log:
        if not (a.commit and a.label):
            p.error("--log needs --commit and --label")
        row = {"label": a.label, "commit": a.commit[:7], "layout": a.layout, **parse_log(a.log.read_text(errors="replace")),
               "install_and_suite_s": a.install_and_suite_s, "load_avg_1m_after": round(os.getloadavg()[0], 2)}
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return sync_block(BEGIN, END, render(rows), a.check, "python bench/suite_time.py", readme=BENCH_README)


if __name__ == "__main__":
    sys.exit(main())
