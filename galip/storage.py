"""Object storage (S3 and S3-compatibles) through fsspec/s3fs, with a configurable endpoint.

The endpoint comes from the caller (``data.s3_endpoint_url``) or ``AWS_ENDPOINT_URL``; credentials
come from the usual AWS environment/profile chain.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(endpoint_url: str = ""):
    import fsspec

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    # A fresh (uncached) instance: DataLoader workers fork, and a cached client shared across a fork breaks.
    return fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint} if endpoint else {}, skip_instance_cache=True)


def upload(local: str | Path, uri: str, endpoint_url: str = "", retries: int = 3) -> str:
    """Copy a local file to ``uri`` (s3://bucket/key), retrying transient errors."""
    fs = s3_filesystem(endpoint_url)
    for attempt in range(retries):
        try:
            fs.put_file(str(local), uri)
            return uri
        except Exception:
            if attempt == retries - 1:
                raise
            time.sleep(2**attempt)
    return uri


def download(uri: str, local: str | Path, endpoint_url: str = "") -> Path:
    """Fetch ``uri`` to ``local`` atomically (several local ranks may race for the same file)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    s3_filesystem(endpoint_url).get_file(uri, str(tmp))
    os.replace(tmp, local)
    return local


def list_names(prefix_uri: str, endpoint_url: str = "") -> list[str]:
    """File names directly under an s3:// prefix (empty if the prefix does not exist yet)."""
    fs = s3_filesystem(endpoint_url)
    try:
        return sorted(Path(p).name for p in fs.ls(prefix_uri.rstrip("/"), detail=False))
    except FileNotFoundError:
        return []
