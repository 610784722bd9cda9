"""Prepare the base model: a plain local HF folder (a GGUF is converted once, content-addressed)."""

from pathlib import Path

from prefect import task

from es_core.models import resolve_base_model
from es_core.settings import ModelSettings
from tasks.common import NO_CACHE


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def prepare_base_model(model: ModelSettings, models_dir: str) -> dict:
    """Resolve the configured model to a local folder a user (and SGLang) can load; returns name, path, sha256."""
    resolved = resolve_base_model(model, Path(models_dir))
    return {"name": resolved.name, "path": str(resolved.path), "sha256": resolved.sha256}
