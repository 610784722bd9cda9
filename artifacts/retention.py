"""Which of a run's centres stay on disk: keyframes every K generations (`store.keep_centre_every`).

A weights-space centre is the whole accumulated change (425 MB a generation at SmolLM2, R 576, every
layer), and the ledger names every one, so gc never frees them and a weeks-long run outgrows its
disk. But each centre is exactly its parent plus one recorded update (the generation's seeds from
the settings, its rewards in the ledger: flows/replay.py checks that rebuild), so a centre need not
stay on disk once the run has moved past it: it is rebuilt on demand from its nearest kept ancestor
(artifacts/rebuild.py), every step's hash checked against the ledger.

A centre's generation k is the number of updates it holds (its es_state.json; the new centre of
the ledger's generation k - 1, the one generation k starts from). Kept, always:
- the keyframes, k a multiple of K (a rebuild replays at most K - 1 updates);
- the run's latest centre (resume and the next generation read it) and its first (generation 0's
  parent: nothing rebuilds it);
- every centre a held-out evaluation names (evals.adapter_sha256: the run's best centre is one);
- every centre another run's rows name too (runs of identical settings share centres: one run's
  policy never deletes what another keeps).
Thinned centres are marked in the ledger (`generations.center_thinned_at`) before they are deleted,
so the ledger never names a centre gone from disk without saying so.

Who thins, and when: the run itself, right after each commit (tasks/retention.py), so a run with the
setting on stays within its disk without a manual step and the preflight can count the thinned
footprint; it thins only what it has moved past, under its own hold on the data dir. `gc
--thin-centres K` applies the same rule to runs recorded without the setting (or before it); gc
works only while no run writes the data dir (artifacts/runs.py), so it never deletes what a live
run might still read.
"""

from __future__ import annotations

from dataclasses import dataclass

from artifacts.ledger import Ledger
from artifacts.store import ArtifactError, ArtifactStore
from es_core.keyframes import is_keyframe, keeps_every_centre


@dataclass(frozen=True)
class ThinnedCentre:
    run_id: str
    generation: int  # the ledger's generation whose new centre it is (the centre of generation + 1)
    center_sha256: str
    bytes: int


def centres_to_thin(ledger: Ledger, store: ArtifactStore, run_id: str, keep_every: int) -> list[ThinnedCentre]:
    """The run's centres that may leave the disk now (see the module docstring), still on disk: the
    new centres of its generations, oldest first, that are no keyframe, not its latest, named by no
    held-out evaluation and no other run. A centre marked thinned and still on disk (a thinning cut
    short by a kill) is among them."""
    if keeps_every_centre(keep_every):
        return []
    _, rows = ledger.query("SELECT generation, center_sha256, parent_center_sha256 FROM generations WHERE run_id = ? ORDER BY generation", [run_id])
    if not rows:
        return []
    keep = kept_centres(ledger, run_id, keep_every)
    return [ThinnedCentre(run_id, g, sha, store.size(sha)) for g, sha, _ in rows[:-1] if not keep(g, sha) and store.exists(sha)]


def kept_centres(ledger: Ledger, run_id: str, keep_every: int):
    """keep(generation, center_sha256): does the rule keep this new centre of the run's generation on
    disk (a keyframe; the latest, the first, an evaluated one, one another run names)? As the
    ledger stands now."""
    _, rows = ledger.query("SELECT generation, center_sha256, parent_center_sha256 FROM generations WHERE run_id = ? ORDER BY generation", [run_id])
    _, evaluated = ledger.query("SELECT DISTINCT adapter_sha256 FROM evals WHERE adapter_sha256 IS NOT NULL")
    _, others = ledger.query("SELECT center_sha256, parent_center_sha256 FROM generations WHERE run_id <> ?", [run_id])
    latest = rows[-1][1] if rows else None
    first = rows[0][2] if rows and rows[0][0] == 0 else None
    protected = {latest, first} | {sha for (sha,) in evaluated} | {sha for pair in others for sha in pair}
    return lambda generation, sha: is_keyframe(generation + 1, keep_every) or sha in protected


def thin_centres(ledger: Ledger, store: ArtifactStore, run_id: str, keep_every: int, dry_run: bool = False) -> list[ThinnedCentre]:
    """Mark the run's centres that may go (`centres_to_thin`) thinned in the ledger, then delete
    them from the store; with dry_run, only say which. Returns them."""
    thinned = centres_to_thin(ledger, store, run_id, keep_every)
    if dry_run or not thinned:
        return thinned
    ledger.mark_centres_thinned(run_id, [c.generation for c in thinned])  # first: a kill here leaves a marked centre on disk
    for centre in thinned:
        if store.exists(centre.center_sha256):
            store.remove(centre.center_sha256)
    return thinned


@dataclass(frozen=True)
class RebuildChain:
    """How a thinned centre is rebuilt: the ledger generations of `run_id` replayed in order, from
    the kept centre `ancestor_sha256` (the centre of generations[0], on disk)."""

    run_id: str
    generations: tuple[int, ...]
    ancestor_sha256: str
    center_sha256: str

    @property
    def ancestor_generation(self) -> int:
        return self.generations[0]

    def describe(self) -> str:
        updates = len(self.generations)
        return f"rebuildable from generation {self.ancestor_generation}'s centre {self.ancestor_sha256[:12]} of run {self.run_id} ({updates} update{'s' * (updates != 1)})"


def rebuild_chain(ledger: Ledger, store: ArtifactStore, center_sha256: str) -> RebuildChain | None:
    """The chain that rebuilds a centre the ledger marks thinned (None: it marks it nowhere, so
    a centre missing from disk is missing). A centre on the way back that is neither on disk nor
    marked thinned (a keyframe deleted by hand) breaks it: a one-line ArtifactError naming it."""
    row = ledger.thinned_centre_row(center_sha256)
    if row is None:
        return None
    run_id, chain = row["run_id"], [row]
    while not store.exists(chain[-1]["parent_center_sha256"]):
        parent, g = chain[-1]["parent_center_sha256"], chain[-1]["generation"]
        before = ledger.generation_row(run_id, g - 1) if g > 0 else None
        if before is None or before["center_sha256"] != parent or before["center_thinned_at"] is None:
            raise ArtifactError(f"centre {center_sha256} (run {run_id}, generation {row['generation']}'s new centre) was thinned, but the centre it is "
                                f"rebuilt from, generation {g}'s centre {parent}, is missing from {store.root} and was not thinned: restore it from a copy")
        chain.append(before)
    return RebuildChain(run_id, tuple(r["generation"] for r in reversed(chain)), chain[-1]["parent_center_sha256"], center_sha256)


def centres_to_restore(ledger: Ledger, store: ArtifactStore, run_id: str) -> tuple[str, tuple[int, ...]] | None:
    """(the centre to replay from, the ledger generations to replay) when the run's latest centre is
    neither on disk nor marked thinned (a data dir that got its ledger and not its artifacts: a lent
    machine gone, a slim ledger carried off it); None when there is nothing to restore. The replay
    starts from the newest of the run's centres on disk, or from its first centre (generation 0's
    parent), which the run makes again from its settings as it starts."""
    _, rows = ledger.query("SELECT generation, center_sha256, parent_center_sha256, center_thinned_at FROM generations WHERE run_id = ? "
                           "ORDER BY generation", [run_id])
    if not rows or store.exists(rows[-1][1]) or rows[-1][3] is not None:
        return None
    on_disk = [i for i, (_, sha, _, _) in enumerate(rows) if store.exists(sha)]
    start = on_disk[-1] + 1 if on_disk else 0
    return rows[start][2], tuple(g for g, *_ in rows[start:])


def data_dir_ledger(store: ArtifactStore) -> Ledger | None:
    """The ledger of the data dir a store is the artifacts of (tasks/common.DataDir: <data_dir>/artifacts),
    or None for a scratch store, which has none."""
    from artifacts.ledger import LEDGER_FILE

    root = store.root.parent
    return Ledger(root) if store.root.name == "artifacts" and (root / LEDGER_FILE).is_file() else None
