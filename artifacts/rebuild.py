"""A thinned centre rebuilt from its nearest kept ancestor and the ledger (artifacts/retention.py).

Each step is the run's own update (es_core/plan.py `next_state`, what `aggregate` runs): the
generation's plan from the recorded settings, its noise drawn again from the seeds, its recorded
rewards, and the new centre's files hashed against the ledger's `center_sha256` before the next
step. A bitwise rebuild needs the float64 LAPACK results of the machine that ran the update (the
weights-space re-factorisation is a QR and an SVD); another library or CPU may round differently, and
then the hash check stops it: a one-line CentreRebuildError naming the run, the generation and both
hashes, never a silently different model.

A rebuilt centre is never put back into the store (that would undo what thinning saved, and the
ledger marks it thinned): callers get it in memory (`load_checkpoint` remembers the last few), or
as files in a scratch store of theirs (replay, a backend's PEFT folder, `es-countdown centre --out`).

The same replay restores a run whose data dir has its ledger but not its centres (`restore_centres`:
a lent GPU machine gives its disk back with it; the slim ledger, artifacts/slim.py, is what leaves):
resume replays every recorded update from the run's first centre, which it makes again from the
settings, puts back what the retention rule keeps and marks the rest thinned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from artifacts.checkpoints import checkpoint_files, load_checkpoint
from artifacts.ledger import Ledger
from artifacts.retention import RebuildChain, data_dir_ledger, kept_centres, rebuild_chain
from artifacts.store import ArtifactError, ArtifactStore, files_sha256
from es_core.countdown.problems import Problem, experiment_problems, training_batch
from es_core.es import ESState, problem_groups
from es_core.lora import AdapterSpec
from es_core.plan import generation_plan, next_state, run_space, update_rule
from es_core.search_space import search_space
from es_core.seeding import NOISE_SCHEME
from es_core.settings import Settings


class CentreRebuildError(ArtifactError):
    """A thinned centre that cannot be rebuilt here: one line naming the run, generation and hashes."""


def recorded_rewards(ledger: Ledger, run_id: str, generation: int, members: list[dict], batch: list[Problem],
                     groups: list[range] | None = None) -> tuple[list[float], list[list[float]]]:
    """A generation's recorded rewards as `aggregate` took them: each member's mean (members in
    member order), and its rewards on each of its problems in the batch's order (with `groups`, on
    its group's share)."""
    _, rows = ledger.query("SELECT member, problem_id, reward FROM samples WHERE run_id = ? AND generation = ?", [run_id, generation])
    reward = {(member, pid): r for member, pid, r in rows}
    own = groups or [range(len(batch))] * len(members)
    per_problem = [[reward[m["member"], batch[i].id] for i in mine] for m, mine in zip(members, own)]
    return [float(m["reward_mean"]) for m in members], per_problem


def checkpoint_files_as_recorded(state: ESState, spec: AdapterSpec, center_sha256: str) -> dict[str, bytes] | None:
    """The checkpoint's files in the form whose hash is `center_sha256`: compact (exact targets as
    their change alone), or a PEFT folder as ledgers before compact centres name it; None if neither."""
    for compact in (True, False):
        files = checkpoint_files(state, spec, compact)
        if files_sha256(files) == center_sha256:
            return files
    return None


def rebuilt_centre(store: ArtifactStore, center_sha256: str) -> tuple[ESState, AdapterSpec, dict[str, bytes]] | None:
    """(state, spec, files as the ledger names them) of a centre the data dir's ledger marks
    thinned, rebuilt from its nearest kept ancestor; None when it marks it nowhere (a scratch
    store, a centre never thinned: the caller's missing artifact is missing)."""
    ledger = data_dir_ledger(store)
    chain = rebuild_chain(ledger, store, center_sha256) if ledger is not None and len(center_sha256 or "") == 64 else None
    if chain is None:
        return None
    return _replay_chain(ledger, store, chain)


def _replay_chain(ledger: Ledger, store: ArtifactStore, chain: RebuildChain) -> tuple[ESState, AdapterSpec, dict[str, bytes]]:
    for _, state, spec, files in replayed(ledger, store, chain.run_id, chain.generations, chain.ancestor_sha256,
                                          f"thinned centre {chain.center_sha256}"):
        pass
    return state, spec, files


def replayed(ledger: Ledger, store: ArtifactStore, run_id: str, generations: Sequence[int],
             ancestor_sha256: str, what: str = "", es_model: Path | None = None) -> Iterator[tuple[dict, ESState, AdapterSpec, dict[str, bytes]]]:
    """The run's recorded updates of `generations` (consecutive) replayed from the centre
    `ancestor_sha256` (on disk: the centre of generations[0]): (the generation's ledger row, its new
    centre's state, spec, files as the ledger names them) after each, each hashed against the ledger's
    `center_sha256` before the next; CentreRebuildError at the first that differs, saying `what`
    (default: the centres from generations[0]'s on) cannot be rebuilt here."""
    run = ledger.run_row(run_id)
    settings = _recorded_settings(run, ledger.data_dir)
    if es_model is None:  # what its ES perturbed, as recorded (a caller that resolved it on this machine gives it)
        es_model = store.get(run["warm_start_sha256"]) if run.get("warm_start_sha256") else Path(run["base_model"])
    space, rule = run_space(settings, es_model), update_rule(settings.es)
    train, _, held_out_ids = experiment_problems(settings.data, settings.eval)
    state, spec = load_checkpoint(store, ancestor_sha256)  # its files checked against its id
    for g in generations:
        row = ledger.generation_row(run_id, g)
        plan = generation_plan(settings.es, g, space)
        members = ledger.member_rows(run_id, g)
        batch = training_batch(settings.data, train, g, held_out_ids)
        groups = problem_groups(len(members), len(batch), settings.es.members_per_prompt)
        rewards, sample_rewards = recorded_rewards(ledger, run_id, g, members, batch, groups)
        moves = search_space(plan)
        population = moves.draw(plan, moves.noise_layout(state.centre, plan.perturb))
        state, _, _ = next_state(state, population, moves, rewards, sample_rewards, rule)
        files = checkpoint_files_as_recorded(state, spec, row["center_sha256"])
        if files is None:
            got = files_sha256(checkpoint_files(state, spec))
            raise CentreRebuildError(
                f"run {run_id} generation {g}: the new centre rebuilt from the ledger hashes to {got}, the ledger records {row['center_sha256']}; "
                f"{what or f'the centres from generation {generations[0]} on'} cannot be rebuilt here (a bitwise rebuild needs the float64 LAPACK results of the "
                f"machine that ran the run, and the ledger's rewards as recorded), so nothing rebuilt is used")
        yield row, state, spec, files


@dataclass(frozen=True)
class RestoredCentres:
    """What `restore_centres` did: the run's centres from `ancestor_generation`'s on, replayed."""

    run_id: str
    ancestor_generation: int  # the centre replayed from: generation k's (k updates in it)
    stored: tuple[int, ...]  # ledger generations whose new centre it put on disk (what the retention rule keeps)
    marked: tuple[int, ...]  # those it marked thinned instead (rebuildable, as if thinned after their commit)


def restore_centres(ledger: Ledger, store: ArtifactStore, run_id: str, missing: tuple[str, tuple[int, ...]], keep_every: int,
                    es_model: Path | None = None, on_step: Callable[[int, int], None] = lambda done, total: None,
                    first_centre: str | None = None) -> RestoredCentres:
    """Rebuild the run's missing centres from the ledger (`missing`: what artifacts/retention.py
    `centres_to_restore` says, the centre to replay from and the generations to replay): each
    recorded update replayed and hash-checked (`replayed`), and each new centre put on disk where
    the retention rule keeps it (keyframes of `keep_every`, every one at 0 or 1; the latest,
    any evaluated one), the others marked thinned, one by one, so a restore cut short leaves a
    ledger whose every marked centre is rebuildable and goes on from its newest centre on disk.
    `es_model`: the model the run's ES perturbs, as resolved here; `on_step(done, total)` after each
    update; `first_centre`: the run's first centre as this code made it from the settings."""
    ancestor, generations = missing
    if generations[0] == 0 and first_centre is not None and first_centre != ancestor:
        raise CentreRebuildError(f"run {run_id}: its first centre is recorded as {ancestor}, its settings make {first_centre} here (other code, or "
                                 f"another model): its centres cannot be rebuilt from the ledger here; resume it where it ran, or start a new run id")
    if not store.exists(ancestor):
        raise ArtifactError(f"run {run_id}: its centres from generation {generations[0]} on are missing from {store.root} and the centre they are "
                            f"rebuilt from, {ancestor}, too: resume makes a run's first centre again from its settings; for any later one, "
                            f"restore it (or its data dir) from a copy")
    keep = kept_centres(ledger, run_id, keep_every)
    stored, marked = [], []
    for done, (row, _, _, files) in enumerate(replayed(ledger, store, run_id, generations, ancestor, es_model=es_model), 1):
        g = row["generation"]
        if keep(g, row["center_sha256"]):
            store.put_files(files)  # hashed as the ledger names it: replayed() checked
            stored.append(g)
        elif row["center_thinned_at"] is None:
            ledger.mark_centres_thinned(run_id, [g])  # rebuildable from here back to the ancestor, which is on disk
            marked.append(g)
        on_step(done, len(generations))
    return RestoredCentres(run_id, generations[0], tuple(stored), tuple(marked))


def _recorded_settings(run: dict, root: Path) -> Settings:
    """The run's settings as recorded (no ES_* variable read: a rebuild is the recorded run's)."""
    if run.get("noise_scheme") != NOISE_SCHEME:
        raise CentreRebuildError(f"run {run['run_id']} was recorded with noise scheme {run.get('noise_scheme')}, this code draws {NOISE_SCHEME}: "
                                 "its thinned centres cannot be rebuilt with it (use the code it was recorded with)")
    return Settings(**{**json.loads(run["config_json"]), "data_dir": str(root)})
