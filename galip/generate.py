"""Text -> image sampling from a GALIP checkpoint (PNG grids; latent interpolation)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import load_generator
from .clip import FrozenCLIP
from .models import NetG


def latents(n: int, nz: int, seed: int, interpolate: bool = False) -> torch.Tensor:
    """n noise vectors from ``seed``; with ``interpolate``, a straight walk from seed's to seed+1's."""
    if not interpolate:
        return torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))
    a = torch.randn(1, nz, generator=torch.Generator().manual_seed(seed))
    b = torch.randn(1, nz, generator=torch.Generator().manual_seed(seed + 1))
    w = torch.linspace(0, 1, n).unsqueeze(1)
    return (1 - w) * a + w * b


@torch.no_grad()
def generate_images(
    net_g: NetG,
    clip: FrozenCLIP,
    prompts: Sequence[str],
    n: int = 8,
    seed: int = 0,
    interpolate: bool = False,
    batch_size: int = 64,
) -> torch.Tensor:
    """[len(prompts) * n, 3, H, W] images in [-1, 1]; the same latents for every prompt."""
    device = next(net_g.parameters()).device
    z = latents(n, net_g.nz, seed, interpolate)
    sent, _ = clip.encode_text(clip.tokenize(list(prompts)).to(device))
    sent = sent.float().repeat_interleave(n, 0)
    z = z.repeat(len(prompts), 1).to(device)
    out = [net_g(z[i : i + batch_size], sent[i : i + batch_size]).float() for i in range(0, len(z), batch_size)]
    return torch.cat(out).clamp(-1, 1)


def run(
    checkpoint: str | Path,
    prompts: Sequence[str],
    n: int = 8,
    seed: int = 0,
    out: str | Path = "grid.png",
    interpolate: bool = False,
    device: str = "auto",
    batch_size: int = 64,
) -> Path:
    from .grid import save_labelled_grid

    if not prompts:
        raise ValueError("give at least one --prompt")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    net_g, clip, _ = load_generator(checkpoint, dev)
    images = generate_images(net_g, clip, prompts, n, seed, interpolate, batch_size)
    return save_labelled_grid(images, list(prompts), out, n_per_row=n)  # one row per prompt
