"""CLIPScore = 100 · max(cos(image, caption), 0), averaged, from two CLIPs.

- ``_train``: the CLIP the generator was trained against, with the training pipeline's exact image
  preprocessing. The generator optimises this very cosine, so the score is inflated; the raw mean
  cosine (``clip_cosine_train``) is the number GALIP's paper reports.
- ``_eval``: an independently configured evaluation CLIP (``eval.eval_clip_*``), the honest one.

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
        self.ctx = ctx
        self.score = {w: MeanMetric().to(ctx.device) for w in ("train", "eval")}
        self.cosine = {w: MeanMetric().to(ctx.device) for w in ("train", "eval")}
        e = ctx.cfg.eval
        ctx.protocol["clip_score"] = {
            "formula": "100 * max(cos, 0), mean over samples; clip_cosine_* = raw mean cosine",
            "train_clip_preprocess": "the training pipeline's own (model.pixel_norm)",
            "eval_clip": f"{e.eval_clip_model}/{e.eval_clip_pretrained or f'random init, seed {e.eval_clip_seed}'}",
        }

    def update(self, batch: SampleBatch) -> None:
        train_img = image_embedding(self.ctx.train_clip, batch.uint8, antialias=False)
        eval_img = self.ctx.eval_image_embedding(batch)
        for which, clip, img in (("train", self.ctx.train_clip, train_img), ("eval", self.ctx.eval_clip, eval_img)):
            cos = clip_cosines(img, clip, batch.captions)
            self.cosine[which].update(cos)
            self.score[which].update(clip_score(cos))

    def compute(self) -> dict[str, float]:
        out = {}
        for which in ("train", "eval"):
            out[f"clip_score_{which}"] = float(self.score[which].compute())
            out[f"clip_cosine_{which}"] = float(self.cosine[which].compute())
        return out


register("clip_score")(ClipScore)
