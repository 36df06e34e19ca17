"""GALIP networks: NetG (generator with CLIP-based mapper), NetD and NetC (discriminator on CLIP features).

Layer structure and initialisation follow tobran/GALIP so that parameter counts match the reference
exactly at ViT-B/32, 224 px (NetG 51,830,211, NetD 28,706,821, NetC 2,099,200). Widths that the
reference hard-codes (768, 7, 224, 512) are taken from the CLIP model instead.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .clip import ClipConfigError, ClipDims, FrozenCLIP
from ..config import ModelConfig


class Affine(nn.Module):
    """Text-conditioned channel affine: gamma(c) * x + beta(c), initialised to the identity."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()

        def mlp() -> nn.Sequential:
            return nn.Sequential(OrderedDict(
                linear1=nn.Linear(cond_dim, channels),
                relu1=nn.ReLU(inplace=True),
                linear2=nn.Linear(channels, channels),
            ))

        self.fc_gamma, self.fc_beta = mlp(), mlp()
        nn.init.zeros_(self.fc_gamma.linear2.weight)
        nn.init.ones_(self.fc_gamma.linear2.bias)
        nn.init.zeros_(self.fc_beta.linear2.weight)
        nn.init.zeros_(self.fc_beta.linear2.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # The sum is taken in place on the fresh product (mul's backward needs its inputs, not its output):
        # the same two roundings as gamma * x + beta, one full-size tensor fewer.
        return torch.mul(self.fc_gamma(c)[:, :, None, None], x).add_(self.fc_beta(c)[:, :, None, None])


class DFBlock(nn.Module):
    """DF-GAN fusion block: two affine + LeakyReLU pairs."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.affine0 = Affine(cond_dim, channels)
        self.affine1 = Affine(cond_dim, channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # In place, as in the reference: on CPU the out-of-place activations' memory traffic and allocations
        # cost ~10 % of a NetG forward. The affine outputs are fresh tensors no one else holds.
        x = F.leaky_relu(self.affine0(x, c), 0.2, inplace=True)
        return F.leaky_relu(self.affine1(x, c), 0.2, inplace=True)


class MBlock(nn.Module):
    """Mapper block (conv -> fuse -> conv -> fuse) with a residual shortcut."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, 1, 1)
        self.fuse1 = DFBlock(cond_dim, mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.c_sc = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.fuse1(self.conv1(x), c)
        h = self.fuse2(self.conv2(h), c)
        return (self.c_sc(x) if self.c_sc is not None else x) + h


class GBlock(nn.Module):
    """Upsample (nearest) to ``size`` then shortcut + [fuse, conv, fuse, conv]."""

    def __init__(self, cond_dim: int, in_ch: int, out_ch: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.fuse1 = DFBlock(cond_dim, in_ch)
        self.c1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.c2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.c_sc = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # The reference upsamples first. Nearest upsampling only repeats pixels, and fuse1 (per-channel affine
        # + LeakyReLU) and the 1x1 shortcut act on each pixel alone, so they run before it on 3-4x fewer pixels:
        # every output element is the same function of the same input values (float32 forward bit for bit;
        # their gradients sum the repeated pixels in another order). ~15 % of a NetG forward on CPU.
        size = (self.size, self.size)
        h = self.c2(self.fuse2(self.c1(F.interpolate(self.fuse1(x, c), size=size)), c))
        return F.interpolate(self.c_sc(x) if self.c_sc is not None else x, size=size) + h


def g_block_plan(grid: int, image_size: int, ngf: int) -> list[tuple[int, int, int]]:
    """(in_ch, out_ch, size) per G block: powers of two above the CLIP grid, then the output size.

    ViT-B/32 at 224 px: 7 -> 8 -> 16 -> 32 -> 64 -> 128 -> 224 with 512,512,512,512,256,128,64 channels,
    exactly the reference's schedule.
    """
    if image_size <= grid:
        raise ClipConfigError(f"model.image_size={image_size} must exceed the CLIP patch grid ({grid})")
    sizes = []
    s = 1
    while s <= grid:
        s *= 2
    while s < image_size:
        sizes.append(s)
        s *= 2
    sizes.append(image_size)
    chans = [ngf * min(2**i, 8) for i in range(len(sizes) + 1)][::-1]
    return [(chans[i], chans[i + 1], size) for i, size in enumerate(sizes)]


class NetG(nn.Module):
    """Generator: noise + sentence -> bridge feature -> frozen ViT with prompts -> G blocks -> RGB.

    The frozen CLIP is held by reference, not registered as a submodule: NetG's state_dict, optimiser
    and DDP wrapper then cover exactly the learnable parameters, and CLIP is loaded once.
    """

    def __init__(self, cfg: ModelConfig, clip: FrozenCLIP) -> None:
        super().__init__()
        dims: ClipDims = clip.dims
        object.__setattr__(self, "clip", clip)
        self.cfg = cfg  # with the CLIP, enough to build a twin (the EMA copy)
        self.nz, self.grid, self.code_ch = cfg.nz, dims.grid, cfg.code_channels
        self.n_prompts, self.clip_width = len(clip.prompt_blocks), dims.width
        cond_dim = cfg.nz + dims.embed_dim
        plan = g_block_plan(dims.grid, cfg.image_size, cfg.ngf)

        self.fc_code = nn.Linear(cfg.nz, self.code_ch * dims.grid * dims.grid)
        blocks = [MBlock(self.code_ch, cfg.code_mid_channels, self.code_ch, cond_dim) for _ in range(cfg.mapper_blocks)]
        self.mapper_blocks = nn.ModuleList(blocks)
        self.conv_fuse = nn.Conv2d(self.code_ch, dims.width, 5, 1, 2)
        self.fc_prompt = nn.Linear(cond_dim, dims.width * self.n_prompts)
        self.conv_mapped = nn.Conv2d(dims.width, plan[0][0], 5, 1, 2)
        self.g_blocks = nn.ModuleList([GBlock(cond_dim, i, o, s) for i, o, s in plan])
        self.to_rgb = nn.Sequential(nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(plan[-1][1], 3, 3, 1, 1))

    def forward(self, noise: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        """Images in (unclamped) [-1, 1] range, [B, 3, image_size, image_size]."""
        cond = torch.cat([noise, sent], dim=1)
        x = self.fc_code(noise).view(-1, self.code_ch, self.grid, self.grid)
        for block in self.mapper_blocks:
            x = block(x, cond)
        fused = self.conv_fuse(x)
        prompts = self.fc_prompt(cond).view(-1, self.n_prompts, self.clip_width)
        x = self.conv_mapped(fused + 0.1 * self.clip.map_bridge(fused, prompts))
        if x.device.type == "cpu":
            # oneDNN's CPU convolutions work channels-last; fed NCHW they reorder every activation in and out.
            # The G blocks (the step's largest convolutions) then run 1.1-1.2x faster forward and backward.
            # Same maths; the accumulation order, and so the last bit of a float32 result, may differ.
            x = x.contiguous(memory_format=torch.channels_last)
        for block in self.g_blocks:
            x = block(x, cond)
        return self.to_rgb(x)


class DBlock(nn.Module):
    """x' = shortcut(x) + gamma * convs(x) [+ beta * clip_feat]; gamma, beta start at 0.

    The reference allocates the 1x1 ``conv_s`` even when in == out and then never applies it; it is
    kept (and counted) so reference checkpoints map one-to-one. The trainer's DDP wrapper is told
    to ignore it.
    """

    def __init__(self, fin: int, fout: int, clip_feat: bool) -> None:
        super().__init__()
        self.conv_r = nn.Sequential(
            nn.Conv2d(fin, fout, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(fout, fout, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.conv_s = nn.Conv2d(fin, fout, 1)
        self.learned_shortcut = fin != fout
        self.gamma = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1)) if clip_feat else None

    def forward(self, x: torch.Tensor, clip_feat: torch.Tensor | None = None) -> torch.Tensor:
        out = (self.conv_s(x) if self.learned_shortcut else x) + self.gamma * self.conv_r(x)
        if self.beta is not None:
            out = out + self.beta * clip_feat
        return out

    def unused_parameter_names(self, prefix: str) -> list[str]:
        return [] if self.learned_shortcut else [f"{prefix}conv_s.weight", f"{prefix}conv_s.bias"]


class NetD(nn.Module):
    """Fuses the CLIP patch tokens of several ViT blocks into a [B, ndf*8, g, g] map."""

    def __init__(self, cfg: ModelConfig, dims: ClipDims, n_features: int) -> None:
        super().__init__()
        w = dims.width
        self.blocks = nn.ModuleList([DBlock(w, w, clip_feat=True) for _ in range(n_features - 1)])
        self.main = DBlock(w, cfg.ndf * 8, clip_feat=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats[:, 0]
        for i, block in enumerate(self.blocks):
            x = block(x, feats[:, i + 1])
        return self.main(x)

    def unused_parameter_names(self) -> list[str]:
        names = [n for i, b in enumerate(self.blocks) for n in b.unused_parameter_names(f"blocks.{i}.")]
        return names + self.main.unused_parameter_names("main.")


class NetC(nn.Module):
    """Conditional logit from D's map and the sentence embedding tiled over the grid."""

    def __init__(self, cfg: ModelConfig, dims: ClipDims) -> None:
        super().__init__()
        k1 = min(4, dims.grid)
        k2 = min(4, dims.grid - k1 + 1)
        self.joint_conv = nn.Sequential(
            nn.Conv2d(cfg.ndf * 8 + dims.embed_dim, cfg.ndf * 2, k1, 1, 0, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(cfg.ndf * 2, 1, k2, 1, 0, bias=False),
        )

    def forward(self, d_out: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        s = sent[:, :, None, None].expand(-1, -1, d_out.shape[2], d_out.shape[3])
        return self.joint_conv(torch.cat([d_out, s], dim=1))


def build_nets(cfg: ModelConfig, clip: FrozenCLIP) -> tuple[NetG, NetD, NetC]:
    return NetG(cfg, clip), NetD(cfg, clip.dims, len(clip.feature_blocks)), NetC(cfg, clip.dims)


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
