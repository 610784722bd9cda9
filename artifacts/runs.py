"""What a run id may be, and one writer per run id.

A run id names a ledger row and folders under the data dir (`reports/<run_id>/`, `locks/<run_id>.lock`),
so it is a plain name: letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most
128 characters (no path separator, no `..`).

A run is written by one process at a time: `RunLock` holds an exclusive `fcntl.flock` on
`<data_dir>/locks/<run_id>.lock` while a run or resume executes. The OS drops the lock when its
holder exits or dies (SIGKILL included), so a killed run never leaves a stale lock; the file keeps
the last holder's pid, host and start time, which a refused second writer names. flock works on
local filesystems; on NFS, Linux emulates it with POSIX byte-range locks.

Every run also holds a shared lock on `<data_dir>/locks/writers.lock` while it writes
(`DataDirWriter`, taken by the flow itself, so a deployment run or a run without --run-id holds it
too); `gc --yes` takes it exclusively (`exclusive_data_dir`). A run writes an artifact before the
ledger row that references it, so gc never runs beside a run that may still commit one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from datetime import datetime, timezone
from pathlib import Path

RUN_ID_MAX = 128
WRITERS_LOCK = "writers.lock"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LOCKS_DIR = "locks"


class RunIdError(ValueError):
    """A run id that cannot name a run: one line."""


class RunLockedError(RuntimeError):
    """Another process is writing this run: one line naming it."""


class DataDirBusyError(RuntimeError):
    """A run is writing the data dir (gc --yes refused): one line."""


def check_run_id(run_id: str) -> str:
    """The run id itself if it is a plain name (see the module docstring), else RunIdError."""
    if not isinstance(run_id, str) or not run_id:
        raise RunIdError(f"run id {run_id!r}: give a non-empty name")
    if len(run_id) > RUN_ID_MAX:
        raise RunIdError(f"run id {run_id[:40]!r}...: {len(run_id)} characters, at most {RUN_ID_MAX}")
    if ".." in run_id or not _RUN_ID_RE.match(run_id):
        raise RunIdError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit, no '..')")
    return run_id


class RunLock:
    """The exclusive write lock of one run id in one data dir (a context manager)."""

    def __init__(self, data_dir: str | Path, run_id: str):
        self.path = Path(data_dir) / LOCKS_DIR / f"{check_run_id(run_id)}.lock"
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock now or raise RunLockedError naming the holder (never waits)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(f"run {self.run_id} is being written by {holder} (lock {self.path}): wait for it to finish, or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'pid 123 on host gpu-1 since 2026-12-01T10:00:00+00:00', from the lock file the holder wrote."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (ValueError, KeyError, UnicodeDecodeError):  # the holder is between open and write
        return "another process"


class WritersLock:
    """The data dir's writers.lock, held while the block runs (a context manager): shared by every
    run that writes there (`DataDirWriter`; it waits the seconds gc holds it), exclusive by gc
    (`exclusive_data_dir`; while any run holds it, DataDirBusyError at once)."""

    def __init__(self, data_dir: str | Path, exclusive: bool = False):
        self.path = Path(data_dir) / LOCKS_DIR / WRITERS_LOCK
        self.exclusive = exclusive
        self._fd: int | None = None

    def __enter__(self) -> "WritersLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if self.exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusyError(f"a run is writing {Path(self.path).parent.parent} (it holds {self.path}): an unreferenced artifact may be "
                                   "one it is about to commit, so gc removes nothing now; run gc when no run is writing") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def DataDirWriter(data_dir: str | Path) -> WritersLock:  # noqa: N802 - reads as the thing it holds
    """A run's shared hold on writers.lock, from its start to its end."""
    return WritersLock(data_dir)


def exclusive_data_dir(data_dir: str | Path) -> WritersLock:
    """gc's exclusive hold on writers.lock (no run writes the data dir meanwhile), or DataDirBusyError."""
    return WritersLock(data_dir, exclusive=True)


def data_dir_busy(data_dir: str | Path) -> bool:
    """Is a run writing this data dir now (holding writers.lock)? Asks without waiting."""
    path = Path(data_dir) / LOCKS_DIR / WRITERS_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
