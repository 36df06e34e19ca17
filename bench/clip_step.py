"""Seconds per step of the demo's CLIP pre-training (the clip stage: open_clip's contrastive loss on
galip-tiny, clip_pretrain.batch_size, AdamW with open_clip_train's parameter groups), with torch's default
CPU AdamW (the for-loop one, what open_clip_train builds) and the fused one (what the stage patches in),
alternated in rounds in one process so the machine's drift hits both alike.

    python bench/clip_step.py --rounds 3 --iters 10 --out bench/results/cpu_clip_step.jsonl --label <commit>
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_line  # noqa: E402

from galip.config import load_config  # noqa: E402
from galip.model.clip import register_project_model_configs  # noqa: E402

VARIANTS = {"for-loop AdamW (torch's CPU default)": {}, "fused AdamW": {"fused": True}}


def optimizer(model: torch.nn.Module, cfg, **kwargs) -> torch.optim.AdamW:
    """open_clip_train's groups: no weight decay on gains, biases and logit_scale."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": cfg.clip_pretrain.wd}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.clip_pretrain.lr, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="", help="append one JSON line here")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    cfg = load_config(args.params, [], "demo")
    register_project_model_configs()
    batch, size = cfg.clip_pretrain.batch_size, cfg.model.image_size
    images = torch.rand(batch, 3, size, size)
    texts = open_clip.get_tokenizer(cfg.model.clip_model)(["two small green squares in the center"] * batch)
    loss_fn = open_clip.ClipLoss()
    setups = {}
    for name, kwargs in VARIANTS.items():
        torch.manual_seed(0)
        model = open_clip.create_model(cfg.model.clip_model, pretrained=None)
        setups[name] = (model, optimizer(model, cfg, **kwargs))

    def step(model, opt) -> None:
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    per_round: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (model, opt) in setups.items():
            for _ in range(args.warmup):
                step(model, opt)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(model, opt)
            per_round[name].append(round((time.perf_counter() - t0) / args.iters, 4))
    base, fused = (per_round[n] for n in VARIANTS)
    result = {
        "bench": "clip_step", "label": args.label, "model": cfg.model.clip_model, "batch": batch, "image_size": size,
        "torch_threads": torch.get_num_threads(), "host": platform.node(), "rounds": args.rounds, "iters": args.iters,
        "s_per_step": per_round, "median": {n: statistics.median(v) for n, v in per_round.items()},
        "ratio_fused_vs_for_loop": round(statistics.median(base) / statistics.median(fused), 3),
    }  # fmt: skip
    for name, times in per_round.items():
        print(f"{name:40s} s/step per round {times}  median {statistics.median(times):.4f}")
    print(f"fused is {result['ratio_fused_vs_for_loop']:.2f}x the for-loop AdamW's speed (median over rounds)")
    append_line(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
