"""galip-mlops: GALIP (Tao et al., CVPR 2023) training, evaluation and serving.

Subpackages: ``model`` (frozen CLIP, NetG/NetD/NetC, losses), ``data`` (download,
loader, demo scenes), ``train`` (trainer, checkpoints, distributed), ``eval`` (generation, metrics),
``ops`` (registry, serving, tracking, storage, Kubernetes). ``cli`` sits on top of all of them and
nothing in the package imports it; ``config`` and ``errors`` are shared by every layer.
"""

__version__ = "0.1.0"
