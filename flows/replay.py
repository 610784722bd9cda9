"""Replay a recorded generation from the ledger: rebuild its members and its new centre from the
parent centre, the member seeds and the recorded rewards, and check every hash: the rebuilt
against the ledger's, and the stored artifacts (parent, members, new centre) against their own (a
flipped byte fails the replay; a member adapter not kept, e.g. a data dir carried without them, is
noted, since its seed rebuilds it). With `reevaluate`, also decode the stored member adapters again
and compare every completion and reward with the ledger's: what was scored is what was recorded."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow

from artifacts.checkpoints import load_checkpoint, put_checkpoint
from artifacts.ledger import Ledger
from artifacts.store import ArtifactError, ArtifactStore, hash_dir
from es_core.countdown.problems import Problem, experiment_problems, training_batch
from es_core.countdown.prompt import render_prompts
from es_core.es import FITNESS, Member, es_update, perturb_center
from es_core.evaluation import score_member
from es_core.lora import save_adapter
from es_core.settings import ConfigError
from flows.crashed import mark_unfinished_task_runs_crashed
from flows.recorded import recorded_settings


@dataclass
class ReplayReport:
    run_id: str
    generation: int
    members_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    center_ok: bool = False
    rewards_checked: int = 0
    max_reward_diff: float = 0.0
    completions_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.center_ok

    def lines(self) -> list[str]:
        out = [f"run {self.run_id} generation {self.generation}: {self.members_checked} member adapters rebuilt from seeds"]
        out += [f"  MISMATCH {m}" for m in self.mismatches]
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"  new centre {'matches' if self.center_ok else 'DOES NOT match'} the ledger")
        if self.rewards_checked:
            out.append(f"  re-evaluated {self.rewards_checked} members, {self.completions_checked} completions: "
                       f"largest reward difference {self.max_reward_diff:.3g}")
        out.append("replay OK" if self.ok else "replay FAILED")
        return out


def _folder_sha(tensors, spec) -> str:
    with tempfile.TemporaryDirectory(prefix="es-replay-") as tmp:
        return hash_dir(save_adapter(tensors, Path(tmp) / "adapter", spec))


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
    es = settings.es
    store = ArtifactStore(root / "artifacts")
    store.get(row["parent_center_sha256"])  # its files against its hash (load_checkpoint may answer from memory)
    parent, spec = load_checkpoint(store, row["parent_center_sha256"])
    members = sorted(ledger.member_rows(run_id, generation), key=lambda m: m["member"])
    report = ReplayReport(run_id, generation)

    plan = [Member(m["member"], int(m["seed"]), int(m["sign"])) for m in members]
    for m, member in zip(members, plan):
        sha = _folder_sha(perturb_center(parent.center, member, es.sigma, es.perturb), spec)
        report.members_checked += 1
        if sha != m["adapter_sha256"]:
            report.mismatches.append(f"member {m['member']}: rebuilt adapter {sha[:12]} != ledger {m['adapter_sha256'][:12]}")
        _check_stored(store, m["adapter_sha256"], f"member {m['member']}", report)
    rewards = [float(m["reward_mean"]) for m in members]
    train, _, held_out_ids = experiment_problems(settings.data, settings.eval)
    batch = training_batch(settings.data, train, generation, held_out_ids)
    fitness = _fitness(ledger, run_id, generation, members, batch, es.fitness) if es.fitness != "mean_reward" else None
    new_state, _ = es_update(parent, plan, rewards, es.learning_rate, es.shaping, es.optimizer, es.perturb, (es.adam_beta1, es.adam_beta2), es.adam_eps,
                             fitness=fitness)
    with tempfile.TemporaryDirectory(prefix="es-replay-store-") as tmp:
        rebuilt = put_checkpoint(ArtifactStore(Path(tmp)), new_state, spec).sha256
    report.center_ok = rebuilt == row["center_sha256"]
    _check_stored(store, row["center_sha256"], "new centre", report)

    if reevaluate:
        report.rewards_checked, report.max_reward_diff = _reevaluate(settings, run, members, batch, generation, store, report)
    for line in report.lines():
        print(line)
    return {"ok": report.ok, "lines": report.lines()}


def _fitness(ledger, run_id: str, generation: int, members: list[dict], batch: list[Problem], kind: str) -> list[float]:
    """The members' fitness from the recorded samples, prompts in the generation's batch order."""
    _, rows = ledger.query("SELECT member, problem_id, reward FROM samples WHERE run_id = ? AND generation = ?", [run_id, generation])
    reward = {(member, pid): r for member, pid, r in rows}
    return FITNESS[kind]([[reward[m["member"], p.id] for p in batch] for m in members])


def _check_stored(store: ArtifactStore, sha256: str, what: str, report: ReplayReport) -> None:
    """The stored artifact's files against its hash: corrupt is a mismatch; absent only a note
    (member adapters are rebuilt from their seeds, and a carried data dir may leave them out)."""
    if not store.exists(sha256):
        report.notes.append(f"{what}: stored adapter {sha256[:12]} is not in {store.root} (checked from its seed only)")
        return
    try:
        store.get(sha256)
    except ArtifactError as exc:
        report.mismatches.append(f"{what}: {exc}")


def _reevaluate(settings, run, members, batch: list[Problem], generation, store, report) -> tuple[int, float]:
    from es_core.backends.base import AdapterRef
    from es_core.models import load_tokenizer
    from flows.backend import open_backend

    # ES ran on the warm-started model when there is one
    base_path = store.get(run["warm_start_sha256"]) if run.get("warm_start_sha256") else Path(run["base_model"])
    prompts = render_prompts(batch, settings.prompt.style, load_tokenizer(base_path))
    backend = open_backend(settings, base_path, Path(tempfile.mkdtemp(prefix="es-replay-")))
    try:
        refs = [AdapterRef(f"replay_g{generation}_m{m['member']:03d}", store.get(m["adapter_sha256"])) for m in members]
        completions = backend.generate(refs, prompts, settings.generation.max_new_tokens)
    finally:
        backend.close()
    _, rows = Ledger(Path(settings.data_dir)).query(
        "SELECT member, problem_id, completion FROM samples WHERE run_id = ? AND generation = ?", [run["run_id"], generation])
    recorded = {(member, problem): text for member, problem, text in rows}
    worst = 0.0
    for m, comps in zip(members, completions):
        reward = score_member(batch, prompts, comps, settings.reward.kind).reward_mean
        diff = abs(reward - float(m["reward_mean"]))
        worst = max(worst, diff)
        if diff > 1e-9:
            report.mismatches.append(f"member {m['member']}: re-evaluated reward {reward:.6f} != ledger {float(m['reward_mean']):.6f}")
        differ = [p.id for p, c in zip(batch, comps) if recorded.get((m["member"], p.id)) != c.text]
        report.completions_checked += len(comps)
        if differ:
            report.mismatches.append(f"member {m['member']}: re-decoding its stored adapter gives other completions than the ledger's "
                                     f"for {len(differ)} of {len(comps)} problems (first {differ[0]})")
    return len(members), worst
