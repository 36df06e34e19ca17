"""Object storage (S3 and S3-compatibles) through fsspec/s3fs, with a configurable endpoint.

The endpoint comes from the caller (``data.s3_endpoint_url``) or ``AWS_ENDPOINT_URL``; credentials
come from the usual AWS environment/profile chain.

Every call is tried a bounded number of times with exponential backoff (``Retry``), and only here:
botocore's and s3fs's own retry loops are switched off, so an outage costs a known time (by default
1 + 2 + 4 s of waiting) instead of minutes, and ends in one ``StorageError`` line. "Not found" and
"access denied" are answers, not outages: they are never retried.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import UserError
from .redact import redact

log = logging.getLogger("galip.storage")
T = TypeVar("T")


class StorageError(UserError):
    """The object store did not answer (or refused) after the bounded retries."""


@dataclass(frozen=True)
class Retry:
    """``retries`` more tries after the first, waiting ``backoff_s``, 2x, 4x ... between them."""

    retries: int = 3
    backoff_s: float = 1.0

    def call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        t0 = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as exc:  # noqa: BLE001 - classified by the retry loop, re-raised below
                if attempt == self.retries:
                    reason = redact(" ".join(str(exc).split()))[:300]
                    raise StorageError(
                        f"{what} {redact(uri)} failed {attempt + 1} times in {time.monotonic() - t0:.0f} s "
                        f"({type(exc).__name__}: {reason})"
                    ) from None
                delay = self.backoff_s * 2**attempt
                log.debug("%s %s: %s; retry in %.1f s", what, redact(uri), type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(endpoint_url: str = ""):
    import fsspec

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    # One retry loop (Retry) instead of three nested ones; a silent black hole costs 10 s, not 60.
    config_kwargs = {"retries": {"total_max_attempts": 1}, "connect_timeout": 10, "read_timeout": 60}
    # A fresh (uncached) instance: DataLoader workers fork, and a cached client shared across a fork breaks.
    fs = fsspec.filesystem("s3", client_kwargs=client_kwargs, config_kwargs=config_kwargs, skip_instance_cache=True)
    fs.retries = 1  # s3fs's own loop (a class attribute, 5 by default)
    return fs


def upload(local: str | Path, uri: str, endpoint_url: str = "", retry: Retry = Retry()) -> str:
    """Copy a local file to ``uri`` (s3://bucket/key)."""
    fs = s3_filesystem(endpoint_url)
    retry.call("upload to", uri, lambda: fs.put_file(str(local), uri))
    return uri


def download(uri: str, local: str | Path, endpoint_url: str = "", retry: Retry = Retry()) -> Path:
    """Fetch ``uri`` to ``local`` atomically (several local ranks may race for the same file)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    fs = s3_filesystem(endpoint_url)
    try:
        retry.call("download of", uri, lambda: fs.get_file(uri, str(tmp)))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, local)
    return local


def list_names(prefix_uri: str, endpoint_url: str = "", retry: Retry = Retry()) -> list[str]:
    """File names directly under an s3:// prefix (empty if the prefix does not exist yet)."""
    fs = s3_filesystem(endpoint_url)
    prefix = prefix_uri.rstrip("/")
    try:
        return sorted(Path(p).name for p in retry.call("listing of", prefix_uri, lambda: fs.ls(prefix, detail=False)))
    except FileNotFoundError:
        return []
