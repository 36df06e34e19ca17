"""galip-mlops: GALIP (Tao et al., CVPR 2023) training, evaluation and serving."""

__version__ = "0.1.0"
