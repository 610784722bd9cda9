"""The backend factory: open the configured inference backend for a run (the flow holds it; tasks
receive it), or check what it needs before Prefect starts. The one place outside es_core/backends
that looks at `backend.kind`."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from es_core.backends import backend_class, backend_kind
from es_core.settings import ConfigError, Settings


def open_backend(settings: Settings, base_model_path: Path, run_dir: Path, run_id: str = ""):
    # adapter names carry the run id, so two runs on one standing server never swap weights
    return backend_class(backend_kind(settings)).from_settings(settings, Path(base_model_path), log_dir=run_dir, name_prefix=f"{run_id}-" if run_id else "")


def check_backend(settings: Settings) -> None:
    """What the backend needs that settings validation cannot see, checked without opening it (no
    torch import): SGLang's launcher on PATH, unless the run attaches to running servers; with
    runner.kind ray, Ray itself and the cluster at runner.address."""
    if settings.runner.kind == "ray":
        check_ray_runner(settings)
    sglang = settings.backend.sglang
    if settings.backend.kind == "sglang" and not settings.sglang_urls:
        launcher = (shlex.split(sglang.python) or [""])[0]
        if not shutil.which(launcher):
            raise ConfigError(f"backend.sglang.python {sglang.python!r}: {launcher!r} is not a program on PATH (it launches the SGLang server; "
                              "or attach to one with ES_SGLANG_URL)")


def check_ray_runner(settings: Settings) -> None:
    """Ray is installed, and the port runner.address names answers as a gRPC server (Ray's GCS)
    within runner.connect_timeout_s (ray.init would retry for minutes); Ray is not imported here."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("runner.kind ray: Ray is not installed here (pip install 'es-countdown[ray]')")
    runner = settings.runner
    if runner.address:
        from es_core.backends.ray_engines import unreachable_address

        unreachable = unreachable_address(runner.address, runner.connect_timeout_s)
        if unreachable:
            raise ConfigError(unreachable)


class LazyBackend:
    """A backend opened on its first use: an evaluation that is a cache hit (the base model under a
    warm start, say) never loads the model or starts a server. The whole InferenceBackend."""

    def __init__(self, open_backend_fn):
        self._open, self._backend = open_backend_fn, None

    def _get(self):
        if self._backend is None:
            self._backend = self._open()
        return self._backend

    def generate(self, adapters, prompts, max_new_tokens, prompt_groups=None):
        return self._get().generate(adapters, prompts, max_new_tokens, prompt_groups)

    def generate_population(self, members, prompts, max_new_tokens, on_decode=None, prompt_groups=None):
        return self._get().generate_population(members, prompts, max_new_tokens, on_decode, prompt_groups)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
