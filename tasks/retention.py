"""The run's own thinning of its centres, after each commit (artifacts/retention.py says which go
and why at commit time), and their restoring on a resume where only the ledger came along."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from artifacts import rebuild, retention
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


@task(cache_policy=NO_CACHE, task_run_name="restore-centres")
def restore_centres(data_dir: str, run_id: str, missing: tuple[str, tuple[int, ...]], keep_every: int, es_model: str, first_centre: str) -> dict:
    """A resumed run whose latest centre is neither on disk nor marked thinned (its ledger came to
    this data dir without its artifacts; `missing`, what artifacts/retention.py `centres_to_restore`
    says): its centres rebuilt from the ledger (artifacts/rebuild.py `restore_centres`, from
    `first_centre`, made by this run), what the retention rule keeps put on disk."""
    root, logger = Path(data_dir), get_run_logger()
    ledger, store = Ledger(root), ArtifactStore(root / "artifacts")
    generations = missing[1]
    logger.warning(f"run {run_id}: its latest centre (generation {generations[-1] + 1}) is not in {store.root}: rebuilding it from the ledger, "
                   f"{len(generations)} recorded update(s) from generation {generations[0]}'s centre, each hash-checked")
    every = max(1, len(generations) // 10)  # about ten progress lines

    def progress(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            logger.info(f"run {run_id}: restored {done}/{total} centres")

    restored = rebuild.restore_centres(ledger, store, run_id, missing, keep_every, Path(es_model), progress, first_centre)
    logger.info(f"run {run_id}: centres restored from generation {restored.ancestor_generation}'s: {len(restored.stored)} put on disk, "
                f"{len(restored.marked)} marked thinned (rebuildable)")
    return {"ancestor_generation": restored.ancestor_generation, "stored": list(restored.stored), "marked": list(restored.marked)}
