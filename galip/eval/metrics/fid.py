"""FID: Fréchet distance in the standard (TF-FID port) Inception-v3 pool3 space, via torchmetrics.

Only the standard weights are accepted, from ``eval.inception_weights`` or torch hub's cache; when
neither has them the run stops with instructions instead of downloading or substituting a network
(a FID from other weights is not comparable with anyone's FID).

Note for comparisons with the paper: GALIP's authors used torchvision's Inception, not this
network, so absolute values differ from the paper's table; the protocol is recorded with each number.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import register
from ...errors import MissingInputError
from .base import EvalContext
from .frechet import FrechetMetric

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_FEATURES = 2048


class InceptionWeightsError(MissingInputError):
    """The standard FID Inception weights are not on this machine; the message says how to stage them."""


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(configured: str = "") -> Path:
    """The weights file from ``eval.inception_weights``, else torch hub's cache; never downloads."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        raise InceptionWeightsError(
            f"eval.inception_weights={configured!r}: no such file. Download {INCEPTION_URL} and put it "
            f"there, or set eval.inception_weights='' to use {hub_weights_path()}."
        )
    path = hub_weights_path()
    if path.is_file():
        return path
    raise InceptionWeightsError(
        f"FID needs the standard Inception weights {INCEPTION_FILE}, which are not on this machine and "
        f"are never downloaded at run time. Download them from {INCEPTION_URL} (torch-fidelity's GitHub "
        f"release) and either place the file at {path} (torch hub's cache; TORCH_HOME moves it) or set "
        "eval.inception_weights=/path/to/that/file. To evaluate without them, drop 'fid' from eval.metrics "
        "(fd_clip runs offline)."
    )


def inception_features(weights: Path) -> nn.Module:
    """torchmetrics' never-train Inception-v3 (uint8 in, 2048-d pool3 features out)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)], feature_extractor_weights_path=str(weights)
    )
    net.num_features = INCEPTION_FEATURES  # tells torchmetrics the size without a dummy forward pass
    return net


@register("fid")
def build_fid(ctx: EvalContext) -> FrechetMetric:
    weights = find_inception_weights(ctx.cfg.eval.inception_weights)
    extractor = {
        "feature_extractor": f"inception-v3-compat pool3 ({INCEPTION_FEATURES}-d, torch-fidelity/torchmetrics)",
        "weights": INCEPTION_FILE,
        "input": "uint8 images, bilinear-antialiased to 299 px inside the extractor",
    }
    return FrechetMetric("fid", ctx, inception_features(weights), extractor)
