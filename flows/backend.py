"""Open the configured inference backend for a run (the flow holds it; tasks receive it)."""

from __future__ import annotations

from pathlib import Path

from es_core.settings import Settings


def open_backend(settings: Settings, base_model_path: Path, run_dir: Path, run_id: str = ""):
    if settings.runner.kind == "ray":  # embedded engines on a Ray cluster (settings refuse ray with sglang)
        from es_core.backends.ray_engines import RayBackend

        return RayBackend.from_settings(settings, base_model_path)
    if settings.backend.kind == "embedded":
        from es_core.backends.embedded import EmbeddedBackend

        return EmbeddedBackend.from_settings(settings, base_model_path)
    from es_core.backends.sglang import SGLangBackend

    # adapter names carry the run id, so two runs on one standing server never swap weights
    return SGLangBackend.from_settings(settings, base_model_path, log_dir=run_dir, name_prefix=f"{run_id}-" if run_id else "")


class LazyBackend:
    """A backend opened on its first generate: an evaluation that is a cache hit (the base model
    under a warm start, say) never loads the model or starts a server."""

    def __init__(self, open_backend_fn):
        self._open, self._backend = open_backend_fn, None

    def _get(self):
        if self._backend is None:
            self._backend = self._open()
        return self._backend

    def generate(self, adapters, prompts, max_new_tokens):
        return self._get().generate(adapters, prompts, max_new_tokens)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
