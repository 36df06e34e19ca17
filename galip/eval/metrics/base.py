"""What every metric sees: a batch of generated samples and the evaluation context around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from ...model.clip import FrozenCLIP
from ...config import Config
from ...train.distributed import DistEnv


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], the values a saved PNG would hold.

    Metrics see generated images exactly as they would be after writing them to disk (StyleGAN's
    convention), so generated and real (JPEG-decoded) images go through the same quantisation.
    """
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


@dataclass
class SampleBatch:
    """Generated images with the prompts that produced them.

    ``index`` holds each sample's position in the global prompt list, so metrics that need a
    per-sample random choice (R-precision's distractors) are independent of how samples are split
    across ranks. Embeddings several metrics share are computed once per batch via ``cached``.
    """

    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    captions: list[str]
    index: torch.Tensor  # [B] global sample indices
    attrs: list[Any] | None = None  # demo SceneAttributes, when the prompts come with them
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @cached_property
    def uint8(self) -> torch.Tensor:
        return to_uint8(self.images)

    def cached(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def clip_view(clip: FrozenCLIP, uint8_images: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """uint8 images as [-1, 1] floats for ``clip.encode_image``.

    ``antialias`` resizes to CLIP's input size with antialiased bicubic (the usual evaluation
    preprocessing); without it FrozenCLIP applies the training pipeline's own resize, which is what
    the generator was optimised against (and what the paper's CLIP score used).
    """
    x = from_uint8(uint8_images)
    size = clip.dims.image_size
    if antialias and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    return x


@torch.no_grad()
def image_embedding(clip: FrozenCLIP, uint8_images: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """L2-normalised CLIP image embeddings of uint8 images."""
    return F.normalize(clip.encode_image(clip_view(clip, uint8_images, antialias)).float(), dim=-1)


@torch.no_grad()
def text_embedding(clip: FrozenCLIP, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised CLIP sentence embeddings, encoded in chunks of ``batch_size``."""
    device = clip.mean.device
    out = []
    for i in range(0, len(captions), batch_size):
        sent, _ = clip.encode_text(clip.tokenize(list(captions[i : i + batch_size])).to(device))
        out.append(F.normalize(sent.float(), dim=-1))
    return torch.cat(out)


class ReferenceStatsProvider(Protocol):
    def __call__(self, metric: str, feature: torch.nn.Module, feature_id: dict[str, Any]) -> Any: ...


@dataclass
class EvalContext:
    """Models, prompts and settings shared by the metrics of one evaluation.

    The evaluation CLIP is loaded on first use: a run that asks only for FID never loads it.
    """

    cfg: Config  # the evaluation's configuration (eval/data sections); model comes from the checkpoint
    env: DistEnv
    train_clip: FrozenCLIP
    prompts: list[str]  # every sample's caption, identical on all ranks
    resolution: int  # generated (and reference) image side, pixels
    reference_stats: ReferenceStatsProvider
    load_eval_clip: Callable[[], FrozenCLIP]
    prompt_attrs: list[Any] | None = None  # demo: SceneAttributes per prompt
    protocol: dict[str, Any] = field(default_factory=dict)  # filled by the metrics: how numbers were made

    @property
    def device(self) -> torch.device:
        return self.env.device

    @cached_property
    def eval_clip(self) -> FrozenCLIP:
        return self.load_eval_clip().to(self.device)

    def eval_image_embedding(self, batch: SampleBatch) -> torch.Tensor:
        return batch.cached("eval_clip_image", lambda: image_embedding(self.eval_clip, batch.uint8))


class EvalMetric(Protocol):
    """A streaming metric: ``update`` per generated batch on every rank, ``compute`` once (collective)."""

    def update(self, batch: SampleBatch) -> None: ...

    def compute(self) -> dict[str, float]: ...


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (a no-op in a single process)."""
    if not env.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
