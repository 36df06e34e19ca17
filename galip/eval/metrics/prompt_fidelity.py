"""prompt_fidelity (demo data set): do generated scenes show what their prompts say?

A decoder reads each attribute of a procedural demo scene back from pixels with measurements that
follow from how ``galip.data.demo_data.render_scene`` draws:

- colour: median RGB of the foreground (pixels far from the border's background colour);
- count: connected components of the foreground (specks below a minimum area ignored);
- position: centroid of the foreground;
- size: mean component area;
- shape: mean fill ratio of the components (area / bounding box: square ~1, circle ~pi/4, triangle
  ~1/2) and how the mass splits between the top and bottom of each bounding box.

Measurements map to attribute values by nearest class mean (per-feature standardised), with the class
means measured on freshly rendered scenes, so the decoder follows the renderer's exact geometry and
palette instead of hard-coding them. Its accuracy on another set of fresh renders is recorded in the
protocol: a decoder that cannot read the renderer's own images would make the metric meaningless, so
evaluation fails if any attribute reads below ``MIN_DECODER_ACCURACY``.

Prompts fall into two splits by their colour+shape pair (``galip.data.demo_data.HELD_OUT_PAIRS``):
``held_in`` (pairs the training data shows) and ``held_out`` (pairs it never shows). Per split, in
percent of generated images:

- ``prompt_fidelity_<split>_all_attrs``: every attribute the prompt states is right;
- ``prompt_fidelity_<split>_<attribute>``: that attribute is right (over prompts stating it);
- ``prompt_fidelity_<split>_attr_mean``: the mean of the five per-attribute shares.

``prompt_fidelity``, the demo's gate metric, is ``HEADLINE``: half the held-in attribute mean (does G
follow each attribute it was taught?) plus half the held-out all-attributes share (does it compose
unseen pairs?). It moves with either; 100 means both are perfect. Being half a per-attribute mean, it
is usually above both all-attributes shares.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torchmetrics import MeanMetric

from ..formulas import SUMMARY_FORMULAS
from . import register
from .base import EvalContext, SampleBatch, to_uint8

if TYPE_CHECKING:
    from ...model.clip import FrozenCLIP
    from ...model.models import NetG

log = logging.getLogger("galip.evaluate")

ATTRIBUTES = ("shape", "colour", "position", "size", "count")
SPLITS = ("held_in", "held_out")
MIN_DECODER_ACCURACY = 0.95
_FOREGROUND_DISTANCE = 60.0  # max-channel distance from the background colour, in 0..255


@dataclass(frozen=True)
class SceneMeasurements:
    """What the pixels say, per attribute: one feature vector each (None: no foreground found)."""

    features: dict[str, np.ndarray] | None


def measure(image: np.ndarray) -> SceneMeasurements:
    """Measure one uint8 [H, W, 3] image."""
    from scipy import ndimage

    h, w, _ = image.shape
    px = image.astype(np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(px - background).max(axis=-1) > _FOREGROUND_DISTANCE
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    min_area = max(4, int(0.002 * h * w))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = [i + 1 for i in range(n) if areas[i] >= min_area]
    if not keep:
        return SceneMeasurements(None)
    fills, top_shares, comp_areas = [], [], []
    boxes = ndimage.find_objects(labels)
    for idx in keep:
        sl = boxes[idx - 1]
        comp = labels[sl] == idx
        area = comp.sum()
        comp_areas.append(area / (h * w))
        fills.append(area / comp.size)
        half = comp.shape[0] // 2
        top_shares.append(comp[:half].sum() / max(area, 1))
    fg = np.isin(labels, keep)
    ys, xs = np.nonzero(fg)
    features = {
        "colour": np.median(px[fg], axis=0) / 255.0,
        "count": np.array([len(keep)], np.float32),
        "position": np.array([xs.mean() / w, ys.mean() / h], np.float32),
        "size": np.array([np.sqrt(np.mean(comp_areas))], np.float32),
        "shape": np.array([np.mean(fills), np.mean(top_shares)], np.float32),
    }
    return SceneMeasurements(features)


class NearestMeans:
    """Nearest class mean on standardised features; fitted on rendered scenes."""

    def __init__(self, features: np.ndarray, labels: Sequence[Any]) -> None:
        self.classes = list(dict.fromkeys(labels))
        self.scale = features.std(axis=0) + 1e-6
        lab = np.array([self.classes.index(v) for v in labels])
        self.means = np.stack([features[lab == i].mean(axis=0) for i in range(len(self.classes))]) / self.scale

    def predict(self, feature: np.ndarray) -> Any:
        return self.classes[int(np.argmin(((self.means - feature / self.scale) ** 2).sum(axis=1)))]


def _random_attrs(demo: Any, rng: np.random.Generator) -> Any:
    def pick(values: Any) -> Any:
        values = list(values)
        return values[rng.integers(len(values))]

    return demo.SceneAttributes(
        shape=pick(demo.SHAPES), colour=pick(demo.COLOURS), position=pick(demo.POSITIONS),
        size=pick(demo.SIZES), count=pick(demo.COUNTS),
    )


class SceneDecoder:
    """Reads SceneAttributes back from images of the demo renderer (see the module docstring)."""

    def __init__(self, classifiers: dict[str, NearestMeans]) -> None:
        self.classifiers = classifiers

    @classmethod
    def calibrate(cls, image_size: int, n: int = 400, seed: int = 0) -> "SceneDecoder":
        from ...data import demo_data

        rng = np.random.default_rng(seed)
        feats: dict[str, list[np.ndarray]] = {a: [] for a in ATTRIBUTES}
        labels: dict[str, list[Any]] = {a: [] for a in ATTRIBUTES}
        for _ in range(n):
            attrs = _random_attrs(demo_data, rng)
            m = measure(np.asarray(demo_data.render_scene(attrs, image_size, rng).convert("RGB")))
            if m.features is None:
                continue
            for a in ATTRIBUTES:
                feats[a].append(m.features[a])
                labels[a].append(getattr(attrs, a))
        return cls({a: NearestMeans(np.stack(feats[a]), labels[a]) for a in ATTRIBUTES})

    def decode(self, image: np.ndarray) -> dict[str, Any]:
        """Attribute -> decoded value (None for every attribute when the image shows no scene)."""
        m = measure(image)
        if m.features is None:
            return {a: None for a in ATTRIBUTES}
        return {a: self.classifiers[a].predict(m.features[a]) for a in ATTRIBUTES}

    def accuracy_on_renders(self, image_size: int, n: int = 200, seed: int = 1) -> dict[str, float]:
        """Per-attribute accuracy on fresh renders (a different seed from calibration)."""
        from ...data import demo_data

        rng = np.random.default_rng(seed)
        hits = {a: 0 for a in ATTRIBUTES}
        for _ in range(n):
            attrs = _random_attrs(demo_data, rng)
            got = self.decode(np.asarray(demo_data.render_scene(attrs, image_size, rng).convert("RGB")))
            for a in ATTRIBUTES:
                hits[a] += got[a] == getattr(attrs, a)
        return {a: hits[a] / n for a in ATTRIBUTES}


def attribute_matches(decoded: dict[str, Any], wanted: Any) -> dict[str, bool | None]:
    """Per attribute: match (bool), or None where the prompt does not state it."""
    out: dict[str, bool | None] = {}
    for a in ATTRIBUTES:
        value = getattr(wanted, a, None)
        out[a] = None if value is None else decoded[a] == value
    return out


def split_of(wanted: Any) -> str:
    """``held_out`` when the prompt's colour+shape pair never occurs in the training data."""
    from ...data.demo_data import HELD_OUT_PAIRS

    return "held_out" if (wanted.colour, wanted.shape) in HELD_OUT_PAIRS else "held_in"


# How the headline is made, in the names a user sees (the gate's description quotes it).
HEADLINE = SUMMARY_FORMULAS["prompt_fidelity"]


def attr_mean(results: dict[str, float], split: str) -> float:
    return sum(results[f"prompt_fidelity_{split}_{a}"] for a in ATTRIBUTES) / len(ATTRIBUTES)


def summary_score(results: dict[str, float]) -> float:
    """``prompt_fidelity`` (HEADLINE)."""
    return 0.5 * attr_mean(results, "held_in") + 0.5 * results["prompt_fidelity_held_out_all_attrs"]


@functools.lru_cache(maxsize=4)
def checked_decoder(image_size: int) -> tuple[SceneDecoder, dict[str, float]]:
    """The calibrated decoder for ``image_size`` px and its accuracy on fresh renders (cached: deterministic)."""
    decoder = SceneDecoder.calibrate(image_size)
    return decoder, check_decoder(decoder, image_size)


def check_decoder(decoder: SceneDecoder, image_size: int) -> dict[str, float]:
    accuracy = decoder.accuracy_on_renders(image_size)
    weak = {a: acc for a, acc in accuracy.items() if acc < MIN_DECODER_ACCURACY}
    if weak:
        raise RuntimeError(
            f"prompt_fidelity: the scene decoder reads rendered {image_size} px demo scenes with accuracy "
            f"{weak} (< {MIN_DECODER_ACCURACY}); the metric would be meaningless at this resolution. "
            "Drop prompt_fidelity from eval.metrics or raise model.image_size."
        )
    return accuracy


def score_images(decoder: SceneDecoder, images: np.ndarray, wanted: Sequence[Any]) -> dict[str, list[float]]:
    """Per-sample scores (0 or 100) of uint8 [N, H, W, 3] images under ``prompt_fidelity_<split>_<all_attrs|attribute>`` keys."""
    scores: dict[str, list[float]] = {}
    for image, target in zip(images, wanted):
        split = split_of(target)
        matches = attribute_matches(decoder.decode(image), target)
        stated = [ok for ok in matches.values() if ok is not None]
        scores.setdefault(f"prompt_fidelity_{split}_all_attrs", []).append(100.0 * all(stated))
        for a, ok in matches.items():
            if ok is not None:
                scores.setdefault(f"prompt_fidelity_{split}_{a}", []).append(100.0 * ok)
    return scores


def scored_keys() -> list[str]:
    """The shares averaged over images (``score_images``'s keys)."""
    return [f"prompt_fidelity_{s}_{part}" for s in SPLITS for part in ("all_attrs", *ATTRIBUTES)]


def result_keys() -> list[str]:
    return ["prompt_fidelity", *(f"prompt_fidelity_{s}_attr_mean" for s in SPLITS), *scored_keys()]


class PromptFidelity:
    def __init__(self, ctx: EvalContext, decoder_factory: Callable[[int], SceneDecoder] | None = None) -> None:
        from ...data.demo_data import parse_caption

        self.ctx = ctx
        self.parse_caption = parse_caption
        if decoder_factory is None:
            self.decoder, accuracy = checked_decoder(ctx.resolution)
        else:
            self.decoder = decoder_factory(ctx.resolution)
            accuracy = check_decoder(self.decoder, ctx.resolution)
        self.means = {k: MeanMetric().to(ctx.device) for k in scored_keys()}
        ctx.protocol["prompt_fidelity"] = {
            "scorer": "pixel decoder of galip.data.demo_data.render_scene (colour, components, centroid, area, fill ratio)",
            "decoder_accuracy_on_renders": accuracy,
            "score": "percent of images whose every stated attribute matches the prompt, per split "
            "(held_in / held_out colour+shape pairs) and per attribute",
            "prompt_fidelity": HEADLINE,
        }

    def update(self, batch: SampleBatch) -> None:
        wanted = batch.attrs or [self.parse_caption(c) for c in batch.captions]
        scores = score_images(self.decoder, batch.uint8.permute(0, 2, 3, 1).cpu().numpy(), wanted)
        for key, values in scores.items():
            self.means[key].update(torch.tensor(values, device=self.ctx.device))

    def compute(self) -> dict[str, float]:
        # Every rank computes every key (a collective); one no prompt stated on any rank stays NaN
        # rather than a made-up 0 or 100.
        out = {k: float(m.compute()) for k, m in self.means.items()}
        means = {f"prompt_fidelity_{s}_attr_mean": attr_mean(out, s) for s in SPLITS}
        return {"prompt_fidelity": summary_score(out), **means, **out}


register("prompt_fidelity")(PromptFidelity)
