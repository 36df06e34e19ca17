"""Shared set-up for the bench scripts: a config for a profile, with random CLIP weights (no download)."""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from galip.config import Config, load_config


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--profile", default="demo")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--batch", type=int, default=None, help="default: the profile's train.batch_size")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("-S", "--set", action="append", default=[], help="params override, e.g. -S model.image_size=128")
    p.add_argument("--label", default="", help="what sets this run apart from others in its result file (e.g. the commit)")
    return p


def config(args: argparse.Namespace) -> Config:
    overrides = ["model.clip_pretrained=", f"train.precision={args.precision}", f"train.device={args.device}", *args.set]
    return load_config(args.params, overrides, args.profile)


def timed(fn, iters: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def report(name: str, cfg: Config, batch: int, device: torch.device, times: list[float], **extra) -> None:
    mean = sum(times) / len(times)
    out = {
        "bench": name,
        "profile": cfg.profile,
        "clip_model": cfg.model.clip_model,
        "image_size": cfg.model.image_size,
        "batch": batch,
        "precision": cfg.train.precision,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "sec_per_iter": round(mean, 4),
        "sec_per_iter_min": round(min(times), 4),
        "images_per_s": round(batch / mean, 2),
        **{k: v for k, v in extra.items() if k != "label" or v},
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(out))


def append_line(path: str, result: dict) -> None:
    """One JSON line appended to a result file ('' = print only)."""
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(result) + "\n")
