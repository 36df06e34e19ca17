"""Shared fixtures."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt fails and is recorded: assert the list stays empty."""
    attempts: list = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError(f"test forbids network access (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def write_random_inception_weights(path: Path) -> Path:
    """A structurally valid FID Inception weights file with random values (the real file is not here)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class KeepRandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random initialisation
            return None

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    state = KeepRandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    torch.save(state, path)
    empty.unlink()
    return path


@pytest.fixture
def torch_home_with_inception(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME in a temp dir with random-valued Inception weights staged where FID looks for them."""
    from galip.metrics.fid import INCEPTION_FILE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return write_random_inception_weights(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE)
