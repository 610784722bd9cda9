"""What `es-countdown sql | runs | lineage | export | gc | verify` do, as plain functions that return text or data
(the argparse wiring is in artifacts/cli.py). Errors are one-line CommandError, LedgerError or
ArtifactError; the CLI prints them and exits 2."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from artifacts.ledger import LEDGER_FILE, Ledger, to_jsonable
from artifacts.retention import RebuildChain, centres_to_restore, rebuild_chain, thin_centres
from artifacts.runs import data_dir_busy, exclusive_data_dir
from artifacts.store import ArtifactError, ArtifactStore, remove_path
from es_core.keyframes import keeps_every_centre

ARTIFACTS_DIR = "artifacts"  # under the data dir, as tasks/common.DataDir lays it out
TASK_RESULTS_DIR = "task-results"  # likewise: Prefect's cached task results
FORMATS = ("table", "csv", "json")


class CommandError(ValueError):
    """A refused command: one line."""


def default_data_dir(value: str | os.PathLike | None = None) -> Path:
    """--data-dir, else ES_DATA_DIR, else ./runs."""
    return Path(value or os.environ.get("ES_DATA_DIR") or "runs").resolve()


def open_ledger(data_dir: str | os.PathLike | None) -> Ledger:
    """The ledger of an existing data dir; a missing dir or file is a one-line CommandError."""
    root = default_data_dir(data_dir)
    if not root.is_dir():
        raise CommandError(f"no data dir at {root} (give --data-dir DIR or set ES_DATA_DIR)")
    if not (root / LEDGER_FILE).is_file():
        raise CommandError(f"no ledger at {root / LEDGER_FILE} (no run has written to this data dir yet)")
    return Ledger(root)


# --- sql ---------------------------------------------------------------------------------------


def format_rows(columns: list[str], rows: list[tuple], fmt: str = "table", max_width: int = 64) -> str:
    """Rows as an aligned text table (long cells cut to max_width), CSV, or a JSON array of objects."""
    if fmt == "json":
        objects = [json.dumps(dict(zip(columns, (to_jsonable(v) for v in row))), ensure_ascii=False) for row in rows]
        return "[\n" + ",\n".join(objects) + "\n]\n" if objects else "[]\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else _csv_cell(v) for v in row])
        return buf.getvalue()
    if fmt != "table":
        raise CommandError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    cells = [[_table_cell(v, max_width) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines) + "\n"


def _csv_cell(value) -> str:
    value = to_jsonable(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _table_cell(value, max_width: int) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        value = to_jsonable(value)
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def sql(data_dir, query: str, fmt: str = "table", max_width: int = 64) -> str:
    """Run one read-only query against the ledger and format the result."""
    if fmt not in FORMATS:
        raise CommandError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if not query.strip():
        raise CommandError('sql: the query is empty (e.g. es-countdown sql "SELECT * FROM runs")')
    columns, rows = open_ledger(data_dir).query(query)
    return format_rows(columns, rows, fmt, max_width)


# --- runs ----------------------------------------------------------------------------------------

_RUNS_SQL = """
SELECT r.run_id, r.run_name, r.status, r.created_at, r.updated_at,
       (SELECT max(g.generation) FROM generations g WHERE g.run_id = r.run_id) AS last_generation,
       TRY_CAST(json_extract(r.config_json, '$.es.generations') AS INTEGER) AS generations_planned
FROM runs r ORDER BY r.created_at, r.run_id
"""
# per run and held-out set: the best accuracy of any model evaluated on it (centre, base, warm start)
_BEST_SQL = """
SELECT run_id, split, max(accuracy) AS accuracy, arg_max(model, (accuracy, -generation)) AS model,
       arg_max(generation, (accuracy, -generation)) AS generation
FROM evals WHERE accuracy IS NOT NULL GROUP BY run_id, split ORDER BY run_id, split = 'heldout' DESC, split
"""


def runs_data(data_dir) -> list[dict]:
    """Every run of the ledger, oldest first: id, name, status, generations committed and planned,
    the best held-out accuracy per set, when it started. A run recorded `running` that no process
    is writing (the data dir's writers.lock is free) shows as `interrupted`: it was killed."""
    ledger = open_ledger(data_dir)
    columns, rows = ledger.query(_RUNS_SQL)
    _, best_rows = ledger.query(_BEST_SQL)
    best: dict[str, dict] = {}
    for run_id, split, accuracy, model, generation in best_rows:
        best.setdefault(run_id, {})[split] = {"accuracy": accuracy, "model": model, "generation": generation}
    writing = data_dir_busy(ledger.data_dir)
    out = []
    for row in rows:
        run = dict(zip(columns, row))
        last = run.pop("last_generation")
        status = run["status"]
        out.append({
            "run_id": run["run_id"], "run_name": run["run_name"],
            "status": "interrupted" if status == "running" and not writing else status, "recorded_status": status,
            "generations_committed": 0 if last is None else last + 1, "generations_planned": run["generations_planned"],
            "best_heldout": best.get(run["run_id"], {}), "started_at": run["created_at"], "updated_at": run["updated_at"],
        })
    return out


def runs(data_dir, fmt: str = "table") -> str:
    """`es-countdown runs`: the runs as a table (or JSON)."""
    data = runs_data(data_dir)
    if fmt == "json":
        return json.dumps(to_jsonable(data), indent=1) + "\n"
    if fmt != "table":
        raise CommandError(f"unknown format {fmt!r} (table or json)")
    if not data:
        return f"no runs in the ledger at {open_ledger(data_dir).path}\n"

    def best_text(best: dict) -> str:
        return ", ".join(f"{split} {b['accuracy']:.3g} ({b['model']} g{b['generation']})" for split, b in best.items()) or "-"

    columns = ["run_id", "name", "status", "generations", "best held-out accuracy", "started (UTC)"]
    rows = [(r["run_id"], r["run_name"] or "", r["status"], f"{r['generations_committed']}/{r['generations_planned'] if r['generations_planned'] is not None else '?'}",
             best_text(r["best_heldout"]), f"{r['started_at']:%Y-%m-%d %H:%M}" if r["started_at"] else "") for r in data]
    return format_rows(columns, rows, "table", max_width=200)


# --- lineage -------------------------------------------------------------------------------------


def lineage_text(steps: list[dict]) -> str:
    """The lineage of `Ledger.lineage` for a terminal, newest first."""
    out = []
    for step in steps:
        if step["kind"] == "member":
            out.append(
                f"member {step['member']} of generation {step['generation']} (run {step['run_id']}): adapter {step['adapter_sha256']}\n"
                f"  = centre {step['center_sha256'][:12]} + sigma * ({step['sign']:+d}) * eps(seed {step['seed']}), reward {_num(step['reward_mean'])}"
            )
        elif step["kind"] == "update":
            members = ", ".join(f"{m['member']}:{m['seed']}{'+' if m['sign'] >= 0 else '-'}={_num(m['reward_mean'])}" for m in step["members"])
            out.append(
                f"generation {step['generation']} (run {step['run_id']}): centre {step['center_sha256']}\n"
                f"  from centre {step['parent_center_sha256'][:12]}; member rewards mean {_num(step['reward_mean'])} std {_num(step['reward_std'])} "
                f"max {_num(step['reward_max'])}; update norm {_num(step.get('update_norm'))}\n"
                f"  members (index:seed sign=reward): {members}"
            )
        elif step["kind"] == "init":
            out.append(f"initial centre (run {step['run_id']}): {step['center_sha256']}")
        elif step["kind"] == "warm_start":
            continued = f", continuing warm start {step['parent_warm_start_sha256'][:12]}" if step["parent_warm_start_sha256"] else ""
            out.append(
                f"warm start {step['warm_start_sha256']}: {step['steps']} supervised steps on base {(step['base_model_sha256'] or '?')[:12]}{continued}\n"
                f"  {_num(step['seconds'])} s of training, final loss {_num(step['final_loss'])}"
            )
        else:
            out.append(f"base model {step['base_model']}: {step['base_model_sha256']}")
    return "\n".join(out) + "\n"


def _num(value) -> str:
    return "NULL" if value is None else f"{value:.6g}"


def lineage(data_dir, sha: str, run_id: str | None = None, fmt: str = "table") -> str:
    steps = open_ledger(data_dir).lineage(sha, run_id)
    if fmt == "json":
        return json.dumps(to_jsonable(steps), indent=1) + "\n"
    return lineage_text(steps)


# --- export --------------------------------------------------------------------------------------


def export(data_dir, run_id: str, out: str | os.PathLike | None = None) -> list[Path]:
    """One Parquet file per table, filtered to the run (problems: the whole table, it has no run
    column). Default folder: <data_dir>/exports/<run_id>/."""
    ledger = open_ledger(data_dir)
    if ledger.run_row(run_id) is None:
        raise CommandError(f"run {run_id} is not in the ledger at {ledger.path}")
    out_dir = Path(out) if out else ledger.data_dir / "exports" / run_id
    return ledger.export_parquet(run_id, out_dir)


# --- centre ----------------------------------------------------------------------------------------


def centre(data_dir, sha: str, out: str | os.PathLike | None = None, peft: bool = False) -> str:
    """Write a centre the ledger names into `out` (default <data_dir>/exports/centres/<sha prefix>):
    its files as the ledger names them (their id is its sha256), or with `peft` the PEFT folder a
    backend loads. A thinned centre is rebuilt from the ledger (artifacts/rebuild.py, every hash
    checked); the store is left as it is."""
    import shutil

    from artifacts.checkpoints import adapter_folder, centre_files  # torch: the other commands do without it
    from artifacts.store import hash_dir

    ledger = open_ledger(data_dir)
    sha = ledger.resolve_sha(sha)
    _, named = ledger.query("SELECT count(*) FROM generations WHERE center_sha256 = ? OR parent_center_sha256 = ?", [sha, sha])
    if not named[0][0]:
        raise CommandError(f"{sha} is no centre in the ledger at {ledger.path}")
    out_dir = Path(out) if out else ledger.data_dir / "exports" / "centres" / sha[:12]
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CommandError(f"{out_dir} is not empty: give another --out")
    store = ArtifactStore(ledger.data_dir / ARTIFACTS_DIR)
    thinned = not store.path(sha).is_dir()
    with store.scratch("centre") as scratch:
        if peft:  # adapter_folder rebuilds a thinned centre itself: one rebuild, not two
            folder = adapter_folder(store, sha, scratch)
        else:
            rebuilt = centre_files(store, sha)
            folder = store.get(sha) if rebuilt is None else scratch.put_files(rebuilt).path
        shutil.copytree(folder, out_dir, dirs_exist_ok=True)
    for path in out_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the store's files are read-only; a user's copy is theirs
    how = "rebuilt from the ledger (thinned from the store)" if thinned else "from the store"
    what = "its PEFT folder" if peft else f"its files, sha256 {hash_dir(out_dir)}"
    return f"centre {sha} {how}: {what} in {out_dir}\n"


# --- gc ------------------------------------------------------------------------------------------


@dataclass
class GcPlan:
    remove: list[tuple[str, int]] = field(default_factory=list)  # (sha256, bytes)
    leftovers: list[tuple[Path, int]] = field(default_factory=list)  # unfinished puts, orphan manifests
    cached_results: list[Path] = field(default_factory=list)  # cached task results that name an artifact to remove
    kept_young: int = 0
    kept_referenced: int = 0

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.remove) + sum(b for _, b in self.leftovers)


def check_min_age(min_age_s: float) -> None:
    # NaN compares false: `age < nan` kept nothing, so every unreferenced artifact counted as old
    if not math.isfinite(min_age_s) or min_age_s < 0:
        raise CommandError(f"gc: --min-age-hours must be a finite number of hours >= 0 (got {min_age_s / 3600:g})")


_SHA_IN_BYTES = re.compile(rb"[0-9a-f]{64}")


def cached_results_naming(task_results: Path, shas: set[str]) -> list[Path]:
    """The cached task results (Prefect result files: JSON, the value base64-pickled, its strings
    in clear) that name one of `shas`. A resume would take such a result from the cache and load a
    removed artifact (a centre a killed run wrote, not yet committed); without it the task runs
    again and writes the same content again."""
    found = []
    for path in sorted(task_results.iterdir()) if task_results.is_dir() else []:
        try:
            raw = base64.b64decode(json.loads(path.read_bytes())["result"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a result file of ours
        if any(m.decode() in shas for m in _SHA_IN_BYTES.findall(raw)):
            found.append(path)
    return found


def centres_named_by_members(store: ArtifactStore, shas) -> dict[str, str]:
    """{centre sha256: a member naming it} for the weights-space members among `shas`: a member's
    record (es_member.json) is that centre plus what its seed draws, nothing without it, so what
    the ledger names keeps (gc) and checks (verify) the centres its members name too."""
    from es_core.weights_space import MEMBER_FILE, record_centre_sha256  # torch: sql and runs do without it

    named = {}
    for sha in sorted(shas):
        note = store.path(sha) / MEMBER_FILE
        if note.is_file():
            try:
                named.setdefault(record_centre_sha256(note.read_bytes(), str(note)), sha)
            except (OSError, ValueError):
                continue  # not a record of ours: verify judges its bytes, not its meaning
    return named


def gc_plan(data_dir, min_age_s: float = 86400.0) -> GcPlan:
    """Artifacts no ledger row references (any column named *_sha256), nor a member it references
    (its centre), older than min_age_s, and the cached task results that name them."""
    check_min_age(min_age_s)
    ledger = open_ledger(data_dir)
    store = ArtifactStore(ledger.data_dir / ARTIFACTS_DIR)
    referenced = ledger.referenced_sha256()
    referenced |= set(centres_named_by_members(store, referenced))
    plan = GcPlan()
    for sha, _ in store.iter_artifacts():
        if sha in referenced:
            plan.kept_referenced += 1
        elif store.age_s(sha) < min_age_s:
            plan.kept_young += 1
        else:
            plan.remove.append((sha, store.size(sha)))
    plan.leftovers = store.leftovers(min_age_s)
    if plan.remove:
        plan.cached_results = cached_results_naming(ledger.data_dir / TASK_RESULTS_DIR, {sha for sha, _ in plan.remove})
    return plan


def gc(data_dir, yes: bool = False, min_age_s: float = 86400.0, thin_centres_every: int = 0) -> str:
    """Dry run unless yes: list what would go and the bytes freed; with yes, remove it, holding the
    data dir's writers.lock exclusively (refused while a run writes there: artifacts/runs.py). With
    `thin_centres_every` K > 1, also thin every run's centres to keyframes every K generations
    (artifacts/retention.py: never a run's latest or first centre, nor one an evaluation names),
    as a run with store.keep_centre_every K does itself: for runs recorded without it."""
    check_min_age(min_age_s)
    if thin_centres_every < 0:
        raise CommandError(f"gc: --thin-centres must be a number of generations >= 0 (got {thin_centres_every})")
    root = open_ledger(data_dir).data_dir
    if not yes:
        busy = " (a run is writing this data dir now: gc --yes would refuse)" if data_dir_busy(root) else ""
        return _gc(root, False, min_age_s, busy, thin_centres_every)
    with exclusive_data_dir(root):  # no run is live meanwhile: none is reading a centre thinned here
        return _gc(root, True, min_age_s, "", thin_centres_every)


def _thin(root: Path, yes: bool, keep_every: int) -> tuple[list[str], int]:
    """gc's thinning of every run's centres: (lines, bytes freed)."""
    if keeps_every_centre(keep_every):
        return [], 0
    ledger, store = Ledger(root), ArtifactStore(root / ARTIFACTS_DIR)
    _, run_ids = ledger.query("SELECT run_id FROM runs ORDER BY created_at, run_id")
    thinned = [c for (run_id,) in run_ids for c in thin_centres(ledger, store, run_id, keep_every, dry_run=not yes)]
    verb = "thinned" if yes else "would thin"
    lines = [f"{verb} centre {c.center_sha256}  {_bytes(c.bytes)} (run {c.run_id}, generation {c.generation}'s new centre; "
             f"keyframes every {keep_every} generations)" for c in thinned]
    freed = sum(c.bytes for c in thinned)
    lines.append(f"{verb} {len(thinned)} centre(s) to keyframes every {keep_every} generations, {_bytes(freed)}"
                 + ("" if yes or not thinned else " (dry run: add --yes to thin)"))
    return lines, freed


def _gc(root: Path, yes: bool, min_age_s: float, note: str, thin_centres_every: int = 0) -> str:
    thin_lines, _ = _thin(root, yes, thin_centres_every)
    plan = gc_plan(root, min_age_s)
    store = ArtifactStore(root / ARTIFACTS_DIR)
    verb = "removed" if yes else "would remove"
    lines = list(thin_lines)
    for path in plan.cached_results:  # first: a result never names a removed artifact, even after a kill mid-gc
        if yes:
            path.unlink(missing_ok=True)
        lines.append(f"{verb} {path} (a cached task result naming an artifact below)")
    for sha, size in plan.remove:
        if yes:
            store.remove(sha)
        lines.append(f"{verb} {sha}  {_bytes(size)}")
    for path, size in plan.leftovers:
        if yes:
            remove_path(path)
        lines.append(f"{verb} {path}  {_bytes(size)} (unfinished write)")
    lines.append(
        f"{verb} {len(plan.remove)} unreferenced artifact(s), {len(plan.cached_results)} cached task result(s) naming them and "
        f"{len(plan.leftovers)} leftover(s), {_bytes(plan.bytes)}; "
        f"kept {plan.kept_referenced} referenced and {plan.kept_young} younger than {min_age_s / 3600:g} h"
        + ("" if yes or not (plan.remove or plan.leftovers) else " (dry run: add --yes to delete)") + note
    )
    return "\n".join(lines) + "\n"


# --- verify --------------------------------------------------------------------------------------


def verify(data_dir, run_id: str | None = None, rebuild: bool = False) -> tuple[str, bool]:
    """Rehash every artifact the ledger references (of one run, or all), and the centres its
    weights-space members name: (text, all intact). The
    text has one line per missing artifact (its folder) and per corrupt one (the file whose bytes
    differ, from the artifact's manifest), each with the ledger columns that reference it, one per
    centre thinned by store.keep_centre_every (`THINNED ...: rebuildable from generation k's centre`:
    the ledger marks it thinned and every centre back to a kept one is on disk or thinned too; not
    rebuilt here, `es-countdown centre SHA` does), then a summary line. A thinned centre is no failure;
    one gone without its mark, or whose chain is broken (a keyframe deleted by hand), is missing. A
    run whose latest centres are missing while the ledger records every update since one on disk or
    its first (a ledger carried without its artifacts) also gets a `RESTORABLE` line: resume rebuilds them.
    With `rebuild`, each thinned centre is also rebuilt (artifacts/rebuild.py: one update per
    generation back to its keyframe, every step's hash checked; one replay a keyframe span): before a data dir moves to another
    machine, or its keyframes are the only copy, this says that this machine can rebuild them
    (`UNREBUILDABLE ...`, a failure, where a step's hash differs)."""
    ledger = open_ledger(data_dir)
    if run_id is not None and ledger.run_row(run_id) is None:
        raise CommandError(f"run {run_id} is not in the ledger at {ledger.path}")
    store = ArtifactStore(ledger.data_dir / ARTIFACTS_DIR)
    referenced: dict[str, list[str]] = {}
    for sha, table, column in ledger.artifact_references(run_id):
        referenced.setdefault(sha, []).append(f"{table}.{column}")
    for centre, member in centres_named_by_members(store, list(referenced)).items():
        referenced.setdefault(centre, []).append(f"the member {member[:12]}")
    lines, missing, corrupt = [], 0, 0
    chains: dict[str, tuple[RebuildChain, list[str]]] = {}  # thinned centre -> (its chain, what references it)
    for sha, where in sorted(referenced.items()):
        try:
            store.get(sha)  # every file against the artifact's id
            continue
        except ArtifactError as exc:
            if store.path(sha).is_dir():
                corrupt += 1
                lines.append(f"CORRUPT {exc} (referenced by {', '.join(where)})")
                continue
            try:  # a centre thinned by store.keep_centre_every is not missing while its chain to a kept centre holds
                chain = rebuild_chain(ledger, store, sha)
            except ArtifactError as broken:
                chain, exc = None, broken
            if chain is not None:
                chains[sha] = (chain, where)
            else:
                missing += 1
                lines.append(f"MISSING {exc} (referenced by {', '.join(where)})")
    failures = _rebuild_spans(store, [chain for chain, _ in chains.values()]) if rebuild else {}
    for sha, (chain, where) in chains.items():
        if sha in failures:
            lines.append(f"UNREBUILDABLE {sha}: {failures[sha]} (referenced by {', '.join(where)})")
        else:
            lines.append(f"THINNED {sha}: {chain.describe()}{', rebuilt: the hash the ledger records' if rebuild else ''} "
                         f"(referenced by {', '.join(where)})")
    lines += _restorable(ledger, store, run_id)
    unrebuildable = len(failures)
    thinned = len(chains) - unrebuildable
    scope = f"run {run_id}" if run_id is not None else f"the ledger at {ledger.path}"
    rebuildable = f"{thinned} thinned ({'rebuilt' if rebuild else 'rebuildable'}), " if thinned else ""
    failed_rebuilds = f"{unrebuildable} thinned but not rebuildable here, " if unrebuildable else ""
    lines.append(f"verified {len(referenced)} artifacts referenced by {scope}: {len(referenced) - missing - corrupt - thinned - unrebuildable} intact, "
                 f"{rebuildable}{failed_rebuilds}{missing} missing, {corrupt} corrupt")
    return "\n".join(lines) + "\n", not (missing or corrupt or unrebuildable)


def _restorable(ledger: Ledger, store: ArtifactStore, run_id: str | None) -> list[str]:
    """A line for each run whose latest centre is missing, unmarked, while the ledger holds every
    update since a centre on disk or the run's first (a ledger carried without its artifacts): what
    rebuilds them. Those centres stay counted missing until then."""
    run_ids = [run_id] if run_id is not None else [r for (r,) in ledger.query("SELECT run_id FROM runs ORDER BY run_id")[1]]
    lines = []
    for run in run_ids:
        todo = centres_to_restore(ledger, store, run)
        if todo is None:
            continue
        ancestor, generations = todo
        # the newest centre on disk, or (none on disk) the run's first
        source = f"generation {generations[0]}'s centre {ancestor[:12]}" if store.exists(ancestor) else "its first centre (which the run makes again)"
        lines.append(f"RESTORABLE run {run}: its centres after {source} are missing, but the ledger records the {len(generations)} update(s) "
                     f"that made them: `es-countdown resume {run}` rebuilds them (each hash-checked) before it goes on")
    return lines


def _rebuild_spans(store: ArtifactStore, chains: list[RebuildChain]) -> dict[str, str]:
    """Rebuild the thinned centres of `chains`, every step's hash checked: {centre: why not} for
    those that cannot be rebuilt here. The chains from one kept centre are prefixes of the longest,
    whose rebuild passes through (and hash-checks) each of their centres: one rebuild a span, K - 1
    updates at keyframes every K, not one per centre (about K^2 / 2). Where the longest fails, each
    of its span is rebuilt alone to tell which ones this machine cannot rebuild."""
    from artifacts.rebuild import rebuilt_centre  # torch: verify without --rebuild does without it

    spans: dict[tuple[str, str], list[RebuildChain]] = {}
    for chain in chains:
        spans.setdefault((chain.run_id, chain.ancestor_sha256), []).append(chain)
    failures: dict[str, str] = {}
    for span in spans.values():
        span.sort(key=lambda chain: len(chain.generations))
        try:
            rebuilt_centre(store, span[-1].center_sha256)
            continue
        except ArtifactError:
            pass
        for chain in span:
            try:
                rebuilt_centre(store, chain.center_sha256)
            except ArtifactError as failed:
                failures[chain.center_sha256] = str(failed)
    return failures


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


__all__ = ["centre", "CommandError", "default_data_dir", "open_ledger", "format_rows", "sql", "runs", "runs_data", "lineage", "lineage_text", "export", "gc", "gc_plan", "GcPlan", "verify"]
