"""Fréchet distances (FID, FD on CLIP features) through torchmetrics, with cached reference statistics.

Accumulation and the distance itself are torchmetrics' ``FrechetInceptionDistance`` (any feature
module can stand in for Inception). Statistics travel as ``FrechetStats`` (mean, covariance, count)
so the reference side can be cached once per (reference set, feature extractor, resolution) and the
generated side summed across ranks by torchmetrics' own distributed sync.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

# torchmetrics' Fréchet formula (eigenvalue form, numerically safer than scipy's sqrtm). It is private,
# and no public API fits: the only public entry, FrechetInceptionDistance.compute(), needs both image
# sets pushed through update() of one metric object in this process (it takes its output dtype from
# the last update), whereas the reference side here is a cached statistic computed once per reference
# set. torchmetrics has no public function of two Gaussians (torch-fidelity's fid_statistics_to_metric
# is numpy-only and not in its public API either). Pinned by torchmetrics==1.9.0 in pyproject.toml;
# tests/test_metrics.py checks the result against the public compute() on the same images.
from torchmetrics.image.fid import _compute_fid

if TYPE_CHECKING:
    from .base import EvalContext, SampleBatch

CACHE_FORMAT = 1


@dataclass(frozen=True)
class FrechetStats:
    """Gaussian summary of a feature set: what a Fréchet distance needs from one side."""

    mean: torch.Tensor  # [D] float64
    cov: torch.Tensor  # [D, D] float64
    n: int

    @staticmethod
    def from_sums(total: torch.Tensor, outer: torch.Tensor, n: int) -> "FrechetStats":
        """From torchmetrics' running sums (Σx, Σxxᵀ, n); unbiased covariance as torchmetrics computes it."""
        if n < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 samples per side, got {n}")
        mean = (total / n).double().cpu()
        cov = (outer.double().cpu() - n * torch.outer(mean, mean)) / (n - 1)
        return FrechetStats(mean, cov, int(n))


def frechet_distance(a: FrechetStats, b: FrechetStats) -> float:
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)} (stale reference cache?)")
    return float(_compute_fid(a.mean, a.cov, b.mean, b.cov))


class FeatureAccumulator:
    """Running Fréchet statistics of one feature extractor, summed across ranks on ``stats()``.

    ``feature`` takes uint8 images [B, 3, H, W] and returns [B, D] features (torchmetrics' contract
    for a custom ``feature`` module).
    """

    def __init__(self, feature: nn.Module, device: torch.device) -> None:
        # sync_on_compute is irrelevant: compute() is never called, stats() syncs explicitly.
        self.metric = FrechetInceptionDistance(feature=feature, reset_real_features=False).to(device)

    @torch.no_grad()
    def update(self, uint8_images: torch.Tensor) -> None:
        # torchmetrics keeps one feature set per "side"; this accumulator always uses the fake side.
        self.metric.update(uint8_images, real=False)

    def stats(self) -> FrechetStats:
        """Collective under torch.distributed: every rank must call it."""
        m = self.metric
        # metric_state (public): the states FrechetInceptionDistance registers with add_state, summed over ranks here.
        with m.sync_context():
            state = m.metric_state
            return FrechetStats.from_sums(state["fake_features_sum"], state["fake_features_cov_sum"], int(state["fake_features_num_samples"]))


def module_fingerprint(module: nn.Module) -> str:
    """A short identity of a network's weights (names, shapes, per-tensor sums).

    Reference statistics depend on the exact weights, not just a model name: a random-weight CLIP
    or a retrained local checkpoint under the same name must not reuse another's cache.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not torch.is_tensor(t) or not t.is_floating_point():
                continue
            t = t.detach().double()
            h.update(f"{name}:{tuple(t.shape)}:{t.sum().item():.10e}:{t.abs().sum().item():.10e};".encode())
    return h.hexdigest()[:16]


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class RefStatsCache:
    """Reference statistics on disk as ``<metric>-<key>.pt`` (mean, cov, n, and what produced them)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, metric: str, key: str) -> Path:
        return self.root / f"{metric}-{key}.pt"

    def load(self, metric: str, key: str) -> FrechetStats | None:
        path = self.path(metric, key)
        if not path.is_file():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != CACHE_FORMAT:
            return None
        return FrechetStats(blob["mean"], blob["cov"], int(blob["n"]))

    def save(self, metric: str, key: str, stats: FrechetStats, parts: dict[str, Any]) -> Path:
        path = self.path(metric, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        blob = {"format": CACHE_FORMAT, "mean": stats.mean, "cov": stats.cov, "n": stats.n, "key": json.dumps(parts, default=str)}
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: concurrent evaluations never read half a file
        return path


def reference_stats_from_images(feature: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> FrechetStats:
    """Statistics of uint8 image batches (this rank's share; summed over ranks)."""
    acc = FeatureAccumulator(feature, device)
    for images in batches:
        acc.update(images.to(device))
    return acc.stats()


class FrechetMetric:
    """A registry metric: Fréchet distance between generated images and the reference set.

    ``extractor`` describes the feature network for the recorded protocol and the cache key; the
    weights themselves enter the key through ``module_fingerprint``.
    """

    def __init__(self, name: str, ctx: "EvalContext", feature: nn.Module, extractor: dict[str, Any]) -> None:
        self.name = name
        self.ctx = ctx
        self.feature = feature
        self.extractor = extractor
        self.acc = FeatureAccumulator(feature, ctx.device)

    def update(self, batch: "SampleBatch") -> None:
        self.acc.update(batch.uint8)

    def compute(self) -> dict[str, float]:
        fake = self.acc.stats()
        ref, where = self.ctx.reference_stats(self.name, self.feature, self.extractor)
        self.ctx.protocol[self.name] = {
            **self.extractor,
            "resolution": self.ctx.resolution,
            "generated_images": fake.n,
            "reference_images": ref.n,
            **where,
        }
        return {self.name: frechet_distance(ref, fake)}
