"""An exclusive lock on a run folder, so two ``train`` runs never write into the same one.

``RunLock(run_dir)`` creates ``RUN_DIR/.lock``, takes an exclusive ``flock`` on it and
writes the holder (pid, host, start time) into it for the other run's error message.
The lock is released, and the file removed, when the ``with`` block ends, however it
ends.  A process that is killed cannot remove the file, but the operating system drops
its ``flock`` with it: a stale file never blocks the next run, which simply takes it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, no lock
    fcntl = None

LOCK_NAME = ".lock"


class RunLockedError(Exception):
    """The run folder is locked by another live process."""


class RunLock:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` naming the holder (never waits).

        ``OSError`` (the folder cannot be written) propagates to the caller."""
        if fcntl is None:  # pragma: no cover
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunLockedError(holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder may have removed the file between our open and our
            # flock: then we hold a lock on a file nobody else can see. Start over.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            # Removed while still held, so a waiting run either sees our lock or no file.
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process (it has not written its pid yet)"
