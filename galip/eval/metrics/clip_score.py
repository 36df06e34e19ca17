"""CLIPScore = 100 · max(cos(image, caption), 0), averaged, from two CLIPs.

- ``_train``: the CLIP the generator was trained against, with the training pipeline's exact image
  preprocessing. The generator optimises this very cosine, so the score is inflated; the raw mean
  cosine (``clip_cosine_train``) is the number GALIP's paper reports.
- ``_eval``: an independently configured evaluation CLIP (``eval.eval_clip_*``), the honest one;
  not computed while that CLIP has random weights.

Cosines come straight from open_clip embeddings: torchmetrics' CLIPScore only drives Hugging Face
CLIP models and does not expose the raw cosine. Averaging (and the cross-rank reduction) is
torchmetrics' MeanMetric.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from ...model.clip import FrozenCLIP
from . import register
from .base import EvalContext, SampleBatch, image_embedding, text_embedding


def clip_cosines(image_emb: torch.Tensor, clip: FrozenCLIP, captions: list[str]) -> torch.Tensor:
    """Cosine of each normalised image embedding with its own caption's embedding."""
    return (image_emb * text_embedding(clip, captions)).sum(-1)


def clip_score(cosines: torch.Tensor) -> torch.Tensor:
    return 100 * cosines.clamp(min=0)


class ClipScore:
    def __init__(self, ctx: EvalContext) -> None:
        from . import eval_clip_is_random

        self.ctx = ctx
        # A random evaluation CLIP scores nothing: its half is left out (see without_random_eval_clip).
        self.which = ("train",) if eval_clip_is_random(ctx.cfg) else ("train", "eval")
        self.score = {w: MeanMetric().to(ctx.device) for w in self.which}
        self.cosine = {w: MeanMetric().to(ctx.device) for w in self.which}
        e = ctx.cfg.eval
        ctx.protocol["clip_score"] = {
            "formula": "100 * max(cos, 0), mean over samples; clip_cosine_* = raw mean cosine",
            "train_clip_preprocess": "the training pipeline's own (model.pixel_norm)",
            "eval_clip": f"{e.eval_clip_model}/{e.eval_clip_pretrained}" if "eval" in self.which else "not used: random weights",
        }

    def update(self, batch: SampleBatch) -> None:
        for which in self.which:
            clip = self.ctx.train_clip if which == "train" else self.ctx.eval_clip
            img = image_embedding(clip, batch.uint8, antialias=False) if which == "train" else self.ctx.eval_image_embedding(batch)
            cos = clip_cosines(img, clip, batch.captions)
            self.cosine[which].update(cos)
            self.score[which].update(clip_score(cos))

    def compute(self) -> dict[str, float]:
        out = {}
        for which in self.which:
            out[f"clip_score_{which}"] = float(self.score[which].compute())
            out[f"clip_cosine_{which}"] = float(self.cosine[which].compute())
        return out


register("clip_score")(ClipScore)
