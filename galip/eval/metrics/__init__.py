"""Evaluation metrics behind a small registry (StyleGAN3 ``metric_main`` style).

``eval.metrics`` names registry entries; each entry builds a streaming metric from the evaluation
context and may report several numbers. The names below are the public, stable result keys: the
same in metrics.json, in MLflow and in dvc.yaml.

    fid            -> fid
    fd_clip        -> fd_clip
    clip_score     -> clip_score_train, clip_score_eval, clip_cosine_train, clip_cosine_eval
    (fd_clip, r_precision and the *_eval CLIP scores are not computed while the evaluation CLIP is random)
    r_precision    -> r_precision
    prompt_fidelity-> prompt_fidelity (gate summary), prompt_fidelity_<held_in|held_out>_<all_attrs|attr_mean|attribute> (demo only)
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from ...config import Config, ConfigError
from .base import EvalContext, EvalMetric, SampleBatch

MetricFactory = Callable[[EvalContext], EvalMetric]

_REGISTRY: dict[str, MetricFactory] = {}


def register(name: str) -> Callable[[MetricFactory], MetricFactory]:
    def wrap(factory: MetricFactory) -> MetricFactory:
        if name in _REGISTRY:
            raise ValueError(f"metric {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def known_metrics() -> list[str]:
    return sorted(_REGISTRY)


def check_metric_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown metric(s) {unknown}; known: {known_metrics()}")
    if not names:
        raise ConfigError(f"eval.metrics is empty; choose from {known_metrics()}")


# Results computed from the evaluation CLIP's embeddings, per eval.metrics entry. With random weights
# (eval.eval_clip_pretrained: '') that network knows nothing, and numbers from it would only look like results.
EVAL_CLIP_RESULTS = {"fd_clip": ("fd_clip",), "r_precision": ("r_precision",), "clip_score": ("clip_score_eval", "clip_cosine_eval")}


def eval_clip_is_random(cfg: Config) -> bool:
    return not cfg.eval.eval_clip_pretrained


def without_random_eval_clip(names: Sequence[str], cfg: Config, log: logging.Logger) -> list[str]:
    """``names`` less the metrics that only the evaluation CLIP computes, when it has random weights
    (clip_score then reports its training-CLIP half only); one log line names what is left out."""
    if not eval_clip_is_random(cfg):
        return list(names)
    skipped = [result for name in names for result in EVAL_CLIP_RESULTS.get(name, ())]
    if skipped:
        log.warning(
            "not computed: %s. The evaluation CLIP has random weights (eval.eval_clip_pretrained: ''), so they "
            "would measure nothing; set it to a pretrained tag or checkpoint to get them", ", ".join(skipped)
        )  # fmt: skip
    return [n for n in names if n == "clip_score" or n not in EVAL_CLIP_RESULTS]


def build_metrics(names: Sequence[str], ctx: EvalContext) -> dict[str, EvalMetric]:
    check_metric_names(names)
    return {name: _REGISTRY[name](ctx) for name in dict.fromkeys(names)}


# Importing the metric modules registers them.
from . import clip_score, fd_clip, fid, prompt_fidelity, r_precision  # noqa: E402,F401

__all__ = [
    "EvalContext", "EvalMetric", "SampleBatch", "build_metrics", "check_metric_names", "eval_clip_is_random", "known_metrics",
    "register", "without_random_eval_clip",
]  # fmt: skip
