"""Text -> image sampling from a GALIP checkpoint (PNG grids; latent interpolation)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..train.checkpoint import load_generator
from ..train.distributed import resolve_device
from ..model.clip import FrozenCLIP
from ..errors import UserError
from ..model.models import NetG
from ..model.precision import Precision


def check_request(prompts: Sequence[str], n: int, max_images: int, n_name: str = "--n", max_name: str = "--max-images") -> None:
    """Refuse before any work: no prompt, an empty or blank prompt, n < 1, or more images than ``max_images``."""
    if not prompts:
        raise UserError("give at least one prompt (--prompt TEXT)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise UserError(f"prompt {i + 1} of {len(prompts)} is {'missing (null)' if p is None or p != p else type(p).__name__}: every prompt needs text")
        if not p.strip():
            raise UserError(f"prompt {i + 1} of {len(prompts)} is empty or blank: every prompt needs text")
    if n < 1:
        raise UserError(f"{n_name}={n}: need at least 1 image per prompt")
    if n * len(prompts) > max_images:
        raise UserError(
            f"{n_name}={n} x {len(prompts)} prompt(s) = {n * len(prompts)} images, more than {max_name}={max_images} "
            "(every image is held in memory until the grid is written): lower it, or raise the limit deliberately"
        )


def latents(n: int, nz: int, seed: int, interpolate: bool = False) -> torch.Tensor:
    """n noise vectors from ``seed``; with ``interpolate``, a straight walk from seed's to seed+1's."""
    if not interpolate:
        return torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))
    a = torch.randn(1, nz, generator=torch.Generator().manual_seed(seed))
    b = torch.randn(1, nz, generator=torch.Generator().manual_seed(seed + 1))
    w = torch.linspace(0, 1, n).unsqueeze(1)
    return (1 - w) * a + w * b


def render(
    net_g: NetG,
    clip: FrozenCLIP,
    prompts: Sequence[str],
    z: torch.Tensor,
    precision: Precision | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """One image per (prompt, latent) row: [len(prompts), 3, H, W] in [-1, 1], float32 on the CPU.

    The one inference path of sampling, evaluation and serving: inference mode, batched, under the
    device's precision (bf16 autocast with a bf16 CLIP on GPUs, fp32 on CPU).
    """
    if len(prompts) != len(z):
        raise ValueError(f"{len(prompts)} prompts but {len(z)} latents")
    device = next(net_g.parameters()).device
    precision = precision or Precision.resolve("auto", device)
    out = []
    with torch.inference_mode(), precision.autocast():
        for i in range(0, len(z), batch_size):
            sent, _ = clip.encode_text(clip.tokenize(list(prompts[i : i + batch_size])).to(device))
            images = net_g(z[i : i + batch_size].to(device), sent.float())
            out.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def generate_images(
    net_g: NetG,
    clip: FrozenCLIP,
    prompts: Sequence[str],
    n: int = 8,
    seed: int = 0,
    interpolate: bool = False,
    batch_size: int = 64,
    precision: Precision | None = None,
) -> torch.Tensor:
    """[len(prompts) * n, 3, H, W] images in [-1, 1]; the same n latents for every prompt (one grid row each)."""
    z = latents(n, net_g.nz, seed, interpolate).repeat(len(prompts), 1)
    rows = [p for p in prompts for _ in range(n)]
    return render(net_g, clip, rows, z, precision, batch_size)


def run(
    checkpoint: str | Path,
    prompts: Sequence[str],
    n: int = 8,
    seed: int = 0,
    out: str | Path = "grid.png",
    interpolate: bool = False,
    device: str = "auto",
    batch_size: int = 64,
    max_images: int = 1024,
) -> Path:
    from .grid import save_labelled_grid

    check_request(prompts, n, max_images)
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; pass the PNG file to write (e.g. {Path(out) / 'grid.png'})")
    dev = resolve_device(device, key="--device")
    net_g, clip, _ = load_generator(checkpoint, dev)
    images = generate_images(net_g, clip, prompts, n, seed, interpolate, batch_size)
    return save_labelled_grid(images, list(prompts), out, n_per_row=n)  # one row per prompt
