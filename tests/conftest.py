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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port with dummy credentials; yields the endpoint URL."""
    import os

    from moto.server import ThreadedMotoServer

    port = free_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    # Dummy credentials, or boto3 walks the provider chain up to the cloud metadata address.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields (endpoint_url, bucket name)."""
    import uuid

    import boto3

    name = f"galip-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return s3_server, name
