"""Host work overlapped with decoding: the one place where the ES loop is not sequential.

Decoding a generation is the only long wait of a run (1.6 s of 1.7 on the GPU machine); the host
work around it (the ledger commit and UI of the generation before, the member adapter files, the
next generation's noise and prompts) is done while it runs, which keeps everything but decoding
under 5% of a generation (README, issue 6). Each generation g has one event, set once its decoding
is under way (the backend's `on_decode`): work that may overlap g's decoding waits for it, so that
it never takes the GIL from the short CPU steps before decoding starts.

    inputs = pipeline.start(g)           g's inputs, prepared while g - 1 decoded; g + 1's are
                                         prepared once g decodes
    pipeline.while_decoding(task, ...)   a Prefect task that runs once g decodes (member files)
    ... decode g, passing pipeline.decoding to set ...
    pipeline.end_generation()            g's decoding is over: its background work, and g - 1's
                                         commit, are waited for (their errors raised here)
    pipeline.while_next_decodes(task, ...)  runs once g + 1 decodes (g's commit and UI)
    pipeline.settle()                    everything done now (before anything reads the ledger)

Errors of background work surface in the flow: a Prefect task's when it is waited for, the look-
ahead's when its inputs are taken. Leaving the `with` block on an error waits for the work already
submitted (what was scored reaches the ledger), logs its errors, and raises the original one. A
kill before a commit lands only means the resume redoes that generation from cached task results.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Pipeline(Generic[T]):
    """Generations `start`..`stop - 1`; `prepare(g)` makes what generation g needs before its
    rewards (it must not depend on them); `log_error` reports background errors met while an
    error is already on its way out."""

    def __init__(self, prepare: Callable[[int], T], stop: int, log_error: Callable[[str], None]):
        self._prepare, self._stop, self._log_error = prepare, stop, log_error
        self._events: dict[int, threading.Event] = {}
        self._pending: dict[int, list] = {}  # futures by the generation whose decoding they wait for
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="es-lookahead")
        self._prepared: tuple[int, Future] | None = None
        self._g: int | None = None

    # --- the generation's inputs -----------------------------------------------------------------

    def start(self, g: int) -> T:
        """Generation g's inputs: prepared while g - 1 decoded (its error raised here), or now.
        g + 1's are prepared in the look-ahead thread once g's decoding starts."""
        self._g = g
        if self._prepared is not None and self._prepared[0] == g:
            inputs = self._prepared[1].result()
        else:
            inputs = self._prepare(g)
        if g + 1 < self._stop:
            self._prepared = (g + 1, self._ahead.submit(self._after, self._event(g), g + 1))
        else:
            self._prepared = None
        return inputs

    def _after(self, decoding: threading.Event, g: int) -> T:
        decoding.wait()
        return self._prepare(g)

    # --- the decoding event ------------------------------------------------------------------------

    @property
    def decoding(self) -> threading.Event:
        """The current generation's event: the evaluation sets it once decoding is under way."""
        return self._event(self._current())

    def _event(self, g: int) -> threading.Event:
        return self._events.setdefault(g, threading.Event())

    def _current(self) -> int:
        if self._g is None:
            raise RuntimeError("Pipeline: start(g) first")
        return self._g

    # --- background work ---------------------------------------------------------------------------

    def while_decoding(self, task, *args, **kwargs):
        """Submit a Prefect task (it takes `decoding` and waits for it) to run while this generation decodes."""
        return self._submit(self._current(), task, args, kwargs)

    def while_next_decodes(self, task, *args, **kwargs):
        """Submit a Prefect task to run once the next generation decodes (or at `settle`)."""
        return self._submit(self._current() + 1, task, args, kwargs)

    def _submit(self, g: int, task, args, kwargs):
        future = task.submit(*args, decoding=self._event(g), **kwargs)
        self._pending.setdefault(g, []).append(future)
        return future

    def end_generation(self) -> None:
        """This generation's decoding is over (a cached evaluation never decoded: its event is set
        here): wait for the work that waited for it, raising the first error."""
        g = self._current()
        self._event(g).set()
        for done in [k for k in self._pending if k <= g]:
            self._wait(self._pending.pop(done))
        self._events = {k: e for k, e in self._events.items() if k >= g}

    def settle(self) -> None:
        """Nothing decodes now: let all background work run, and wait for it (errors raised). What
        is submitted next waits for the next decode again."""
        for g in sorted(self._pending):
            self._event(g).set()
        while self._pending:
            self._wait(self._pending.pop(min(self._pending)))
        if self._g is not None:
            self._events = {k: e for k, e in self._events.items() if k <= self._g}

    def _wait(self, futures: list) -> None:
        while futures:
            futures.pop(0).result()

    # --- the end ---------------------------------------------------------------------------------------

    def __enter__(self) -> "Pipeline[T]":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for event in self._events.values():
            event.set()  # the look-ahead and background tasks must not wait for a decode that never comes
        try:
            if error is None:
                self.settle()
            else:
                self._settle_quietly()
        finally:
            self._ahead.shutdown(wait=False, cancel_futures=True)

    def _settle_quietly(self) -> None:
        """On a failure, let work already submitted (generations already scored) finish, so it
        reaches the ledger; its own errors are logged, the original error is the one raised."""
        for g in sorted(self._pending):
            for future in self._pending.pop(g):
                try:
                    future.result()
                except BaseException as exc:
                    self._log_error(f"background work failed too: {type(exc).__name__}: {exc}")
