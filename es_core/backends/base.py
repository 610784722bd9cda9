"""What every inference backend does: greedy completions of prompts under a set of adapters.

Two implementations: `embedded` (in-process PyTorch, every member x every prompt in one batched
pass) and `sglang` (HTTP to one or more SGLang servers). The flow only sees this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence


@dataclass(frozen=True)
class AdapterRef:
    """A PEFT adapter folder under a unique name (e.g. `g12_m007`); path None is the base model."""

    name: str
    path: Path | None


@dataclass(frozen=True)
class Completion:
    text: str  # generated text after the prompt, special tokens removed
    completion_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    server: str = ""  # who produced it: "embedded" or the SGLang URL


class BackendError(RuntimeError):
    """A backend failure: one line naming the server, adapter and step."""


class InferenceBackend(Protocol):
    def generate(self, adapters: Sequence[AdapterRef], prompts: Sequence[str], max_new_tokens: int) -> list[list[Completion]]:
        """Greedy completion of every prompt under every adapter: result[a][p]."""
        ...

    def close(self) -> None:
        """Free the model or servers this backend holds."""
        ...
