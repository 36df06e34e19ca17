"""fd_clip: Fréchet distance on CLIP image embeddings of the *evaluation* CLIP.

Not FID: the feature space is a CLIP image tower's projected embedding, so it runs offline with
any open_clip model (pretrained, local checkpoint, or the demo's separately seeded tiny CLIP) and its
values are on a different scale. The evaluation CLIP rather than the training one, because the
generator is optimised against the training CLIP's image embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from ...model.clip import FrozenCLIP
from . import register
from .base import EvalContext, clip_view
from .frechet import FrechetMetric


class ClipImageFeatures(nn.Module):
    """uint8 images -> CLIP's projected image embedding (not normalised), as a torchmetrics feature module."""

    def __init__(self, clip: FrozenCLIP) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = clip.dims.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(clip_view(self.clip, images)).float()


@register("fd_clip")
def build_fd_clip(ctx: EvalContext) -> FrechetMetric:
    e = ctx.cfg.eval
    extractor = {
        "feature_extractor": f"open_clip {e.eval_clip_model} image embedding ({ctx.eval_clip.dims.embed_dim}-d)",
        "weights": e.eval_clip_pretrained or f"random init, seed {e.eval_clip_seed}",
        "input": f"uint8 images, bicubic-antialiased to {ctx.eval_clip.dims.image_size} px, CLIP mean/std",
    }
    return FrechetMetric("fd_clip", ctx, ClipImageFeatures(ctx.eval_clip), extractor)
