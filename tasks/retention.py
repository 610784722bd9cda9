"""The run's own thinning of its centres, after each commit (artifacts/retention.py says which go
and why at commit time)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from artifacts import retention
from artifacts.ledger import Ledger
from artifacts.store import ArtifactStore
from tasks.common import NO_CACHE, wait_for_decoding


# a disk that was busy or flaky is tried again; thinning is idempotent (what is gone stays marked)
@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, task_run_name="thin-centres-g{generation}")
def thin_centres(data_dir: str, run_id: str, keep_every: int, generation: int, committed: dict | None = None, decoding=None) -> list[str]:
    """Once generation `generation` is committed (`committed`, its commit's result, orders this
    after it): the run's centres it has moved past that are no keyframe of `keep_every`, marked
    thinned in the ledger, then deleted. Returns their sha256s."""
    wait_for_decoding(decoding)
    root = Path(data_dir)
    thinned = retention.thin_centres(Ledger(root), ArtifactStore(root / "artifacts"), run_id, keep_every)
    if thinned:
        freed = sum(c.bytes for c in thinned) / 2**20
        get_run_logger().info(f"run {run_id}: thinned the centres of generation(s) {', '.join(str(c.generation + 1) for c in thinned)} "
                              f"({freed:,.1f} MiB; rebuildable from the keyframes every {keep_every})")
    return [c.center_sha256 for c in thinned]
