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


# Lock descriptors this process holds. A forked child (a DataLoader worker) inherits the descriptor, and
# with it the flock, which would then outlive a killed trainer until the worker noticed (~5 s): children
# close their copy at once, which leaves the parent's lock in place (flock locks belong to the open file,
# released when its last descriptor closes).
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def prepare_out_dir(out_dir: Path) -> list[Path]:
    """Create ``out_dir`` (and missing parents); the folders this created, outermost first."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"train.out_dir={out_dir} is a file; set train.out_dir to a folder (it is created if missing)")
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()][::-1]
    out_dir.mkdir(parents=True, exist_ok=True)
    return created


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _write(fd: int, text: str) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, text.encode())


@contextlib.contextmanager
def run_lock(out_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the out_dir lock (when ``enabled``: rank 0 only); refuse at once if another process holds it.

    A run that fails before writing anything else into a folder it created removes that folder again:
    a refused command leaves the file system as it found it."""
    if not enabled:
        yield
        return
    out_dir = Path(out_dir)
    created = prepare_out_dir(out_dir)
    lock_path = out_dir / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    _HELD.add(fd)
    ok = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd) or "another process"
            raise RunLockedError(
                f"train.out_dir={out_dir} is in use by {owner}; wait for that run to end, "
                "or set train.out_dir to another folder"
            ) from None
        previous = _read(fd)
        if previous:
            log.warning("the previous run in %s (%s) was killed before it finished; the system released its lock", out_dir, previous)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        _write(fd, f"galip train pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        try:
            yield
            ok = True
        finally:
            _write(fd, "")  # empty: the last owner ended (normally or by an exception), it was not killed
    finally:
        _HELD.discard(fd)
        if not ok and created and [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
            lock_path.unlink()
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        os.close(fd)
