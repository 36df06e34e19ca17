"""Stage times of this `make demo` (from the flow's "[stage] done in X s" lines) and a machine figure.

    python scripts/demo_timing.py WORKER_LOG FIRST_LINE TOTAL_S TRAIN_STEP_JSON > runs/demo/demo_timing.json

Prints a one-line summary on stderr and the record (the format bench/speed_table.py reads as a
`make_demo` row) on stdout. The machine figure is bench/train_step.py's demo-profile timing (20 steps,
batch 16) measured in the same run, so demo times from different machines can be read side by side.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

DONE = re.compile(r"\[(download|clip|train|evaluate)\] done in ([0-9.]+) s")


def main(argv: list[str]) -> int:
    log, first, total, figure = Path(argv[0]), int(argv[1]), float(argv[2]), json.loads(argv[3])
    stages: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines()[first:]:
        m = DONE.search(line)
        if m:
            stages[m.group(1)] = float(m.group(2))
    record = {
        "bench": "make_demo",
        "total_s": round(total, 1),
        "stages_s": stages,
        "machine_figure": f"demo train step, batch {figure['batch']}: {figure['sec_per_iter']} s/iter (mean of 20, min {figure['sec_per_iter_min']})",
        "train_step_s": figure["sec_per_iter"],
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine slows both figures
    }
    print(json.dumps(record))
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    print(f"stage times: {parts}; total {total:.0f} s; machine figure: {record['machine_figure']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
