"""Open the configured inference backend for a run (the flow holds it; tasks receive it)."""

from __future__ import annotations

from pathlib import Path

from es_core.backends import backend_class
from es_core.settings import Settings


def open_backend(settings: Settings, base_model_path: Path, run_dir: Path, run_id: str = ""):
    # adapter names carry the run id, so two runs on one standing server never swap weights
    return backend_class(settings.backend.kind).from_settings(settings, Path(base_model_path), log_dir=run_dir, name_prefix=f"{run_id}-" if run_id else "")


class LazyBackend:
    """A backend opened on its first use: an evaluation that is a cache hit (the base model under a
    warm start, say) never loads the model or starts a server. The whole InferenceBackend."""

    def __init__(self, open_backend_fn):
        self._open, self._backend = open_backend_fn, None

    def _get(self):
        if self._backend is None:
            self._backend = self._open()
        return self._backend

    def generate(self, adapters, prompts, max_new_tokens):
        return self._get().generate(adapters, prompts, max_new_tokens)

    def generate_population(self, members, prompts, max_new_tokens, on_decode=None):
        return self._get().generate_population(members, prompts, max_new_tokens, on_decode)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
