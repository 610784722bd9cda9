"""Ledger writes as tasks: idempotent on their keys, so a retried task never duplicates a row."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from artifacts.ledger import Ledger
from tasks.common import NO_CACHE, wait_for_gate


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def commit_generation(data_dir: str, generation: dict, members: list[dict], samples: list[dict], problems: list[dict] | None = None, gate=None) -> None:
    """Members, samples, new problems and the generation row land in one transaction, or not at all."""
    wait_for_gate(gate)
    Ledger(Path(data_dir)).commit_generation(generation, members, samples, problems)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def record_warm_start(data_dir: str, row: dict) -> None:
    """The warm start a run starts from: base -> warm start, steps, seconds, loss curve."""
    Ledger(Path(data_dir)).record_warm_start(row)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def record_eval(data_dir: str, row: dict) -> None:
    """One held-out evaluation (centre or base model)."""
    Ledger(Path(data_dir)).record_eval(row)


@task(cache_policy=NO_CACHE)
def publish_generation(progress, generation: int, row: dict, members: list[dict], gate=None) -> None:
    """The console line, progress bar and member table of a committed generation (Prefect UI)."""
    wait_for_gate(gate)
    progress.generation(generation, row, members)
