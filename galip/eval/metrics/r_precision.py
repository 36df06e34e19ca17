"""R-precision (AttnGAN's text-image retrieval score), with the evaluation CLIP.

For each generated image its true caption is ranked among ``eval.r_precision_candidates`` captions
(itself + distractors drawn from the evaluation prompts) by cosine; the score is the top-1 rate in
percent. Distractors never share the true prompt's meaning: prompts with equal demo attributes (or,
without attributes, equal text) are excluded, so a paraphrase is not counted as a wrong answer.
Distractors are drawn per sample from (eval.seed, sample index): the score does not depend on the
number of ranks or the batch size.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np
import torch
from torchmetrics import MeanMetric

from . import register
from .base import EvalContext, SampleBatch, text_embedding


class DistractorSampler:
    """Per-sample distractor indices into a caption pool, never from the true caption's meaning group."""

    def __init__(self, meanings: Sequence[Hashable], wanted: int, seed: int) -> None:
        ids = {m: g for g, m in enumerate(dict.fromkeys(meanings))}
        self.group = np.array([ids[m] for m in meanings])
        self.group_size = np.bincount(self.group)
        self.seed = seed
        # Fewer distinct meanings than candidates asked for: rank among all there are, and say so.
        self.k = min(wanted, int(len(self.group) - self.group_size.max()))
        if self.k < 1:
            raise ValueError(
                "r_precision needs prompts with at least two different meanings; raise eval.n_samples "
                "or drop r_precision from eval.metrics"
            )

    def __call__(self, true: int, sample_index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, sample_index])
        g = self.group[true]
        # Over-draw by the true group's size, then drop same-meaning captions: always k left.
        draw = rng.choice(len(self.group), size=min(len(self.group), self.k + self.group_size[g]), replace=False)
        return draw[self.group[draw] != g][: self.k]


def top1_hit(image: torch.Tensor, pool: torch.Tensor, true: int, distractors: torch.Tensor) -> bool:
    """Does the true caption out-score every distractor? Ties count as misses."""
    # One matmul for all candidates, so equal captions give bit-identical scores.
    sims = pool[torch.cat([torch.tensor([true], device=distractors.device), distractors])] @ image
    return bool((sims[1:] < sims[0]).all())


class RPrecision:
    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx
        captions = list(dict.fromkeys(ctx.prompts))
        self.index = {c: i for i, c in enumerate(captions)}
        attrs = [repr(a) for a in ctx.prompt_attrs] if ctx.prompt_attrs else ctx.prompts
        meaning = dict(zip(ctx.prompts, attrs))
        self.sampler = DistractorSampler([meaning[c] for c in captions], ctx.cfg.eval.r_precision_candidates - 1, ctx.cfg.eval.seed)
        self.pool = text_embedding(ctx.eval_clip, captions)
        self.hits = MeanMetric().to(ctx.device)
        ctx.protocol["r_precision"] = {
            "clip": "eval",
            "candidates": self.sampler.k + 1,
            "distinct_prompts": len(captions),
            "score": "top-1 rate of the true caption among the candidates, percent",
        }

    def update(self, batch: SampleBatch) -> None:
        images = self.ctx.eval_image_embedding(batch)
        hits = []
        for img, caption, sample_index in zip(images, batch.captions, batch.index.tolist()):
            true = self.index[caption]
            others = torch.from_numpy(self.sampler(true, sample_index)).to(self.pool.device)
            hits.append(top1_hit(img, self.pool, true, others))
        self.hits.update(100.0 * torch.tensor(hits, dtype=torch.float32, device=self.ctx.device))

    def compute(self) -> dict[str, float]:
        return {"r_precision": float(self.hits.compute())}


register("r_precision")(RPrecision)
