"""Does the demo recipe learn? The demo pipeline shrunk to a few minutes on 2 CPU cores.

The stages `make demo` runs (download of generated scenes, train-clip, train, evaluate), each through
`galip.cli.main` with the demo profile, fewer scenes, a shorter CLIP training, a few hundred GALIP
steps and prompt_fidelity alone on fewer samples. Prints one JSON line: the prompt_fidelity parts and
each stage's seconds. tests/test_train.py::test_demo_recipe_learns_colour runs it and asserts bars
taken from the runs in bench/results/cpu_demo_learns.jsonl (`python bench/demo_learns.py --seed N`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

# Sized so that the whole run fits the suite's budget (<= 4 min on a quiet 2-core machine).
STEPS = 300
SCENES = 1200
CLIP_EPOCHS = 4
EVAL_SAMPLES = 200


def overrides(root: Path, seed: int, steps: int = STEPS) -> list[str]:
    return [
        f"data.url_list={root / 'source' / 'urls.parquet'}",
        f"data.shards_dir={root / 'shards'}",
        f"data.manifest={root / 'manifest.json'}",
        f"data.report={root / 'data_report.json'}",
        f"data.demo_images={SCENES}",
        "data.demo_broken=false",
        f"clip_pretrain.out_path={root / 'clip' / 'galip-tiny.pt'}",
        f"clip_pretrain.report_path={root / 'clip' / 'report.json'}",
        f"clip_pretrain.epochs={CLIP_EPOCHS}",
        "clip_pretrain.attempts=1",
        "clip_pretrain.separation_samples=50",
        f"clip_pretrain.seed={seed}",
        f"train.out_dir={root / 'run'}",
        f"train.max_steps={steps}",
        f"train.ckpt_every={steps}",
        f"train.sample_every={steps}",
        "train.eval_every=0",
        f"train.seed={seed}",
        f"eval.out_dir={root / 'eval'}",
        f"eval.n_samples={EVAL_SAMPLES}",
        "eval.metrics=[prompt_fidelity]",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
    ]


def run(root: Path, seed: int, steps: int = STEPS) -> dict:
    """The four stages in ``root``; prompt_fidelity's parts and the seconds each stage took."""
    import torch

    from galip.cli import main

    # One thread: steps this small lose more to two threads waiting on each other on a busy machine
    # than the second thread gains on a quiet one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _stages(root, seed, steps, main)
    finally:
        torch.set_num_threads(threads)


def _stages(root: Path, seed: int, steps: int, main) -> dict:
    args = [a for o in overrides(root, seed, steps) for a in ("-S", o)]
    clip = ["-S", f"model.clip_pretrained={root / 'clip' / 'galip-tiny.pt'}"]
    seconds = {}
    for stage, argv in [
        ("download", ["download", *args]),
        ("clip", ["train-clip", *args]),
        ("train", ["train", *args, *clip]),
        ("evaluate", ["evaluate", *args, *clip]),
    ]:
        t0 = time.perf_counter()
        rc = main([*argv, "--profile", "demo"])
        seconds[stage] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            raise RuntimeError(f"galip {argv[0]} exited {rc}")
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    clip_report = json.loads((root / "clip" / "report.json").read_text())
    return {
        "seed": seed,
        "steps": steps,
        "scenes": SCENES,
        "clip_epochs": CLIP_EPOCHS,
        "eval_samples": EVAL_SAMPLES,
        "metrics": {k: round(v, 2) for k, v in metrics.items() if k.startswith("prompt_fidelity")},
        "clip_held_in_image_text": clip_report["separation"]["held_in"]["image_text"],
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--out", type=Path, default=None, help="append the JSON line to this file")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="demo_learns-") as tmp:
        line = json.dumps(run(Path(tmp), a.seed, a.steps))
    print(line)
    if a.out:
        with a.out.open("a") as f:
            f.write(line + "\n")
