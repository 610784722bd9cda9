"""Open the configured inference backend for a run (the flow holds it; tasks receive it)."""

from __future__ import annotations

from pathlib import Path

from es_core.settings import Settings


def open_backend(settings: Settings, base_model_path: Path, run_dir: Path, run_id: str = ""):
    if settings.backend.kind == "embedded":
        from es_core.backends.embedded import EmbeddedBackend

        return EmbeddedBackend.from_settings(settings, base_model_path)
    from es_core.backends.sglang import SGLangBackend

    # adapter names carry the run id, so two runs on one standing server never swap weights
    return SGLangBackend.from_settings(settings, base_model_path, log_dir=run_dir, name_prefix=f"{run_id}-" if run_id else "")
