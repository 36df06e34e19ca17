"""Evaluation: sampling a trained generator and scoring what it draws.

``generate`` is the one inference path: a checkpoint's NetG plus CLIP text features to images. It
lives here rather than in ``model`` because it loads checkpoints (``train.checkpoint``) and because
evaluation is its main user; the trainer's sample grids, ``galip generate`` and the served MLflow
pyfunc (``ops.serving``) call the same functions, so what is scored is what is served. ``evaluate``
runs ``eval.metrics`` on a checkpoint (torchrun-aware) and writes metrics.json; ``metrics/`` is the
metric registry (FID, fd_clip, CLIP score, R-precision, demo prompt fidelity) with cached reference
statistics; ``grid`` writes labelled PNG grids.
"""
