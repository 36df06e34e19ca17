"""Run under torchrun: each rank reads one pass of the training stream (non-resampled); rank 0 writes who saw what."""

import json
import sys

import torch.distributed as dist

from galip.model.clip import load_clip
from galip.data.loader import StreamPlan, training_stream
from galip.train.distributed import cleanup, init_distributed
from helpers import tiny_config
from pathlib import Path


def main(tmp: str, shards: str, out: str, batches: str) -> None:
    env = init_distributed("cpu")
    cfg = tiny_config(Path(tmp), Path(shards), "data.resampled=false", "data.workers=1")
    tokenizer = load_clip("galip-tiny").tokenizer
    stream, _ = training_stream(cfg.data, tokenizer, 4, seed=0, plan=StreamPlan(0, 1000), rank=env.rank, world_size=env.world_size)
    seen = [c for _ in range(int(batches)) for c in next(stream)[2]]
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, seen)
    if env.rank == 0:
        Path(out).write_text(json.dumps(everyone))
    cleanup(env)


if __name__ == "__main__":
    main(*sys.argv[1:5])
