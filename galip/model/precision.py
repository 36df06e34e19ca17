"""Numeric precision of training and inference: autocast dtype, loss scaling, low-precision CLIP.

``train.precision`` names one of three recipes:

- ``bf16``: autocast to bfloat16, frozen CLIP weights cast to bfloat16 once, no loss scaling
  (the default on GPUs that have bf16);
- ``fp16``: the reference's recipe (tobran/GALIP): float16 autocast, float16 CLIP weights, a GradScaler
  per optimiser with growth interval 2000, and the reference's floor: whenever a scale falls below 64
  it is reset to 16384;
- ``fp32``: plain float32 (TF32 matmuls on CUDA when ``train.tf32``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# The reference (code/lib/modules.py): GradScaler(growth_interval=2000); after each update, a scale
# below scaler_min=64 is reset to 16384 so that a burst of overflows cannot push it to zero.
FP16_GROWTH_INTERVAL = 2000
FP16_SCALE_FLOOR = 64.0
FP16_SCALE_RESET = 16384.0

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str  # cuda | cpu

    @staticmethod
    def resolve(name: str, device: torch.device) -> "Precision":
        """``auto`` -> bf16 on CUDA devices that have it (else fp16), fp32 on CPU."""
        if name == "auto":
            if device.type == "cuda":
                name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                name = "fp32"
        if name not in _DTYPES:
            raise ValueError(f"train.precision={name!r}: expected auto, fp32, bf16 or fp16")
        return Precision(name, device.type)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast / CLIP weight dtype; None for plain fp32."""
        return _DTYPES[self.name]

    @property
    def use_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler as the reference configures it (disabled, i.e. a no-op, unless fp16)."""
        return torch.amp.GradScaler(self.device_type, growth_interval=FP16_GROWTH_INTERVAL, enabled=self.use_scaler)


def apply_scale_floor(scaler: torch.amp.GradScaler, floor: float = FP16_SCALE_FLOOR, reset: float = FP16_SCALE_RESET) -> None:
    """The reference's floor: after ``scaler.update()``, a scale below ``floor`` becomes ``reset``.

    Done on the device (a ``where`` fed back through ``update(new_scale)``) so the train step never
    waits for the GPU; the reference reads the scale on the host every step.
    """
    if not scaler.is_enabled():
        return
    # GradScaler has no public accessor for the scale as a tensor (get_scale() copies it to the host).
    scale = scaler._get_scale_async()
    scaler.update(torch.where(scale < floor, torch.full_like(scale, reset), scale))


def enable_fast_cuda_math(tf32: bool, cudnn_benchmark: bool) -> None:
    """TF32 tensor-core matmuls/convolutions for fp32 work, and cuDNN's per-shape algorithm search."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
