"""Object storage (S3 and S3-compatibles) through fsspec/s3fs, with a configurable endpoint.

The endpoint comes from the caller (``data.s3_endpoint_url``) or ``AWS_ENDPOINT_URL``; credentials
come from the usual AWS environment/profile chain.

Every call is tried a bounded number of times with exponential backoff (``Retry``), and only here:
botocore's and s3fs's own retry loops are switched off. Each try waits at most ``CONNECT_TIMEOUT_S`` for
a connection and ``READ_TIMEOUT_S`` for an answer, so one call to an endpoint that accepts connections
and never answers costs at most (retries + 1) x 60 s plus the backoff: 247 s with 3 retries and 1 s
backoff. A ``Retry`` with ``deadline_s`` (``train.storage_deadline_s``) bounds the whole call instead: the
time left (less the backoff waits) is shared by the tries left, and no try starts after the deadline;
with the defaults (60 s, 3 retries, 1 s backoff) a black hole gets 4 tries of 13 s. The first failed
try says, once, what is retried and for how long at most; an exhausted call ends in one
``StorageError`` line. "Not found" and "access denied" are answers, not outages: they are never retried.
"""

from __future__ import annotations

import logging
import math
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


# One try's bounds (botocore's connect_timeout / read_timeout): a read waits for the answer to a
# request, so a listing of a large prefix or an upload's final response must fit in it.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Retry:
    """``retries`` more tries after the first, waiting ``backoff_s``, 2x, 4x ... between them; with
    ``deadline_s`` > 0 the whole call (tries, waits, timeouts) ends within it."""

    retries: int = 3
    backoff_s: float = 1.0
    deadline_s: float = 0.0

    def bound_s(self) -> float:
        """The longest a call can take against a black hole."""
        worst = (self.retries + 1) * READ_TIMEOUT_S + self.backoff_s * (2**self.retries - 1)
        return min(worst, self.deadline_s) if self.deadline_s > 0 else worst

    def call(self, what: str, uri: str, fn: Callable[[float], T]) -> T:
        """``fn(timeout_s)`` is one try, given the longest it may wait for an answer."""
        t0 = time.monotonic()
        end = t0 + self.deadline_s if self.deadline_s > 0 else math.inf
        for attempt in range(self.retries + 1):
            try:
                # What is left of the deadline, less the waits still to come, shared by the tries still to
                # come: a black hole cannot eat the whole deadline in one try.
                waits = self.backoff_s * (2**self.retries - 2**attempt)
                share = (end - time.monotonic() - waits) / (self.retries + 1 - attempt)
                return fn(min(READ_TIMEOUT_S, max(share, 1.0)))
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as exc:  # noqa: BLE001 - classified by the retry loop, re-raised below
                delay = self.backoff_s * 2**attempt
                left = end - time.monotonic()
                if attempt == self.retries or left <= delay:
                    reason = redact(" ".join(str(exc).split()))[:300]
                    raise StorageError(
                        f"{what} {redact(uri)} failed {attempt + 1} times in {time.monotonic() - t0:.0f} s "
                        f"({type(exc).__name__}: {reason})"
                    ) from None
                if attempt == 0:
                    log.warning(
                        "%s %s did not succeed (%s); retrying up to %d more time(s), for at most %.0f s more",
                        what, redact(uri), type(exc).__name__, self.retries, min(left, self.retries * READ_TIMEOUT_S + self.backoff_s * (2**self.retries - 1)),
                    )  # fmt: skip
                else:
                    log.debug("%s %s: %s; retry in %.1f s", what, redact(uri), type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(endpoint_url: str = "", timeout_s: float = READ_TIMEOUT_S):
    import fsspec

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    # One retry loop (Retry) instead of three nested ones, and each try bounded by the timeouts.
    config_kwargs = {"retries": {"total_max_attempts": 1}, "connect_timeout": min(CONNECT_TIMEOUT_S, timeout_s), "read_timeout": timeout_s}
    # A fresh (uncached) instance: DataLoader workers fork, and a cached client shared across a fork breaks.
    fs = fsspec.filesystem("s3", client_kwargs=client_kwargs, config_kwargs=config_kwargs, skip_instance_cache=True)
    fs.retries = 1  # s3fs's own loop (a class attribute, 5 by default)
    return fs


def upload(local: str | Path, uri: str, endpoint_url: str = "", retry: Retry = Retry()) -> str:
    """Copy a local file to ``uri`` (s3://bucket/key)."""
    retry.call("upload to", uri, lambda t: s3_filesystem(endpoint_url, t).put_file(str(local), uri))
    return uri


def download(uri: str, local: str | Path, endpoint_url: str = "", retry: Retry = Retry()) -> Path:
    """Fetch ``uri`` to ``local`` atomically (several local ranks may race for the same file)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    try:
        retry.call("download of", uri, lambda t: s3_filesystem(endpoint_url, t).get_file(uri, str(tmp)))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, local)
    return local


def list_names(prefix_uri: str, endpoint_url: str = "", retry: Retry = Retry()) -> list[str]:
    """File names directly under an s3:// prefix (empty if the prefix does not exist yet)."""
    prefix = prefix_uri.rstrip("/")
    try:
        return sorted(Path(p).name for p in retry.call("listing of", prefix_uri, lambda t: s3_filesystem(endpoint_url, t).ls(prefix, detail=False)))
    except FileNotFoundError:
        return []


def read_text(uri: str, endpoint_url: str = "", retry: Retry = Retry()) -> str | None:
    """A small object's text, or None when there is no such object."""
    try:
        return retry.call("read of", uri, lambda t: s3_filesystem(endpoint_url, t).cat_file(uri)).decode()
    except FileNotFoundError:
        return None


def write_text(uri: str, text: str, endpoint_url: str = "", retry: Retry = Retry()) -> None:
    retry.call("write of", uri, lambda t: s3_filesystem(endpoint_url, t).pipe_file(uri, text.encode()))
