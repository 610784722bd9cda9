"""A run of the CLI stops within seconds of SIGTERM or Ctrl-C, its last committed generation intact.

Why this is needed: a SIGTERM took 150 s to end a run (issue 26). `timeout`, a terminal's Ctrl-C
and service managers signal the whole process group, so Prefect's temporary server (a child
process) dies with the run; the flow engine then reports the crash to that dead server, and
Prefect's client retries each request five times with exponential backoff (2 + 4 + 8 + 16 + 32 s).
A SIGTERM to the run alone ended it at once, but by the default action: no atexit, so the
temporary server was left running, orphaned.

What happens now, while `stop_on_signals()` is active (the CLI's run and resume):
- SIGTERM and SIGINT raise `Stopped` in the main thread (Prefect's own SIGTERM handler, installed
  while the flow runs, raises its TerminationSignal there instead, and hands the signal on to
  this one afterwards). The flow marks the run failed in the ledger, directly (no Prefect task:
  the API may be what is gone), and unwinds; atexit stops the temporary server.
- Whatever the main thread is doing, a watchdog thread sees the signal (signal.set_wakeup_fd:
  Python's C-level handler writes every signal's number there, whichever Python handler runs) and,
  if the process is still alive GRACE_S later or a second signal comes, marks the run failed
  (if the flow has not) and ends the process with os._exit after stopping its child processes.

DuckDB commits a generation in one transaction, so an exit at any point keeps every committed
generation; `es-countdown resume RUN_ID` goes on from there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

GRACE_S = 8.0  # the orderly path takes 1-3 s with a live Prefect server


class Stopped(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM or SIGINT). A KeyboardInterrupt, so that code which lets
    Ctrl-C through lets this through too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _RunBeingWritten:
    """The run this process writes, once the flow knows its id: what the watchdog marks failed."""

    def __init__(self):
        self.data_dir: Path | None = None
        self.run_id: str | None = None
        self.marked = False
        self.lock = threading.Lock()


_run = _RunBeingWritten()


def note_run(data_dir: Path, run_id: str) -> None:
    """The flow names the run it writes (a no-op where nobody listens: tests, deployments)."""
    with _run.lock:
        _run.data_dir, _run.run_id, _run.marked = Path(data_dir), run_id, False


def mark_failed(reason: str) -> None:
    """Record the run this process writes as failed with `reason`, once; directly in the ledger."""
    with _run.lock:
        if _run.run_id is None or _run.marked:
            return
        _run.marked = True
        data_dir, run_id = _run.data_dir, _run.run_id
    from artifacts.ledger import Ledger

    try:
        Ledger(data_dir).set_run_status(run_id, "failed", reason)
    except Exception:  # noqa: BLE001 - no row yet (the flow records one as it unwinds), or the ledger is what failed
        pass


def failure_reason(exc: BaseException) -> str:
    """One line for the ledger: the signal that stopped the run, or the error that ended it."""
    signum = getattr(exc, "signum", None) or getattr(exc, "signal", None)  # Stopped; Prefect's TerminationSignal
    if isinstance(signum, int) or isinstance(exc, KeyboardInterrupt):
        return f"stopped by {signal.Signals(signum if isinstance(signum, int) else signal.SIGINT).name}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:1000] if text else type(exc).__name__


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT stop the command within GRACE_S seconds (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def raise_stopped(signum, frame):
        raise Stopped(signum)

    for s in previous:
        signal.signal(s, raise_stopped)
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watchdog = threading.Thread(target=_watch, args=(read_fd,), name="es-stop-watchdog", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(write_fd)  # the watchdog reads end-of-file and ends


def _watch(read_fd: int) -> None:
    first: tuple[int, float] | None = None
    while True:
        timeout = None if first is None else max(0.0, first[1] + GRACE_S - time.monotonic())
        if not _readable(read_fd, timeout):
            _hard_exit(first[0], f"still running {GRACE_S:.0f} s after {signal.Signals(first[0]).name}")
        data = os.read(read_fd, 64)
        if not data:
            os.close(read_fd)
            return
        for signum in data:
            if signum not in (signal.SIGTERM, signal.SIGINT):
                continue
            if first is None:
                first = (signum, time.monotonic())
            else:
                # a second request; or Prefect's SIGTERM handler handing the signal on once the flow
                # has handled its TerminationSignal (the run is marked by then): either way, done
                _hard_exit(signum, f"{signal.Signals(signum).name} again")


def _readable(fd: int, timeout: float | None) -> bool:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


_told = threading.Event()


def tell_stopped(signum: int, why: str = "") -> None:
    """The one line a stopped command prints, once (the CLI's handler and the watchdog may both get there)."""
    if _told.is_set():
        return
    _told.set()
    print(f"es-countdown: stopped by {signal.Signals(signum).name}{f' ({why})' if why else ''}; committed generations are in the ledger "
          "(resume with `es-countdown resume RUN_ID`)", file=sys.stderr, flush=True)


def _hard_exit(signum: int, why: str) -> None:
    mark_failed(f"stopped by {signal.Signals(signum).name}")
    tell_stopped(signum, why)
    _stop_children()
    os._exit(128 + signum)


def _stop_children() -> None:
    """SIGTERM, then SIGKILL after 2 s, to this process's children (Prefect's temporary server)."""
    children = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 2
    while children and time.monotonic() < deadline:
        children = [p for p in children if _alive(p)]
        time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0
