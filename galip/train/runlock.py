"""One writer per ``train.out_dir``: an exclusive ``flock`` on ``<out_dir>/.lock`` for the run's life.

The kernel drops the lock when its process ends, however it ends (kill -9 included), so a lock
left by a dead run never blocks the next one; the owner line it left (pid, host, start time; cleared
on every orderly exit) tells the next run that its predecessor was killed. flock works across the processes of one machine
and on NFS (Linux emulates it with POSIX locks there), which is what a shared runs volume is.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("galip.runlock")
LOCK_FILE = ".lock"


class RunLockedError(UserError):
    """Another live process is writing to this out_dir."""


def prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"train.out_dir={out_dir} is a file; set train.out_dir to a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def run_lock(out_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the out_dir lock (when ``enabled``: rank 0 only); refuse at once if another process holds it."""
    if not enabled:
        yield
        return
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir)
    fh = open(out_dir / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            raise RunLockedError(
                f"train.out_dir={out_dir} is in use by {owner}; wait for that run to end, "
                "or set train.out_dir to another folder"
            ) from None
        fh.seek(0)
        previous = fh.read().strip()
        if previous:
            log.warning("the previous run in %s (%s) was killed before it finished; the system released its lock", out_dir, previous)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        fh.seek(0)
        fh.truncate()
        fh.write(f"galip train pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()  # empty: the last owner ended (normally or by an exception), it was not killed
    finally:
        fh.close()
