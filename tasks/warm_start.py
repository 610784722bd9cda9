"""The supervised warm start as a task: trained once per (base model, settings, held-out sets,
device, code), stored as artifacts: the model folder (a base model every backend loads) and its
AdamW moments, so that a longer warm start with otherwise equal settings continues this one."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from artifacts.ledger import Ledger
from artifacts.store import ArtifactStore
from es_core.settings import WarmStartSettings
from es_core.warm_start import WarmStartCheckpoint, train
from tasks.common import CODE_VERSION, DataDir, code_version

# Location-free: where the data dir or the base model folder lives changes no result; the code
# that trains (and everything else it calls) does.
WARM_START_CACHE = (INPUTS - "data_dir" - "base_model_dir") + TASK_SOURCE + CODE_VERSION


def lineage_key(base_model_sha256: str, settings: WarmStartSettings, prompt_style: str, dtype: str, device: str, exclude: list[str]) -> str:
    """Equal for warm starts that differ only in their number of steps (the longer continues the
    shorter), trained by the same code."""
    fields = settings.model_dump(mode="json", exclude={"steps", "keep_optimizer_state"})
    identity = [base_model_sha256, fields, prompt_style, dtype, device, hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest(), code_version()]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@task(cache_policy=WARM_START_CACHE, task_run_name="warm-start-{settings.steps}-steps")
def warm_start(data_dir: str, base_model_dir: str, base_model_sha256: str, settings: WarmStartSettings, prompt_style: str, dtype: str,
               device: str, exclude: list[str]) -> dict:
    """Fine-tune the base model (continuing the longest recorded shorter warm start of the same
    settings, if its artifacts are there); returns the ledger row of the result (warm_starts, less
    the base model's name, which the flow adds)."""
    logger = get_run_logger()
    data = DataDir(Path(data_dir))
    store = ArtifactStore(data.artifacts)
    key = lineage_key(base_model_sha256, settings, prompt_style, dtype, device, exclude)
    start, parent, prior_seconds = None, None, 0.0
    for row in Ledger(data.root).warm_starts_to_continue(key, settings.steps):
        if store.exists(row["warm_start_sha256"]) and store.exists(row["optimizer_sha256"]):
            start = WarmStartCheckpoint(store.get(row["warm_start_sha256"]), store.get(row["optimizer_sha256"]), row["steps"], list(row["loss_curve"]))
            parent, prior_seconds = row["warm_start_sha256"], float(row["seconds"] or 0.0)
            logger.info(f"warm start: continuing {parent[:12]} from step {start.steps} to {settings.steps}")
            break
    data.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".warm-start-", dir=data.root) as tmp:
        model_dir, optimizer_dir = Path(tmp) / "model", Path(tmp) / "optimizer"
        result = train(
            Path(base_model_dir), model_dir, optimizer_dir if settings.keep_optimizer_state else None, settings, prompt_style, exclude,
            device=device, dtype=dtype, start=start, on_step=lambda step, loss: logger.info(f"warm start step {step}/{settings.steps}: loss {loss:.4f}"),
        )
        model = store.put_dir(model_dir)
        optimizer = store.put_dir(optimizer_dir) if settings.keep_optimizer_state else None
    return {
        "warm_start_sha256": model.sha256, "base_model_sha256": base_model_sha256, "lineage_key": key,
        "parent_warm_start_sha256": parent, "optimizer_sha256": optimizer.sha256 if optimizer else None, "steps": result.steps,
        "settings_json": settings.model_dump_json(), "loss_curve": result.losses, "seconds": prior_seconds + result.seconds,
        "train_seconds": result.seconds, "completion_tokens": result.completion_tokens,
    }
