"""Process-group set-up from torchrun's environment; a single process when it is unset."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    process_group: bool = False  # a process group (and DDP) even with one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.process_group


class DeviceError(UserError, RuntimeError):
    """A device that is not a device name, or not on this machine."""


def resolve_device(requested: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"{key}={requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{key}={requested!r} but no CUDA device is visible; use {key}=cpu or auto")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        elif dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{key}={requested!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise DeviceError(f"{key}={requested!r}: GALIP trains and samples on cpu or cuda")
    return dev


def init_distributed(requested_device: str = "auto", key: str = "train.device") -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank, key)
    # On GPUs, torchrun with one process runs the same NCCL + DDP path as with eight, so a one-GPU
    # smoke run tests the multi-GPU recipe; on CPU (the demo, tests) one process stays plain.
    group = world > 1 or (device.type == "cuda" and "WORLD_SIZE" in os.environ)
    if group and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=int(os.environ.get("GALIP_DIST_TIMEOUT_MIN", "30"))),
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device, process_group=group)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
