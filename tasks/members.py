"""A generation's members, built once: the centre checkpoint plus the plan's drawn noise.

A generation's noise depends on its plan only (seeds, signs, sigma), never on rewards or on the
centre's values, so the flow draws generation g + 1's while g decodes (flows/pipeline.py). When g
starts, the flow wraps its centre and that draw in one `GenerationMembers` and hands it to g's
tasks as `members`: the evaluation (stacked in memory for the embedded engine, adapter files for
SGLang), the member files the ledger names and the update then share one checkpoint load, one
draw and one build of each form (45 ms to draw at SmolLM2 rank 1, 32 members, on a 2-core
machine; the build as much again). The adapter files a backend loads in weights space last only
while the generation is evaluated (`serving`). Without it (a replay, a test) a task builds the same
values itself: a run is bit-identical either way. `members` is in no cache key; the centre's hash and
the plan it was drawn from are.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Iterator

from artifacts.checkpoints import load_checkpoint, put_adapter_folder
from artifacts.store import ArtifactRef, ArtifactStore, files_sha256
from es_core.backends.base import AdapterRef
from es_core.es import DrawnPopulation, ESState, NoiseLayout, PopulationPlan
from es_core.lora import AdapterSpec, StackedLoRA
from es_core.weights_space import factor_record_files
from es_core.search_space import SearchSpace, search_space


class GenerationMembers:
    """The members of generation `plan.generation` from the centre checkpoint `center_sha256`, as
    `es_core.backends.base.Members`: stacked in memory, written as adapter artifacts, each built on
    first use only, whichever task asks first (the evaluation and the member files run in two
    threads)."""

    def __init__(self, artifacts_dir: str, center_sha256: str, plan: PopulationPlan, drawn: DrawnPopulation | None = None):
        if drawn is not None and drawn.plan != plan:
            raise ValueError(f"the noise drawn ahead is generation {drawn.plan.generation}'s, not generation {plan.generation}'s plan")
        self.store, self.center_sha256, self.plan = ArtifactStore(Path(artifacts_dir)), center_sha256, plan
        self.space: SearchSpace = search_space(plan)
        self._drawn = drawn
        self._lock = threading.RLock()
        self._scratch: ArtifactStore | None = None  # inside `serving()`: its scratch store, where weights-space members are joined
        self._served: list[ArtifactRef] | None = None  # the joined members in it

    def check(self, center_sha256: str, plan: PopulationPlan) -> "GenerationMembers":
        """These members, when they are those of this centre and plan (what a task was asked for)."""
        if (self.center_sha256, self.plan) != (center_sha256, plan):
            raise ValueError(f"the members given are generation {self.plan.generation}'s of centre {self.center_sha256[:12]}, "
                             f"not generation {plan.generation}'s of centre {center_sha256[:12]}")
        return self

    def __len__(self) -> int:
        return len(self.plan.members)

    @cached_property
    def _checkpoint(self) -> tuple[ESState, AdapterSpec]:
        with self._lock:
            return load_checkpoint(self.store, self.center_sha256)

    @property
    def state(self) -> ESState:
        return self._checkpoint[0]

    @property
    def spec(self) -> AdapterSpec:
        return self._checkpoint[1]

    @property
    def scaling(self) -> float:
        return self.spec.lora_alpha / self.spec.rank

    @cached_property
    def population(self) -> DrawnPopulation:
        """The plan's noise and member offsets: drawn ahead for this plan, or drawn now."""
        with self._lock:
            return self._drawn or self.space.draw(self.plan, self.space.noise_layout(self.state.centre, self.plan.perturb))

    def centre(self):
        """What every member shares, for a backend to apply once (weights space: the centre); else None."""
        return self.space.shared(self.state.centre)

    def stacked(self) -> StackedLoRA:
        with self._lock:
            return self._stacked

    @cached_property
    def _stacked(self) -> StackedLoRA:
        return self.space.members(self.state.centre, self.population)

    def adapter_files(self) -> list[ArtifactRef]:
        """The members as adapter artifacts, in plan order (what the ledger names)."""
        with self._lock:
            return self._adapter_files

    @cached_property
    def _adapter_files(self) -> list[ArtifactRef]:
        centre = self.state.centre
        return [self.store.put_files(self.space.record(centre, self.spec, self.center_sha256, self.plan, i, self.stacked)) for i in range(len(self))]

    def factor_record_sha256s(self) -> list[str]:
        """Weights space: the ids its members' artifacts had before their records (own factors and
        the centre's id: weights_space.factor_record_files), computed, not stored: what a ledger of
        that time names, for replay to compare."""
        stacked = self.stacked()
        return [files_sha256(factor_record_files(stacked.member(i), self.spec, self.space.noise_rank, self.center_sha256)) for i in range(len(self))]

    def adapters(self) -> list[AdapterRef]:
        """The members as whole adapter folders (a backend that loads files): the ledger's files, or
        in weights space each centre + member joined (rank R + r), written on first use into the
        scratch store of `serving()` (outside it, refused)."""
        with self._lock:
            refs = self._adapter_files if self.space.records_are_served else self._served_files()
        return [AdapterRef(f"g{self.plan.generation}_m{m.index:03d}", ref.path) for m, ref in zip(self.plan.members, refs)]

    @contextmanager
    def serving(self) -> Iterator["GenerationMembers"]:
        """These members while a backend decodes them. A weights-space member is served as its
        centre joined to its own factors, one adapter of rank R + r (~700 MB at R 576 on every layer
        of SmolLM2, so ~360 GB for 512 members), that the ledger never names and no one reads after
        the decode (replay joins its own, flows/replay.py): inside, `adapters()` writes them into a
        scratch store under the run's store tmp dir (a server on another host of a Ray cluster reads
        the same data dir), made on first use; on leaving, decoded or failed, it is deleted (after a
        kill, `es-countdown gc` removes it with the store's other leftovers). One generation's at a
        time: the next generation's evaluation starts after this one's ended. Stacked members (the
        embedded engine) and LoRA space (the ledger's files are the members) write nothing here."""
        with self.store.scratch(f"served-g{self.plan.generation}") as scratch:
            with self._lock:
                if self._scratch is not None:
                    raise RuntimeError(f"generation {self.plan.generation}'s members are being served already (their scratch store has one owner)")
                self._scratch = scratch
            try:
                yield self
            finally:
                with self._lock:
                    self._scratch, self._served = None, None

    def _served_files(self) -> list[ArtifactRef]:
        """The joined members in the scratch store of `serving()` (the caller holds the lock)."""
        if self._scratch is None:
            raise RuntimeError(f"generation {self.plan.generation}'s weights-space members are joined for a backend only inside "
                               "GenerationMembers.serving(), whose scratch store is deleted after the decode")
        if self._served is None:
            stacked, centre = self._stacked, self.state.centre
            self._served = [put_adapter_folder(self._scratch, *self.space.adapter(centre, self.spec, stacked, i)) for i in range(len(stacked))]
        return self._served


def run_noise_layout(artifacts_dir: str, center_sha256: str, plan: PopulationPlan) -> NoiseLayout:
    """What the noise of a plan's members is drawn over: the same for every centre of a run (so, its first's)."""
    state, _ = load_checkpoint(ArtifactStore(Path(artifacts_dir)), center_sha256)
    return search_space(plan).noise_layout(state.centre, plan.perturb)
