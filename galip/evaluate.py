"""Evaluate a GALIP checkpoint: FID, fd_clip, CLIP scores, R-precision and (demo) prompt fidelity.

    galip evaluate --profile demo [--checkpoint runs/demo/checkpoints/ckpt_00000600.pt]
    torchrun --nproc_per_node=8 -m galip.evaluate --profile cc12m

Each rank generates its share of ``eval.n_samples`` images (sample i: prompt i, latent i, on rank
i % world_size, so results do not depend on the number of ranks) and feeds every metric in
``eval.metrics``; metrics reduce across ranks through torchmetrics. Rank 0 writes
``{eval.out_dir}/metrics.json`` (the DVC metrics file) and a fixed-prompt sample grid; ``run``
returns the same dict (flat name -> float, plus ``protocol``) for the caller to log to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import latest_checkpoint, load_generator
from .clip import ClipWeightsError, FrozenCLIP, load_clip
from .config import Config, ConfigError, EvalConfig
from .distributed import DistEnv, barrier, cleanup, init_distributed
from .generate import generate_images, latents
from .models import NetG

log = logging.getLogger("galip.evaluate")

METRICS_FILE = "metrics.json"
GRID_FILE = "samples.png"


def resolve_checkpoint(cfg: Config, checkpoint: str | Path | None) -> Path:
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {path}: no such file")
        return path
    ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
    found = latest_checkpoint(ckpt_dir)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (train first, set train.out_dir, or pass --checkpoint PATH)")
    return found


def load_eval_generator(path: Path, device: torch.device) -> tuple[NetG, FrozenCLIP, Config, int]:
    """(NetG, the training CLIP, the checkpoint's config, step)."""
    net_g, clip, ckpt_cfg = load_generator(path, device)
    step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step", 0))
    return net_g, clip, ckpt_cfg, step


def load_eval_clip(ecfg: EvalConfig) -> FrozenCLIP:
    """The independent evaluation CLIP; random weights (demo) come from their own seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ecfg.eval_clip_seed)
        return load_clip(ecfg.eval_clip_model, ecfg.eval_clip_pretrained, pixel_norm="standard")


def eval_prompts(cfg: Config) -> tuple[list[str], list[Any] | None]:
    """``eval.n_samples`` prompts (and demo attributes when the source has them), the same on every rank."""
    n = cfg.eval.n_samples
    if cfg.eval.prompt_source == "demo":
        from .demo_data import demo_prompts

        pairs = demo_prompts(cfg.eval.seed, n)
        return [caption for caption, _ in pairs], [attrs for _, attrs in pairs]
    from .metrics.reference import list_shards, reference_captions, reference_spec

    return reference_captions(list_shards(*reference_spec(cfg)), n), None


@torch.no_grad()
def generate_batch(net_g: NetG, clip: FrozenCLIP, captions: Sequence[str], z: torch.Tensor) -> torch.Tensor:
    """One image per (caption, latent) pair, in [-1, 1], fp32."""
    sent, _ = clip.encode_text(clip.tokenize(list(captions)).to(z.device))
    return net_g(z, sent.float()).float().clamp(-1, 1)


def _clip_name(name: str, pretrained: str, random_seed: str) -> str:
    return f"{name}/{pretrained or f'random init, seed {random_seed}'}"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run(cfg: Config, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default: the latest in ``{train.out_dir}/checkpoints``) with ``eval.metrics``."""
    from .metrics import check_metric_names

    check_metric_names(cfg.eval.metrics)  # before any model is loaded
    env = init_distributed(cfg.eval.device)
    try:
        return _run(cfg, env, checkpoint)
    finally:
        cleanup(env)


def _run(cfg: Config, env: DistEnv, checkpoint: str | Path | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from .metrics import EvalContext, SampleBatch, build_metrics
    from .grid import save_labelled_grid
    from .metrics.reference import ReferenceStats

    e = cfg.eval
    path = resolve_checkpoint(cfg, checkpoint)
    net_g, train_clip, ckpt_cfg, step = load_eval_generator(path, env.device)
    captions, attrs = eval_prompts(cfg)
    resolution = ckpt_cfg.model.image_size
    ctx = EvalContext(
        cfg=cfg,
        env=env,
        train_clip=train_clip,
        prompts=captions,
        resolution=resolution,
        reference_stats=ReferenceStats(cfg, env, resolution),
        load_eval_clip=partial(load_eval_clip, e),
        prompt_attrs=attrs,
    )
    metrics = build_metrics(e.metrics, ctx)

    z = latents(e.n_samples, net_g.nz, e.seed)
    mine = list(range(env.rank, e.n_samples, env.world_size))
    for start in tqdm(range(0, len(mine), e.batch_size), desc="evaluate", disable=not env.is_main, dynamic_ncols=True):
        idx = mine[start : start + e.batch_size]
        batch_captions = [captions[i] for i in idx]
        images = generate_batch(net_g, train_clip, batch_captions, z[idx].to(env.device))
        batch = SampleBatch(images, batch_captions, torch.tensor(idx), [attrs[i] for i in idx] if attrs else None)
        for metric in metrics.values():
            metric.update(batch)

    results: dict[str, Any] = {}
    for metric in metrics.values():  # collective: every rank computes, in the same order
        results.update(metric.compute())
    results["protocol"] = {
        "checkpoint": str(path),
        "step": step,
        "n_samples": e.n_samples,
        "resolution": resolution,
        "prompt_source": e.prompt_source,
        "seed": e.seed,
        "world_size": env.world_size,
        "train_clip": _clip_name(ckpt_cfg.model.clip_model, ckpt_cfg.model.clip_pretrained, f"train.seed={ckpt_cfg.train.seed}"),
        "eval_clip": _clip_name(e.eval_clip_model, e.eval_clip_pretrained, f"eval.eval_clip_seed={e.eval_clip_seed}"),
        "metrics": ctx.protocol,
    }
    if env.is_main:
        out_dir = Path(e.out_dir)
        # One row per fixed prompt, written beside it; the same latents in every row: comparable across checkpoints.
        prompts = list(cfg.train.sample_prompts)
        grid = generate_images(net_g, train_clip, prompts, n=e.grid_n, seed=e.seed)
        save_labelled_grid(grid, prompts, out_dir / GRID_FILE, n_per_row=e.grid_n)
        write_json_atomic(out_dir / METRICS_FILE, results)
        log.info("wrote %s", out_dir / METRICS_FILE)
    barrier(env)
    return results


# Errors caused by inputs (missing weights, shards, checkpoint; bad settings): the CLI prints them
# without a traceback. InceptionWeightsError and ReferenceSetError are FileNotFoundErrors.
USER_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, ClipWeightsError, ConfigError)


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["evaluate", *(argv or [])])


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
