"""Training-loader throughput (images/s) at 64 and 224 px for 0, 1, 2 DataLoader workers.

    python bench/loader.py [--images 2000] [--batch 32] > bench/results/cpu_loader.jsonl

Writes demo-scene JPEG shards once per size under bench/out/, then times one pass of the trainer's
stream, galip.data.loader.training_stream (decode + reference augmentation + tokenisation + batching),
after its first batch (DataLoader workers started, shuffle buffer filled).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from galip.model.clip import load_clip
from galip.config import load_config
from galip.data.loader import StreamPlan, training_stream
from galip.data.demo_data import caption_for, render_scene, sample_attributes

OUT = Path(__file__).parent / "out"


def write_shards(size: int, n: int) -> Path:
    import webdataset as wds

    out = OUT / f"shards_{size}"
    if len(list(out.glob("*.tar"))) == 4:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=n // 4, verbose=0) as sink:
        for i in range(n):
            attrs = sample_attributes(rng)
            buf = io.BytesIO()
            render_scene(attrs, size, rng).save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": caption_for(attrs, rng)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    tokenizer = load_clip("galip-tiny").tokenizer
    for size in (64, 224):
        shards = write_shards(size, args.images)
        load = 304 if size == 224 else 64  # 224: the reference resize -> crop recipe scaled down
        for workers in (0, 1, 2):
            cfg = load_config("params.yaml", [
                f"data.shards_dir={shards}", f"data.workers={workers}", "data.resampled=false",
                f"data.load_size={max(load, size)}", f"data.crop_size={size}", "data.shuffle_buffer=256",
            ], profile="demo")
            stream, stats = training_stream(cfg.data, tokenizer, args.batch, seed=0, plan=StreamPlan(0, 10**9))
            next(stream)
            load_avg = os.getloadavg()[0]  # the machine is shared: a busy one explains slow numbers
            t0 = time.perf_counter()
            n = sum(next(stream)[0].shape[0] for _ in range(args.images // args.batch - 1))
            dt = time.perf_counter() - t0
            print(json.dumps({"bench": "loader", "image_size": size, "workers": workers, "batch": args.batch,
                              "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 1),
                              "skipped": stats.skipped, "dropped_partial_batch": stats.dropped,
                              "load_avg_1m": round(load_avg, 2)}))


if __name__ == "__main__":
    main()
