"""Keep a rendered block of a README (between two marker comments) in step with the result files."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCH_README = ROOT / "bench" / "README.md"


def sync_block(begin: str, end: str, rendered: str, check: bool, fix: str, readme: Path = README) -> int:
    """Write ``rendered`` (markers included) over the block; with ``check``, only report a difference
    (exit code 1, naming the command ``fix`` that rewrites it)."""
    text = readme.read_text()
    if begin not in text or end not in text:
        print(f"{readme.relative_to(ROOT)} has no {begin} ... {end} block", file=sys.stderr)
        return 1
    before, rest = text.split(begin, 1)
    new = before + rendered + rest.split(end, 1)[1]
    if check:
        if new != text:
            print(f"{readme.relative_to(ROOT)} differs from bench/results: run {fix}", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0
