"""Prepare the base model: a plain local HF folder (a GGUF is converted once, content-addressed)."""

from pathlib import Path

from prefect import task

from es_core.models import ModelError, resolve_base_model
from es_core.settings import ModelSettings
from tasks.common import NO_CACHE, retry_on


# a flaky download or disk is tried again; a damaged or missing model would only be hashed again
@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_on((BaseException,), final=(ModelError,)))
def prepare_base_model(model: ModelSettings, models_dir: str) -> dict:
    """Resolve the configured model to a local folder a user (and SGLang) can load; returns name, path, sha256."""
    resolved = resolve_base_model(model, Path(models_dir))
    return {"name": resolved.name, "path": str(resolved.path), "sha256": resolved.sha256}
