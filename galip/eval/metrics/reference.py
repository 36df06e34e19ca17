"""The reference set: real images (and captions) read from local webdataset shards, in a fixed order.

Reading is deterministic (shards sorted, no shuffling, no augmentation) so the same manifest always
gives the same reference statistics, and the first ``n`` captions are always the same prompts.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from PIL import Image, ImageOps

from ...config import Config, reference_spec
from ...errors import MissingInputError
from .base import broadcast_object
from .frechet import FrechetStats, RefStatsCache, cache_key, module_fingerprint, reference_stats_from_images

if TYPE_CHECKING:
    from ...train.distributed import DistEnv

log = logging.getLogger("galip.evaluate")

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class ReferenceSetError(MissingInputError):
    """The reference shards are missing or unusable; the message says which setting to fix."""




def list_shards(spec: str, key: str) -> list[Path]:
    """Local .tar files named by a directory or a brace pattern, sorted."""
    if "://" in spec:
        raise ReferenceSetError(
            f"{key}={spec!r}: reference statistics need local shards (their sizes key the cache). "
            "Copy the reference shards to a local folder and set eval.ref_shards to it."
        )
    import braceexpand

    path = Path(spec)
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
    else:
        found = sorted(Path(p) for p in braceexpand.braceexpand(spec) if Path(p).is_file())
    if not found:
        raise ReferenceSetError(
            f"{key}={spec!r}: no .tar shards found. Build them first (galip download) or point "
            "eval.ref_shards at a folder of webdataset shards (jpg + txt members)."
        )
    return found


def shard_manifest(shards: list[Path]) -> list[tuple[str, int]]:
    """(file name, size in bytes) per shard: identifies the reference set for the statistics cache.

    Names and sizes rather than paths, so a copied or moved dataset keeps its cached statistics.
    """
    return [(p.name, p.stat().st_size) for p in shards]


def _samples(shards: list[Path]) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    # Raw bytes only: images are decoded lazily, and only by the rank that uses them. Every rank
    # walks the whole set in the same order (no node/worker splitting): the split is by sample
    # index, so statistics and prompts do not depend on how shards fall across ranks.
    yield from wds.WebDataset(
        [str(p) for p in shards], shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
    )


def _image_bytes(sample: dict[str, Any]) -> bytes | None:
    return next((sample[k] for k in _IMAGE_KEYS if k in sample), None)


def reference_captions(shards: list[Path], n: int) -> list[str]:
    """The first ``n`` captions of the reference set (samples without an image are skipped)."""
    out: list[str] = []
    for sample in _samples(shards):
        if "txt" in sample and _image_bytes(sample) is not None:
            out.append(sample["txt"].decode("utf-8").strip())
            if len(out) == n:
                return out
    raise ReferenceSetError(
        f"the reference set has {len(out)} captioned images, fewer than the {n} prompts asked for "
        "(lower eval.n_samples or use a larger reference set)"
    )


def prepare_image(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image -> uint8 [3, R, R]: centre square crop, bicubic resize (no augmentation)."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.fit(img.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
        return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3).permute(2, 0, 1)


def reference_image_batches(
    shards: list[Path], n: int, resolution: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """uint8 batches of this rank's share (sample i goes to rank i % world_size) of the first ``n`` images.

    Fails if the set has fewer than ``n`` readable images: reference statistics from a silently
    smaller set would not be the protocol that is recorded.
    """
    batch: list[torch.Tensor] = []
    seen = 0
    for sample in _samples(shards):
        data = _image_bytes(sample)
        if data is None:
            continue
        if seen % world_size == rank:
            batch.append(prepare_image(data, resolution))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        seen += 1
        if seen == n:
            break
    if batch:
        yield torch.stack(batch)
    if seen < n:
        raise ReferenceSetError(
            f"the reference set has {seen} images, fewer than the {n} asked for (eval.ref_samples / "
            "eval.n_samples): lower it or use a larger reference set"
        )


class ReferenceStats:
    """Reference-side Fréchet statistics per (metric, feature extractor), computed once and cached.

    Cache key = sha256 of (shard manifest: names + sizes, number of reference images, resolution,
    preprocessing, feature-extractor description, fingerprint of its weights). Rank 0 decides hit or
    miss for everyone; on a miss every rank reads its share of the images and the sums are reduced.
    Shards are listed only when a Fréchet metric first asks, so runs without one need no reference set.
    """

    PREPROCESS = "centre square crop, bicubic resize, uint8"

    def __init__(self, cfg: Config, env: "DistEnv", resolution: int) -> None:
        self.cfg = cfg
        self.env = env
        self.resolution = resolution
        self.n = cfg.eval.ref_samples or cfg.eval.n_samples
        root = cfg.eval.ref_stats_dir or Path(cfg.eval.out_dir).parent / "ref_stats"
        self.cache = RefStatsCache(root)
        self._shards: list[Path] | None = None

    @property
    def shards(self) -> list[Path]:
        if self._shards is None:
            self._shards = list_shards(*reference_spec(self.cfg))
        return self._shards

    def describe(self) -> dict[str, Any]:
        spec, key = reference_spec(self.cfg)
        manifest = shard_manifest(self.shards)
        return {
            "spec": spec,
            "from": key,
            "shards": len(manifest),
            "bytes": sum(size for _, size in manifest),
            "images": self.n,
            "preprocess": self.PREPROCESS,
        }

    def key_parts(self, feature: torch.nn.Module, extractor: dict[str, Any]) -> dict[str, Any]:
        return {
            "manifest": shard_manifest(self.shards),
            "images": self.n,
            "resolution": self.resolution,
            "preprocess": self.PREPROCESS,
            "extractor": extractor,
            "weights": module_fingerprint(feature),
        }

    def __call__(self, metric: str, feature: torch.nn.Module, extractor: dict[str, Any]) -> tuple[FrechetStats, dict[str, Any]]:
        from tqdm.auto import tqdm

        parts = self.key_parts(feature, extractor)
        key = cache_key(parts)
        stats = broadcast_object(self.cache.load(metric, key) if self.env.is_main else None, self.env)
        hit = stats is not None
        if not hit:
            batches = reference_image_batches(
                self.shards, self.n, self.resolution, self.cfg.eval.batch_size, self.env.rank, self.env.world_size
            )
            per_rank = -(-self.n // self.env.world_size)
            bar = tqdm(batches, desc=f"{metric} reference", total=-(-per_rank // self.cfg.eval.batch_size), disable=not self.env.is_main)
            stats = reference_stats_from_images(feature, bar, self.env.device)
            if self.env.is_main:
                self.cache.save(metric, key, stats, parts)
        return stats, {"reference_set": self.describe(), "reference_stats": str(self.cache.path(metric, key)), "cache_hit": hit}
