"""Images/s of one GALIP training iteration: text encoding + D step with MA-GP + G step.

    python bench/train_step.py --profile cc12m --batch 4                 # ViT-B-32, 224 px, CPU
    python bench/train_step.py --profile cc12m --device cuda --precision bf16 --batch 64
    python bench/train_step.py --profile demo --batch 8 --iters 10 --ops bench/results/cpu_train_step_demo_ops.json

--ops FILE also runs the timed iterations under torch.profiler and writes where the CPU time goes: the ops
by self time, grouped by input shapes, with the FLOPs of each convolution and matmul (torch.profiler's
with_flops) and the rate they ran at, which says whether the step is bound by arithmetic or by overhead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config, parser, report, timed  # noqa: E402

from galip.train.distributed import DistEnv, resolve_device  # noqa: E402
from galip.train.trainer import Trainer  # noqa: E402


def write_op_profile(step, iters: int, warmup: int, out: Path, profile: str, batch: int, top: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(warmup):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for _ in range(iters):
            step()
    events = prof.key_averages(group_by_input_shape=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    by_op: dict[str, float] = {}
    for e in events:
        by_op[e.key] = by_op.get(e.key, 0.0) + e.self_cpu_time_total
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    record = {
        "bench": "train_step_ops", "profile": profile, "batch": batch, "iters": iters, "torch_threads": torch.get_num_threads(),
        "self_cpu_s_per_iter": round(total_us / iters / 1e6, 4),
        "share_by_op": {k: round(v / total_us, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]},
        "top_by_shape": [
            {"op": e.key, "shapes": str(e.input_shapes)[:160], "calls_per_iter": e.count / iters,
             "self_ms_per_iter": round(e.self_cpu_time_total / iters / 1e3, 2), "share": round(e.self_cpu_time_total / total_us, 4)}
            for e in rows
        ],
        # torch.profiler counts FLOPs on the forward ops (conv2d, mm, addmm) only; their total time includes the kernel
        "forward_flop_rates": [
            {"op": e.key, "shapes": str(e.input_shapes)[:160], "gflop_per_iter": round(e.flops / iters / 1e9, 3),
             "gflop_per_s": round(e.flops / (e.cpu_time_total * 1e3), 1)}
            for e in sorted((e for e in events if e.flops and e.cpu_time_total), key=lambda e: e.flops, reverse=True)[:8]
        ],
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"op profile -> {out}: {record['self_cpu_s_per_iter']} s of op self time per step", file=sys.stderr)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ops", type=Path, default=None, help="also write a torch.profiler op table (JSON) here")
    args = p.parse_args()
    cfg = config(args)
    device = resolve_device(args.device)
    batch = args.batch or cfg.train.batch_size
    trainer = Trainer.create(cfg, DistEnv(device=device))
    size = cfg.data.crop_size
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    tokens = trainer.clip.tokenize(prompts).to(device)
    step = lambda: trainer.train_step([(images, tokens)])  # noqa: E731
    if args.ops:
        write_op_profile(step, args.iters, args.warmup, args.ops, cfg.profile, batch)
    times = timed(step, args.iters, args.warmup, device)
    report("train_step", cfg, batch, device, times, real_image_size=size, compile=cfg.train.compile, ngf=cfg.model.ngf, label=args.label)


if __name__ == "__main__":
    main()
