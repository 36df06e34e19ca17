"""Evaluate a GALIP checkpoint: FID, fd_clip, CLIP scores, R-precision and (demo) prompt fidelity.

    galip evaluate --profile demo [--checkpoint runs/demo/checkpoints/ckpt_00000600.pt]
    torchrun --nproc_per_node=8 -m galip evaluate --profile cc12m

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

from ..train.checkpoint import latest_checkpoint, load_generator, readable_checkpoint
from ..model.clip import FrozenCLIP, load_clip
from ..config import Config, EvalConfig
from ..train.distributed import DistEnv, barrier, cleanup, init_distributed
from ..errors import MissingInputError
from .generate import generate_images, latents, render
from ..model.models import NetG

log = logging.getLogger("galip.evaluate")

METRICS_FILE = "metrics.json"
GRID_FILE = "samples.png"


def best_checkpoint(cfg: Config) -> dict[str, Any] | None:
    """The in-training evaluation's pick ({train.out_dir}/best.json), if it still exists on disk."""
    path = Path(cfg.train.out_dir) / "best.json"
    if not path.is_file():
        return None
    best = json.loads(path.read_text())
    return best if Path(best["checkpoint"]).is_file() else None


def resolve_checkpoint(cfg: Config, checkpoint: str | Path | None) -> Path:
    """``--checkpoint``, else the best by the gate metric during training, else the latest."""
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise MissingInputError(f"--checkpoint {path}: no such file")
        return readable_checkpoint(path)
    best = best_checkpoint(cfg)
    if best is not None:
        log.info("evaluating the best checkpoint by %s: step %s (%.4g)", best["metric"], best["step"], best["value"])
        return readable_checkpoint(Path(best["checkpoint"]))
    ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
    found = latest_checkpoint(ckpt_dir)
    if found is None:
        raise MissingInputError(f"no checkpoint in {ckpt_dir} (train first, set train.out_dir, or pass --checkpoint PATH)")
    return readable_checkpoint(found)


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
        from ..data.demo_data import demo_prompts

        pairs = demo_prompts(cfg.eval.seed, n)
        return [caption for caption, _ in pairs], [attrs for _, attrs in pairs]
    from .metrics.reference import list_shards, reference_captions, reference_spec

    return reference_captions(list_shards(*reference_spec(cfg)), n), None


def generate_batch(net_g: NetG, clip: FrozenCLIP, captions: Sequence[str], z: torch.Tensor) -> torch.Tensor:
    """One image per (caption, latent) pair, in [-1, 1], fp32: the serving path (galip.eval.generate.render)."""
    return render(net_g, clip, captions, z, batch_size=len(z)).to(z.device)


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
    env = init_distributed(cfg.eval.device, "eval.device")
    try:
        return _run(cfg, env, checkpoint)
    finally:
        cleanup(env)


def _run(cfg: Config, env: DistEnv, checkpoint: str | Path | None) -> dict[str, Any]:
    from .grid import save_labelled_grid
    from .metrics import EvalContext
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
    from .metrics import without_random_eval_clip

    z = latents(e.n_samples, net_g.nz, e.seed)
    results: dict[str, Any] = score(net_g, ctx, without_random_eval_clip(e.metrics, cfg, log), z, e.batch_size, progress=True)
    best = best_checkpoint(cfg)
    results["protocol"] = {
        "checkpoint": str(path),
        # why this checkpoint: the best by the gate metric during training, or the one asked for / the last
        "selected_by": best if best is not None and Path(best["checkpoint"]) == path else ("--checkpoint" if checkpoint else "latest"),
        "step": step,
        "n_samples": e.n_samples,
        "resolution": resolution,
        "prompt_source": e.prompt_source,
        "seed": e.seed,
        "world_size": env.world_size,
        "train_clip": _clip_name(ckpt_cfg.model.clip_model, ckpt_cfg.model.clip_pretrained, f"train.seed={ckpt_cfg.train.seed}"),
        "eval_clip": _clip_name(e.eval_clip_model, e.eval_clip_pretrained, f"eval.eval_clip_seed={e.eval_clip_seed}; its metrics not computed"),
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


def score(net_g: NetG, ctx: Any, names: Sequence[str], z: torch.Tensor, batch_size: int, progress: bool = False) -> dict[str, float]:
    """Generate one image per (ctx.prompts[i], z[i]) on this rank's share and reduce ``names`` metrics."""
    from tqdm.auto import tqdm

    from .metrics import SampleBatch, build_metrics

    env, captions, attrs = ctx.env, ctx.prompts, ctx.prompt_attrs
    if not names:  # every metric asked for was left out (see without_random_eval_clip)
        return {}
    metrics = build_metrics(names, ctx)
    mine = list(range(env.rank, len(captions), env.world_size))
    for start in tqdm(range(0, len(mine), batch_size), desc="evaluate", disable=not (progress and env.is_main), dynamic_ncols=True):
        idx = mine[start : start + batch_size]
        batch_captions = [captions[i] for i in idx]
        images = generate_batch(net_g, ctx.train_clip, batch_captions, z[idx].to(env.device))
        batch = SampleBatch(images, batch_captions, torch.tensor(idx), [attrs[i] for i in idx] if attrs else None)
        for metric in metrics.values():
            metric.update(batch)
    results: dict[str, float] = {}
    for metric in metrics.values():  # collective: every rank computes, in the same order
        results.update(metric.compute())
    return results


class TrainingEvaluator:
    """The small fixed evaluation that runs inside training (rank 0, every ``train.eval_every`` steps).

    ``train.eval_metrics`` on ``train.eval_samples`` fixed prompts and latents (from ``eval.prompt_source``
    and ``eval.seed``): the same images' prompts at every evaluation, so the curves in MLflow compare
    checkpoints. The evaluation CLIP, reference statistics and scene decoder are built once.
    """

    def __init__(self, cfg: Config, device: torch.device, train_clip: FrozenCLIP, nz: int) -> None:
        from .metrics import EvalContext, check_metric_names, without_random_eval_clip
        from .metrics.reference import ReferenceStats

        t = cfg.train
        check_metric_names(t.eval_metrics)
        small = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"n_samples": t.eval_samples, "ref_samples": t.eval_samples})})
        env = DistEnv(device=device)  # rank 0 alone: no collectives while the other ranks wait
        captions, attrs = eval_prompts(small)
        self.names = without_random_eval_clip(t.eval_metrics, cfg, log)
        self.z = latents(t.eval_samples, nz, cfg.eval.seed)
        self.batch_size = cfg.eval.batch_size
        self.ctx = EvalContext(
            cfg=small, env=env, train_clip=train_clip, prompts=captions, resolution=cfg.model.image_size,
            # loaded once, on first use (EvalContext.eval_clip), and only if a metric needs it
            reference_stats=ReferenceStats(small, env, cfg.model.image_size), load_eval_clip=partial(load_eval_clip, cfg.eval),
            prompt_attrs=attrs,
        )

    def __call__(self, net_g: NetG) -> dict[str, float]:
        self.ctx.protocol.clear()
        return score(net_g, self.ctx, self.names, self.z, self.batch_size)

