"""A run's noise, drawn once per generation and ahead of time.

A generation's noise depends on its seeds only (never on rewards), so the flow asks for generation
g + 1's while g decodes; g + 1's member build, adapter files and update then take it from here
instead of each drawing it (45 ms a draw at SmolLM2 rank 1, 32 members, on a 2-core machine), and
the members' offsets sigma * sign * eps come precomputed too. Values are what
`es.draw_population_noise` returns: a run is bit-identical with or without a pool. Travels into
tasks as `noise`, which no cache key includes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import torch

from es_core.es import Member, PopulationNoise, draw_population_noise, noise_layout
from es_core.lora import LoRATensors


class _Entry:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.noise: PopulationNoise | None = None
        self.signed: dict[tuple, torch.Tensor] = {}  # by _signed_key
        self.error: BaseException | None = None


def _signed_key(members: Sequence[Member], sigma: float) -> tuple:
    return float(sigma), tuple((m.seed, m.sign) for m in members)


class NoisePool:
    """The noise of the last `keep` generations, by (seeds, layout)."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._lock = threading.Lock()
        self._layout: dict[str, tuple[tuple[str, int], ...]] = {}  # perturb -> the run's layout, once seen

    def get(self, center: LoRATensors, members: Sequence[Member], perturb: str) -> PopulationNoise:
        return self._noise(self._seen(center, perturb), members)[1]

    def signed(self, center: LoRATensors, members: Sequence[Member], sigma: float, perturb: str) -> tuple[PopulationNoise, torch.Tensor]:
        """The noise and the members' offsets sigma * sign * eps (computed ahead when prefetched)."""
        entry, noise = self._noise(self._seen(center, perturb), members)
        offsets = entry.signed.get(_signed_key(members, sigma))
        return noise, offsets if offsets is not None else noise.signed(members, sigma)

    def prefetch(self, members: Sequence[Member], sigma: float, perturb: str, gate: threading.Event | None = None) -> None:
        """Draw these members' noise and offsets in a background thread once `gate` is set (the
        current generation is decoding, so its own noise, and with it the layout, is known)."""
        members = list(members)

        def work() -> None:
            if gate is not None:
                gate.wait()
            with self._lock:
                layout = self._layout.get(perturb)
            if layout is None:
                return
            try:
                entry, noise = self._noise(layout, members)
                entry.signed.setdefault(_signed_key(members, sigma), noise.signed(members, sigma))
            except BaseException:  # the foreground meets the same error when it asks
                pass

        threading.Thread(target=work, name="es-noise-prefetch", daemon=True).start()

    def _seen(self, center: LoRATensors, perturb: str) -> tuple[tuple[str, int], ...]:
        """The centre's noise layout, remembered for `prefetch`."""
        layout = noise_layout(center, perturb)
        with self._lock:
            self._layout[perturb] = layout
        return layout

    def _entry(self, layout, members: Sequence[Member]) -> tuple[_Entry, bool]:
        """(the entry for these seeds, whether this caller created it and so must draw it)."""
        key = (tuple(dict.fromkeys(m.seed for m in members)), layout)
        with self._lock:
            entry = self._entries.get(key)
            created = entry is None
            if created:
                entry = self._entries[key] = _Entry()
            self._entries.move_to_end(key)
            while len(self._entries) > self.keep:
                self._entries.popitem(last=False)
            return entry, created

    def _noise(self, layout, members: Sequence[Member]) -> tuple[_Entry, PopulationNoise]:
        entry, created = self._entry(layout, members)
        if created:
            try:
                entry.noise = draw_population_noise(layout, members)
            except BaseException as exc:
                entry.error = exc
                raise
            finally:
                entry.ready.set()
        entry.ready.wait()
        if entry.error is not None:
            raise entry.error
        return entry, entry.noise


def population_args(pool: NoisePool | None, center: LoRATensors, members: Sequence[Member], sigma: float, perturb: str) -> tuple:
    """(noise, signed) for `es.stacked_population`: from the pool, or (None, None) to draw there."""
    return pool.signed(center, members, sigma, perturb) if pool is not None else (None, None)
