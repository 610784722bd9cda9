"""Replay a recorded generation from the ledger with the run's own tasks: `write_members` rebuilds its
members and `aggregate` its new centre from the parent centre, the generation's plan and the
recorded rewards, in a scratch store (the data dir is only read: a read-only copy can be replayed).
Plan and update rule come from the recorded settings through the run's own `generation_plan` and
`update_rule` (the ledger's member seeds are checked against the plan). Every
hash is checked: the rebuilt against the ledger's, and the stored artifacts (parent, members, new
centre) against their own (a flipped byte fails the replay; a member adapter not kept, e.g. a data
dir carried without them, is noted, since its seed rebuilds it). With `reevaluate`, the stored
member adapters are also decoded again (`evaluate_adapters`, from the files the ledger names) and
every completion and reward compared with the ledger's: what was scored is what was recorded.

A parent centre thinned from the store (store.keep_centre_every) is rebuilt from its nearest kept
ancestor first (artifacts/rebuild.py, each step's hash checked against the ledger). Replay's scratch
stores live under the data dir's store tmp (`ArtifactStore.tmp`: the same filesystem, which the
preflight measures and gc clears of leftovers), not in the system's /tmp, where a 425 MB centre and
its members could fill a small root disk; only a read-only data dir is replayed in /tmp."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefect import flow
from prefect.utilities.annotations import quote

from artifacts.checkpoints import centre_files, checkpoint_files, load_checkpoint, served_adapter
from artifacts.ledger import Ledger
from artifacts.rebuild import recorded_rewards
from artifacts.retention import data_dir_ledger, rebuild_chain
from artifacts.store import ArtifactError, ArtifactStore, files_sha256
from es_core.countdown.problems import Problem, experiment_problems, training_batch
from es_core.countdown.prompt import render_prompts
from es_core.es import Member, problem_groups
from es_core.plan import generation_plan, run_space, update_rule
from es_core.settings import ConfigError
from flows.crashed import mark_unfinished_task_runs_crashed
from flows.recorded import recorded_settings
from tasks.common import NO_CACHE, evaluation_key
from tasks.evaluate import evaluate_adapters
from tasks.members import GenerationMembers
from tasks.population import aggregate, write_members


@dataclass
class ReplayReport:
    run_id: str
    generation: int
    members_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    centre_ok: bool = False
    rewards_checked: int = 0
    max_reward_diff: float = 0.0
    completions_checked: int = 0

    corrupt: list[str] = field(default_factory=list)  # stored files whose bytes do not match their hash
    center_sha256: str = ""

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.corrupt and self.centre_ok

    def lines(self) -> list[str]:
        # Each line says what it compared: the rebuild against the ledger's hashes (MISMATCH), the
        # stored files against their own (CORRUPT). "new centre matches the ledger" beside a
        # MISMATCH of the stored centre read as a contradiction.
        out = [f"run {self.run_id} generation {self.generation}: {self.members_checked} member adapters rebuilt from seeds"]
        out += [f"  MISMATCH {m}" for m in self.mismatches]
        out += [f"  CORRUPT {c}" for c in self.corrupt]
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"  rebuilt new centre: {'the' if self.centre_ok else 'NOT the'} hash the ledger records ({self.center_sha256[:12]})")
        if self.rewards_checked:
            out.append(f"  re-evaluated {self.rewards_checked} members, {self.completions_checked} completions: "
                       f"largest reward difference {self.max_reward_diff:.3g}")
        problems = [f"{len(self.mismatches)} mismatch(es) with the ledger"] * bool(self.mismatches) + [f"{len(self.corrupt)} corrupt stored artifact(s)"] * bool(self.corrupt)
        problems += ["the rebuilt centre differs"] * (not self.centre_ok)
        out.append("replay OK" if self.ok else f"replay FAILED: {', '.join(problems)}")
        return out


def _replayed(task):
    """The run's task, run again: never answered from the cache (that would check nothing), nothing persisted."""
    return task.with_options(cache_policy=NO_CACHE, persist_result=False)


@flow(name="es-countdown-replay", log_prints=True, on_crashed=[mark_unfinished_task_runs_crashed])
def replay(run_id: str, generation: int, data_dir: str, reevaluate: bool = False) -> dict:
    """Rebuild generation `generation` of a run and verify it against the ledger."""
    root = Path(data_dir)
    ledger = Ledger(root)
    run = ledger.run_row(run_id)
    if run is None:
        raise ConfigError(f"run {run_id} is not in the ledger at {root / 'ledger.duckdb'}")
    row = ledger.generation_row(run_id, generation)
    if row is None:
        raise ConfigError(f"run {run_id} has no recorded generation {generation} (last: {ledger.last_generation(run_id)})")
    settings = recorded_settings(run, root, verb="replay")  # as recorded: an ES_* variable that changes results is refused
    store = ArtifactStore(root / "artifacts")
    members = sorted(ledger.member_rows(run_id, generation), key=lambda m: m["member"])
    train, _, held_out_ids = experiment_problems(settings.data, settings.eval)
    batch = training_batch(settings.data, train, generation, held_out_ids)
    report = ReplayReport(run_id, generation)
    groups = problem_groups(len(members), len(batch), settings.es.members_per_prompt)  # each member's problems, as the run decoded them

    es_model = store.get(run["warm_start_sha256"]) if run.get("warm_start_sha256") else Path(run["base_model"])  # what its ES perturbed
    plan = generation_plan(settings.es, generation, run_space(settings, es_model) if settings.es.space == "weights" else None)  # as the run planned it
    recorded = tuple(Member(m["member"], int(m["seed"]), int(m["sign"])) for m in members)
    if recorded != plan.members:
        report.mismatches.append(f"the ledger's members (index, seed, sign) are not generation {generation}'s plan: the rest checks the ledger's")
        plan = replace(plan, members=recorded)

    with scratch_dir(store, "es-replay-store-") as scratch:
        parent = row["parent_center_sha256"]
        _put_parent(store, parent, ArtifactStore(Path(scratch)), report)
        rebuilt = _replayed(write_members)(scratch, parent, quote(plan))
        factor_records = None
        for i, (m, (sha, _)) in enumerate(zip(members, rebuilt)):
            report.members_checked += 1
            if sha != m["adapter_sha256"] and plan.space is not None:  # a ledger from before member records names factor files
                factor_records = factor_records or GenerationMembers(scratch, parent, plan).factor_record_sha256s()
                sha = factor_records[i]
            if sha != m["adapter_sha256"]:
                report.mismatches.append(f"member {m['member']}: rebuilt adapter {sha[:12]} != ledger {m['adapter_sha256'][:12]}")
            _check_stored(store, m["adapter_sha256"], f"member {m['member']}", report)
        update = _replayed(aggregate)(
            scratch, parent, quote(plan), quote([float(m["reward_mean"]) for m in members]),
            quote(recorded_rewards(ledger, run_id, generation, members, batch, groups)[1]), update_rule(settings.es),
        )
        report.centre_ok, report.center_sha256 = update["center_sha256"] == row["center_sha256"], row["center_sha256"]
        if not report.centre_ok and plan.space is not None:  # a ledger from before compact centres names the PEFT folder
            state, spec = load_checkpoint(ArtifactStore(Path(scratch)), update["center_sha256"])
            report.centre_ok = files_sha256(checkpoint_files(state, spec, compact=False)) == row["center_sha256"]
        _check_stored(store, row["center_sha256"], "new centre", report)
        if reevaluate:  # a member not in the store (a data dir that got its ledger alone) is decoded as rebuilt, where its hash is the ledger's
            report.rewards_checked, report.max_reward_diff = _reevaluate(settings, run, members, batch, generation, store, report,
                                                                         ArtifactStore(Path(scratch)))
    for line in report.lines():
        print(line)
    return {"ok": report.ok, "lines": report.lines()}


def scratch_dir(store: ArtifactStore, prefix: str):
    """A temporary folder under the store's tmp (removed after; a kill leaves it to gc), or in the
    system's temporary folder when the data dir cannot be written (a read-only copy replays)."""
    try:
        store.tmp.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=prefix, dir=store.tmp)
    except OSError:
        return tempfile.TemporaryDirectory(prefix=prefix)


def _put_parent(store: ArtifactStore, parent: str, scratch: ArtifactStore, report: ReplayReport) -> None:
    """The parent centre into the scratch store the replayed tasks read: its stored files, checked
    against its hash on the way, or a thinned one rebuilt (its hash checked at every step)."""
    rebuilt = centre_files(store, parent)
    if rebuilt is None:
        scratch.put_dir(store.get(parent))
        return
    scratch.put_files(rebuilt)
    chain = rebuild_chain(data_dir_ledger(store), store, parent)
    report.notes.append(f"parent centre {parent[:12]} was thinned: rebuilt from the ledger, {chain.describe()}, every hash as recorded")


def _check_stored(store: ArtifactStore, sha256: str, what: str, report: ReplayReport) -> None:
    """The stored artifact's files against its hash: corrupt is a mismatch; absent only a note
    (member adapters are rebuilt from their seeds, and a carried data dir may leave them out; a
    thinned centre from its ancestor)."""
    if not store.exists(sha256) and (ledger := data_dir_ledger(store)) is not None and ledger.thinned_centre_row(sha256) is not None:
        report.notes.append(f"{what}: {sha256[:12]} was thinned from {store.root} (store.keep_centre_every): checked by its rebuild only")
        return
    if not store.exists(sha256):
        report.notes.append(f"{what}: stored adapter {sha256[:12]} is not in {store.root} (checked from its seed only)")
        return
    try:
        store.get(sha256)
    except ArtifactError as exc:
        report.corrupt.append(f"stored {what}: {exc}")


def _reevaluate(settings, run, members, batch: list[Problem], generation, store, report, rebuilt: ArtifactStore) -> tuple[int, float]:
    from es_core.models import SOURCE_FILE, load_tokenizer, verify_model_folder
    from flows.backend import open_backend

    # ES ran on the warm-started model when there is one
    model_sha = run.get("warm_start_sha256") or run["base_model_sha256"]
    base_path = store.get(run["warm_start_sha256"]) if run.get("warm_start_sha256") else Path(run["base_model"])
    if (base_path / SOURCE_FILE).is_file():  # a converted or created base model: its files as built
        verify_model_folder(base_path)
    prompts = render_prompts(batch, settings.prompt.style, load_tokenizer(base_path))
    with scratch_dir(store, "es-replay-") as scratch:
        backend = open_backend(settings, base_path, Path(scratch) / "backend")
        try:
            # a weights-space member's file is its record (or its own factors): the backend gets the whole member
            served = ArtifactStore(Path(scratch) / "served")
            sources = [store if store.exists(m["adapter_sha256"]) else rebuilt for m in members]  # rebuilt: content-addressed, the same files
            adapters = [(f"replay_g{generation}_m{m['member']:03d}", served_adapter(source, m["adapter_sha256"], served)) for m, source in zip(members, sources)]
            if rebuilt in sources:
                report.notes.append(f"{sources.count(rebuilt)} member adapter(s) not in the store: decoded as rebuilt from their seeds (the ledger's hash)")
            scores = _replayed(evaluate_adapters)(quote(backend), str(served.root), adapters, quote(batch), quote(prompts),
                                                 settings.generation.max_new_tokens, settings.reward.kind, evaluation_key(settings, model_sha),
                                                 settings.es.members_per_prompt)
        finally:
            backend.close()
    _, rows = Ledger(Path(settings.data_dir)).query(
        "SELECT member, problem_id, completion FROM samples WHERE run_id = ? AND generation = ?", [run["run_id"], generation])
    recorded = {(member, problem): text for member, problem, text in rows}
    worst, textless = 0.0, 0
    for m, score in zip(members, scores):
        reward = score.reward_mean
        diff = abs(reward - float(m["reward_mean"]))
        worst = max(worst, diff)
        if diff > 1e-9:
            report.mismatches.append(f"member {m['member']}: re-evaluated reward {reward:.6f} != ledger {float(m['reward_mean']):.6f}")
        # a slim ledger (artifacts/slim.py) keeps no text but the last generation's: those are compared by reward alone
        with_text = [s for s in score.samples if recorded.get((m["member"], s.problem_id)) is not None]
        textless += len(score.samples) - len(with_text)
        differ = [s.problem_id for s in with_text if recorded[m["member"], s.problem_id] != s.completion]
        report.completions_checked += len(with_text)
        if differ:
            report.mismatches.append(f"member {m['member']}: re-decoding its stored adapter gives other completions than the ledger's "
                                     f"for {len(differ)} of {len(score.samples)} problems (first {differ[0]})")
    if textless:
        report.notes.append(f"the ledger holds no text for {textless} of these completions (a slim copy keeps the last generation's only): "
                            "their rewards compared, not their text")
    return len(members), worst
