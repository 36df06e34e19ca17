"""Images/s of one GALIP training iteration: text encoding + D step with MA-GP + G step.

    python bench/train_step.py --profile cc12m --batch 4                 # ViT-B-32, 224 px, CPU
    python bench/train_step.py --profile cc12m --device cuda --precision bf16 --batch 64
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config, parser, report, timed  # noqa: E402

from galip.train.distributed import DistEnv, resolve_device  # noqa: E402
from galip.train.trainer import Trainer  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    cfg = config(args)
    device = resolve_device(args.device)
    batch = args.batch or cfg.train.batch_size
    trainer = Trainer.create(cfg, DistEnv(device=device))
    size = cfg.data.crop_size
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    tokens = trainer.clip.tokenize(prompts).to(device)
    times = timed(lambda: trainer.train_step([(images, tokens)]), args.iters, args.warmup, device)
    report("train_step", cfg, batch, device, times, real_image_size=size, compile=cfg.train.compile, ngf=cfg.model.ngf, label=args.label)


if __name__ == "__main__":
    main()
