"""What every inference backend does: greedy completions of prompts under a set of adapters.

Two implementations: `embedded` (in-process PyTorch, every member x every prompt in one batched
pass, members taken as stacked tensors) and `sglang` (HTTP to one or more SGLang servers, members
taken as adapter folders). Tasks call only what `InferenceBackend` declares; which backend a run
gets is decided once, by flows/backend.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, Union

from es_core.evaluation import Completion

if TYPE_CHECKING:
    from es_core.lora import LoRATensors, StackedLoRA


@dataclass(frozen=True)
class AdapterRef:
    """A PEFT adapter folder under a unique name (e.g. `g12_m007`); path None is the base model."""

    name: str
    path: Path | None


class InMemoryAdapter:
    """An adapter whose tensors are in memory (a centre the store keeps without its padding), under a
    unique name, both ways a backend may take it, as `Members` are: `tensors` and `scaling` for one
    that takes tensors (the embedded engine: no file is written), `path` for one that loads folders
    (SGLang, the Ray runner's engines), its PEFT folder written by `write_folder` when first asked."""

    def __init__(self, name: str, tensors: "LoRATensors", scaling: float, write_folder: Callable[[], Path]):
        self.name, self.tensors, self.scaling = name, tensors, float(scaling)
        self._write_folder = write_folder
        self._path: Path | None = None
        self._lock = threading.Lock()  # SGLang asks from one thread per server

    @property
    def path(self) -> Path:
        with self._lock:
            if self._path is None:
                self._path = self._write_folder()
            return self._path


Adapter = Union[AdapterRef, InMemoryAdapter]  # what `generate` takes


class BackendError(RuntimeError):
    """A backend failure: one line naming the server, adapter and step."""


class Members(Protocol):
    """A generation's members, both ways a backend may take them (each built only when asked)."""

    scaling: float  # lora_alpha / rank of every member

    def __len__(self) -> int: ...

    def stacked(self) -> "StackedLoRA":
        """The members' LoRA tensors in memory, stacked per key ([members, *shape])."""
        ...

    def centre(self) -> "LoRATensors | None":
        """What every member shares, for a backend that applies it once (weights space: the centre,
        scaling 1; `stacked()` then holds each member's own factors only); None in LoRA space."""
        ...

    def adapters(self) -> list[AdapterRef]:
        """The members as adapter folders, named `g<generation>_m<index>` (written when first asked;
        they may be deleted once the call that asked returns: a backend keeps no path past it)."""
        ...


class InferenceBackend(Protocol):
    def generate(self, adapters: Sequence[Adapter], prompts: Sequence[str], max_new_tokens: int,
                 prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """Greedy completion of every prompt under every adapter: result[a][p] (with `prompt_groups`,
        of adapter a's own prompts: result[a][j] is prompt prompt_groups[a][j]'s)."""
        ...

    def generate_population(self, members: Members, prompts: Sequence[str], max_new_tokens: int,
                            on_decode: Callable[[], None] | None = None,
                            prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """Greedy completion of every prompt under every member of a generation: result[m][p]; with
        `prompt_groups`, of member m's own prompts only (indices into `prompts`, as many for every
        member; es.members_per_prompt): result[m][j] is prompt prompt_groups[m][j]'s.
        `on_decode` is called once decoding is under way and the host has nothing to do until it
        ends (work waiting for it may start)."""
        ...

    def close(self) -> None:
        """Free the model or servers this backend holds."""
        ...
