"""Parameter and shape summary of the GALIP networks for a given CLIP and output size."""

from __future__ import annotations

from .clip import clip_from_config
from ..config import ModelConfig
from .models import build_nets, count_params


def summarize(model_cfg: ModelConfig) -> dict:
    clip = clip_from_config(model_cfg)
    net_g, net_d, net_c = build_nets(model_cfg, clip)
    vit = clip.visual
    return {
        "netG": count_params(net_g),
        "netD": count_params(net_d),
        "netC": count_params(net_c),
        "clip_frozen": count_params(clip, trainable_only=False),
        "clip_vit_in_G_frozen": sum(p.numel() for n, p in vit.named_parameters() if not n.startswith(("ln_post", "proj"))),
        "learnable_total": count_params(net_g) + count_params(net_d) + count_params(net_c),
        "clip_model": model_cfg.clip_model,
        "image_size": model_cfg.image_size,
        "clip_width": clip.dims.width,
        "clip_grid": clip.dims.grid,
        "clip_depth": clip.dims.depth,
        "embed_dim": clip.dims.embed_dim,
        "feature_blocks": list(clip.feature_blocks),
        "prompt_blocks": list(clip.prompt_blocks),
    }
