"""Images/s of GALIP sampling (text encoding + NetG forward through the frozen ViT mapper).

    python bench/generate.py --profile cc12m --batch 16
    python bench/generate.py --profile cc12m --device cuda --precision bf16 --batch 256 [-S train.compile=true]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config, parser, report, timed  # noqa: E402

from galip.model.clip import clip_from_config  # noqa: E402
from galip.train.distributed import resolve_device  # noqa: E402
from galip.eval.generate import generate_images  # noqa: E402
from galip.model.models import NetG  # noqa: E402
from galip.model.precision import Precision  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    cfg = config(args)
    device = resolve_device(args.device)
    batch = args.batch or cfg.train.batch_size
    precision = Precision.resolve(args.precision, device)
    clip = clip_from_config(cfg.model).set_precision(precision.dtype).to(device)
    net_g = NetG(cfg.model, clip).to(device).eval()
    if cfg.train.compile:
        net_g = torch.compile(net_g)
    prompts = [f"a photo of object number {i}" for i in range(batch)]

    def step() -> None:  # exactly the sampling / evaluation / serving path
        generate_images(net_g, clip, prompts, n=1, batch_size=batch, precision=precision)

    report("generate", cfg, batch, device, timed(step, args.iters, args.warmup, device), compile=cfg.train.compile)


if __name__ == "__main__":
    main()
