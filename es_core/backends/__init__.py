"""Inference backends: the interface (base.py), `embedded`, `sglang`, and `ray` (embedded engines in
Ray actors, when `runner.kind` is ray). `backend_kind` is the one place a run's `backend.kind` and
`runner.kind` are looked at."""

from __future__ import annotations

import importlib

_CLASSES = {"embedded": ("es_core.backends.embedded", "EmbeddedBackend"), "sglang": ("es_core.backends.sglang", "SGLangBackend"),
            "ray": ("es_core.backends.ray_engines", "RayBackend")}


def backend_kind(settings) -> str:
    """Which backend class serves a run: the Ray runner's engines (settings refuse ray with sglang),
    else `backend.kind`."""
    return "ray" if settings.runner.kind == "ray" else settings.backend.kind


# backends that take a generation's members as adapter files (`Members.adapters`: in weights space,
# each joined to its centre in a scratch store while the generation decodes), not stacked tensors
LOADS_ADAPTER_FILES = frozenset({"sglang"})


def backend_class(kind: str):
    """The class of backend `kind` (imported on first use: each pulls in its own dependencies).
    Each has `from_settings(settings, model_path, log_dir=, name_prefix=)` and `decode_key(settings)`."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown backend kind {kind!r} (known: {', '.join(_CLASSES)})")
    module, name = _CLASSES[kind]
    return getattr(importlib.import_module(module), name)
