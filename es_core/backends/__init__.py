"""Inference backends: the interface (base.py), `embedded` and `sglang`. `backend_class` is the one
place a run's `backend.kind` is looked at."""

from __future__ import annotations

import importlib

_CLASSES = {"embedded": ("es_core.backends.embedded", "EmbeddedBackend"), "sglang": ("es_core.backends.sglang", "SGLangBackend")}


def backend_class(kind: str):
    """The class of backend `kind` (imported on first use: each pulls in its own dependencies).
    Each has `from_settings(settings, model_path, log_dir=, name_prefix=)` and `decode_key(settings)`."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown backend kind {kind!r} (known: {', '.join(_CLASSES)})")
    module, name = _CLASSES[kind]
    return getattr(importlib.import_module(module), name)
