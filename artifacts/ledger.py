"""The lineage ledger: one DuckDB file per data dir (`<data_dir>/ledger.duckdb`), documented table
by table in docs/ledger.md.

Concurrency. DuckDB lets one process write a file, and while any process has the file open
read-write no other process can open it at all (and an open read-only connection keeps writers
out). So nothing here holds a connection: every call opens the file, does its work (a write in one
transaction), and closes it, which takes milliseconds. Readers open read-only and writers
read-write, each retrying with a bounded, jittered backoff while another process holds the lock.
Within one process, calls on the same file are serialised by a lock (DuckDB refuses a read-only and
a read-write connection to one file in one process). Hence `es-countdown sql` works while a run is
writing, and a run waits (up to `write_timeout_s`) while a user's query is reading.

A generation is committed in one transaction (members + samples + the generation row), so a reader
or a process killed at any instant sees all of it or none of it. Every write is keyed (run,
generation, member, problem): a retried or resumed task replaces its rows, never duplicates them.
"""

from __future__ import annotations

import math
import random
import threading
import time
from contextlib import contextmanager
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb

from artifacts.runs import check_run_id
from es_core.seeding import NOISE_SCHEME

LEDGER_FILE = "ledger.duckdb"
CURRENT_VERSION = 7
EVAL_MODELS = ("centre", "base", "warm_start")
# *_sha256 columns that hash something other than an artifact of the store (verify skips them)
NOT_ARTIFACTS = {("runs", "settings_sha256"), ("runs", "base_model_sha256"), ("warm_starts", "base_model_sha256")}


class LedgerError(ValueError):
    """A refused or failed ledger operation: one line."""


# --- schema and migrations -----------------------------------------------------------------------
# MIGRATIONS[v] takes a version v-1 file to version v; a new file runs them all, so the migration
# path is the path every test takes. Never edit a released step: add the next one.

_V1 = [
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL)",
    """CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, config_json VARCHAR, base_model VARCHAR,
        base_model_sha256 VARCHAR, seed BIGINT, status VARCHAR)""",
    """CREATE TABLE generations (
        run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, center_sha256 VARCHAR, center_path VARCHAR,
        parent_center_sha256 VARCHAR, reward_mean DOUBLE, reward_std DOUBLE, reward_max DOUBLE,
        started_at TIMESTAMP, finished_at TIMESTAMP, PRIMARY KEY (run_id, generation))""",
    """CREATE TABLE members (
        run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, member INTEGER NOT NULL, seed BIGINT, sign INTEGER,
        adapter_sha256 VARCHAR, adapter_path VARCHAR, reward_mean DOUBLE, format_rate DOUBLE, accuracy DOUBLE,
        tokens BIGINT, PRIMARY KEY (run_id, generation, member))""",
    """CREATE TABLE samples (
        run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, member INTEGER NOT NULL, problem_id VARCHAR NOT NULL,
        prompt VARCHAR, completion VARCHAR, reward DOUBLE, format_ok BOOLEAN, correct BOOLEAN,
        completion_tokens INTEGER, PRIMARY KEY (run_id, generation, member, problem_id))""",
    """CREATE TABLE evals (
        run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, split VARCHAR NOT NULL, n INTEGER,
        reward_mean DOUBLE, accuracy DOUBLE, format_rate DOUBLE, PRIMARY KEY (run_id, generation, split))""",
    "CREATE TABLE problems (problem_id VARCHAR PRIMARY KEY, numbers INTEGER[], target DOUBLE, split VARCHAR)",
]

_V2 = [
    "ALTER TABLE runs ADD COLUMN run_name VARCHAR",
    "ALTER TABLE runs ADD COLUMN settings_sha256 VARCHAR",
    "ALTER TABLE runs ADD COLUMN updated_at TIMESTAMP",
    "UPDATE runs SET updated_at = created_at",
    "ALTER TABLE generations ADD COLUMN update_norm DOUBLE",
    "ALTER TABLE generations ADD COLUMN generate_seconds DOUBLE",
    "ALTER TABLE generations ADD COLUMN wall_seconds DOUBLE",
    "ALTER TABLE members ADD COLUMN server VARCHAR",
    "ALTER TABLE samples ADD COLUMN format_reward DOUBLE",
    # evals gains `model` in its key: DuckDB cannot change a primary key, so the table is rebuilt.
    # v1 had no base-model rows, so every old row is the centre's.
    """CREATE TABLE evals_v2 (
        run_id VARCHAR NOT NULL, generation INTEGER NOT NULL, split VARCHAR NOT NULL, model VARCHAR NOT NULL,
        adapter_sha256 VARCHAR, n INTEGER, reward_mean DOUBLE, reward_ci_low DOUBLE, reward_ci_high DOUBLE,
        accuracy DOUBLE, accuracy_ci_low DOUBLE, accuracy_ci_high DOUBLE, format_rate DOUBLE,
        samples_sha256 VARCHAR, created_at TIMESTAMP, PRIMARY KEY (run_id, generation, split, model))""",
    """INSERT INTO evals_v2 (run_id, generation, split, model, n, reward_mean, accuracy, format_rate)
        SELECT run_id, generation, split, 'centre', n, reward_mean, accuracy, format_rate FROM evals""",
    "DROP TABLE evals",
    "ALTER TABLE evals_v2 RENAME TO evals",
]

# The noise scheme each run's members are drawn with (es_core/seeding.py): resume and replay refuse
# a run drawn under another. Every run recorded before this step drew torch's CPU randn.
# (A step of its own: renumber it, never merge it into another, if another step lands first.)
_ADD_NOISE_SCHEME = [
    "ALTER TABLE runs ADD COLUMN noise_scheme VARCHAR",
    "UPDATE runs SET noise_scheme = 'torch-cpu-randn'",
]

_V4 = [
    # the supervised warm start a run's ES starts from (docs/ledger.md)
    """CREATE TABLE warm_starts (
        warm_start_sha256 VARCHAR PRIMARY KEY, base_model VARCHAR, base_model_sha256 VARCHAR, lineage_key VARCHAR,
        parent_warm_start_sha256 VARCHAR, optimizer_sha256 VARCHAR, steps INTEGER, settings_json VARCHAR,
        loss_curve DOUBLE[], seconds DOUBLE, train_seconds DOUBLE, completion_tokens BIGINT, created_at TIMESTAMP)""",
    "ALTER TABLE runs ADD COLUMN warm_start_sha256 VARCHAR",
    "ALTER TABLE members ADD COLUMN fitness DOUBLE",
]

# Why a run failed or stopped, one line (issue 26): a run that fails before its first generation,
# or is stopped by a signal, says so in the ledger. (A step of its own: renumber it if another lands first.)
_ADD_STATUS_REASON = ["ALTER TABLE runs ADD COLUMN status_reason VARCHAR"]

# Weights-space ES (es_core/weights_space.py): the share of an update's norm the rank-R centre kept
# (NULL in LoRA space, where nothing is truncated). A step of its own: renumber it if another lands first.
_ADD_TRUNCATION_KEPT = [
    "ALTER TABLE generations ADD COLUMN truncation_kept DOUBLE",
]

# Centres kept as keyframes only (store.keep_centre_every, artifacts/retention.py): when a
# generation's new centre left the disk, rebuildable from its nearest kept ancestor and these rows
# (NULL: on disk, as every centre of a ledger before this step). A step of its own: renumber it if another lands first.
_ADD_CENTER_THINNED_AT = [
    "ALTER TABLE generations ADD COLUMN center_thinned_at TIMESTAMP",
]

MIGRATIONS: dict[int, list[str]] = {1: _V1, 2: _V2, 3: _ADD_NOISE_SCHEME, 4: _V4, 5: _ADD_STATUS_REASON, 6: _ADD_TRUNCATION_KEPT,
                                    7: _ADD_CENTER_THINNED_AT}
TABLES = ("runs", "generations", "members", "samples", "evals", "problems", "warm_starts")
_KEYS = {
    "runs": ("run_id",),
    "generations": ("run_id", "generation"),
    "members": ("run_id", "generation", "member"),
    "samples": ("run_id", "generation", "member", "problem_id"),
    "evals": ("run_id", "generation", "split", "model"),
    "problems": ("problem_id",),
    "warm_starts": ("warm_start_sha256",),
}


# --- values --------------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    raise TypeError(f"not a timestamp: {value!r}")


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and not value.is_integer():
        raise TypeError(f"not an integer: {value!r}")
    return int(value)


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int_list(value: Any) -> list[int] | None:
    return None if value is None else [int(v) for v in value]


def _float_list(value: Any) -> list[float] | None:
    return None if value is None else [float(v) for v in value]


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "VARCHAR": _str, "INTEGER": _int, "BIGINT": _int, "DOUBLE": _float, "BOOLEAN": _bool,
    "TIMESTAMP": _timestamp, "INTEGER[]": _int_list, "DOUBLE[]": _float_list,
}


# --- connections ---------------------------------------------------------------------------------

_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.RLock:
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(str(path.resolve()), threading.RLock())


def _is_lock_conflict(exc: Exception) -> bool:
    text = str(exc)
    return isinstance(exc, duckdb.IOException) and ("lock" in text.lower())


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


class Ledger:
    """The ledger of one data dir. Cheap to construct; every call opens and closes the file."""

    def __init__(self, data_dir: str | Path, read_timeout_s: float = 30.0, write_timeout_s: float = 300.0):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LEDGER_FILE
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self._schema_ok = False
        self._columns: dict[str, dict[str, str]] = {}

    # connections
    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        budget = self.read_timeout_s if read_only else self.write_timeout_s
        deadline = time.monotonic() + budget
        delay = 0.005
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                if not _is_lock_conflict(exc):
                    raise LedgerError(f"cannot open ledger {self.path}: {_one_line(exc)}") from None
                if time.monotonic() >= deadline:
                    mode = "read" if read_only else "write"
                    raise LedgerError(f"ledger {self.path} stayed locked by another process for {budget:g} s ({mode}): {_one_line(exc)}") from None
            time.sleep(min(delay * (0.5 + random.random()), max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.1)

    @contextmanager
    def _connection(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        with _process_lock(self.path):
            con = self._open(read_only)
            try:
                yield con
            finally:
                con.close()

    def _write(self, work: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run `work` in one transaction on a fresh read-write connection (schema brought up to date)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._connection(read_only=False) as con:
            self._migrate(con)
            con.execute("BEGIN TRANSACTION")
            try:
                result = work(con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return result

    def _read(self, work: Callable[[duckdb.DuckDBPyConnection], Any], missing: Any = None) -> Any:
        """Run `work` on a fresh read-only connection; `missing` when there is no ledger file yet."""
        if not self.path.exists():
            if missing is _RAISE:
                raise LedgerError(f"no ledger at {self.path}")
            return missing
        if not self._schema_ok:
            with self._connection(read_only=True) as con:
                version = _version(con)
            if version < CURRENT_VERSION:  # an older file: migrate it once, then read
                try:
                    self._write(lambda con: None)
                except (LedgerError, OSError) as exc:
                    raise LedgerError(
                        f"ledger {self.path} has schema v{version}: it is migrated to v{CURRENT_VERSION} before it is read, "
                        f"which needs write access ({_one_line(exc)})"
                    ) from None
            elif version > CURRENT_VERSION:
                raise LedgerError(f"ledger {self.path} has schema v{version}, newer than this code's v{CURRENT_VERSION}: upgrade es-countdown")
            self._schema_ok = True
        with self._connection(read_only=True) as con:
            return work(con)

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        if self._schema_ok:
            return
        migrate(con, self.path)
        self._schema_ok = True

    def schema_version(self) -> int | None:
        """The file's schema version (None: no ledger yet). Does not migrate."""
        if not self.path.exists():
            return None
        with self._connection(read_only=True) as con:
            return _version(con)

    # writing helpers
    def _table_columns(self, con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
        if table not in self._columns:
            rows = con.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? AND table_schema = 'main' ORDER BY ordinal_position",
                [table],
            ).fetchall()
            self._columns[table] = dict(rows)
        return self._columns[table]

    def _insert(self, con: duckdb.DuckDBPyConnection, table: str, rows: list[dict], replace: bool = True) -> None:
        """Insert rows column-wise (one statement, vectorised: executemany is ~250x slower here)."""
        if not rows:
            return
        types = self._table_columns(con, table)
        unknown = sorted({k for row in rows for k in row} - set(types))
        if unknown:
            raise LedgerError(f"{table}: unknown column(s) {', '.join(unknown)} (columns: {', '.join(types)})")
        columns = [c for c in types if any(c in row for row in rows)]
        for key in _KEYS[table]:
            missing = [i for i, row in enumerate(rows) if row.get(key) is None]
            if missing:
                raise LedgerError(f"{table}: row {missing[0]} has no {key} (a key column)")
        values = []
        for c in columns:
            convert = _CONVERT[types[c]]
            try:
                values.append([convert(row.get(c)) for row in rows])
            except (TypeError, ValueError) as exc:
                raise LedgerError(f"{table}.{c}: {exc}") from None
        selects = ", ".join(f"unnest(?::{types[c]}[])" for c in columns)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        try:
            con.execute(f"{verb} INTO {table} ({', '.join(columns)}) SELECT {selects}", values)
        except duckdb.Error as exc:
            raise LedgerError(f"{table}: {_one_line(exc)}") from None

    # --- the API the pipeline calls ---------------------------------------------------------------

    def record_run(
        self,
        run_id: str,
        run_name: str,
        config_json: str,
        settings_sha256: str,
        base_model: str,
        base_model_sha256: str,
        seed: int,
        status: str = "running",
        warm_start_sha256: str | None = None,
        noise_scheme: str = NOISE_SCHEME,
    ) -> None:
        """Create the run row, or update it on a resume: created_at is kept; a different settings
        hash, base model hash, warm start or noise scheme is refused (that would be a different run)."""
        check_run_id(run_id)

        def work(con):
            old = con.execute("SELECT settings_sha256, base_model_sha256, noise_scheme, warm_start_sha256 FROM runs WHERE run_id = ?", [run_id]).fetchone()
            now = utcnow()
            if old is None:
                self._insert(con, "runs", [{
                    "run_id": run_id, "created_at": now, "updated_at": now, "run_name": run_name, "config_json": config_json,
                    "settings_sha256": settings_sha256, "base_model": str(base_model), "base_model_sha256": base_model_sha256,
                    "seed": seed, "status": status, "noise_scheme": noise_scheme, "warm_start_sha256": warm_start_sha256,
                }], replace=False)
                return
            if old[2] != noise_scheme:
                raise LedgerError(f"run {run_id} was recorded with noise scheme {old[2]}, this code draws {noise_scheme}: its members cannot be rebuilt; start a new run id")
            if old[0] is not None and old[0] != settings_sha256:
                raise LedgerError(f"run {run_id} was recorded with settings {old[0][:12]}, these settings hash to {settings_sha256[:12]}: start a new run id")
            if old[1] is not None and old[1] != base_model_sha256:
                raise LedgerError(f"run {run_id} was recorded with base model {old[1][:12]}, this base model hashes to {base_model_sha256[:12]}: start a new run id")
            if old[1] is not None and old[3] != warm_start_sha256:  # no base model: it failed before its warm start
                raise LedgerError(f"run {run_id} was recorded with warm start {(old[3] or 'none')[:12]}, this one is {(warm_start_sha256 or 'none')[:12]}: start a new run id")
            con.execute(
                "UPDATE runs SET run_name = ?, config_json = ?, settings_sha256 = ?, base_model = ?, base_model_sha256 = ?, seed = ?, status = ?, "
                "status_reason = NULL, warm_start_sha256 = ?, updated_at = ? WHERE run_id = ?",  # the warm start: equal, or the first recorded
                [run_name, config_json, settings_sha256, str(base_model), base_model_sha256, seed, status, warm_start_sha256, now, run_id],
            )

        self._write(work)

    def record_failure(self, run_id: str, run_name: str, config_json: str, settings_sha256: str, seed: int, reason: str) -> None:
        """The run failed (or was stopped): status failed and `reason` (one line). A run that failed
        before its row was recorded (problems, base model, warm start) gets one, with no base model:
        a resume then records its base model and warm start as a new run would."""
        check_run_id(run_id)

        def work(con):
            now = utcnow()
            if con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] == 0:
                self._insert(con, "runs", [{
                    "run_id": run_id, "created_at": now, "updated_at": now, "run_name": run_name, "config_json": config_json,
                    "settings_sha256": settings_sha256, "seed": seed, "status": "failed", "status_reason": reason, "noise_scheme": NOISE_SCHEME,
                }], replace=False)
            else:
                # a completed run stays completed when a later attempt fails before reopening it (record_run
                # sets it running first): say, a resume refused for a damaged model changed nothing recorded
                con.execute("UPDATE runs SET status = 'failed', status_reason = ?, updated_at = ? WHERE run_id = ? AND status <> 'completed'",
                            [reason, now, run_id])

        self._write(work)

    def set_run_status(self, run_id: str, status: str, reason: str | None = None) -> None:
        """running, completed or failed (free text; those are the pipeline's), and why (one line;
        None clears it)."""

        def work(con):
            if con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] == 0:
                raise LedgerError(f"run {run_id} is not in the ledger at {self.path}")
            con.execute("UPDATE runs SET status = ?, status_reason = ?, updated_at = ? WHERE run_id = ?", [status, reason, utcnow(), run_id])

        self._write(work)

    def record_problems(self, rows: list[dict]) -> None:
        """problems(problem_id, numbers, target, split); a re-recorded id is replaced."""
        self._write(lambda con: self._insert(con, "problems", rows))

    def commit_generation(self, generation: dict, members: list[dict], samples: list[dict], problems: list[dict] | None = None) -> None:
        """Members, samples and the generation row in ONE transaction: all land or none. Re-committing
        a generation replaces its rows (a retried task never duplicates one). `problems`: rows of
        problems first seen in this generation (a fresh training stream), recorded with it."""
        run_id, g = generation.get("run_id"), generation.get("generation")
        if run_id is None or g is None:
            raise LedgerError("commit_generation: the generation row needs run_id and generation")
        members = [{"run_id": run_id, "generation": g, **m} for m in members]
        samples = [{"run_id": run_id, "generation": g, **s} for s in samples]
        for kind, rows in (("member", members), ("sample", samples)):
            for i, row in enumerate(rows):
                if row["run_id"] != run_id or row["generation"] != g:
                    raise LedgerError(f"commit_generation: {kind} row {i} is for ({row['run_id']}, {row['generation']}), not ({run_id}, {g})")
        member_ids = {m.get("member") for m in members}
        strays = sorted({s.get("member") for s in samples} - member_ids, key=str)
        if strays:
            raise LedgerError(f"commit_generation: samples of member(s) {strays} that are not in the members of generation {g}")

        def work(con):
            if con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] == 0:
                raise LedgerError(f"run {run_id} is not in the ledger at {self.path}: record_run first")
            self._insert(con, "problems", problems or [])
            con.execute("DELETE FROM samples WHERE run_id = ? AND generation = ?", [run_id, g])
            con.execute("DELETE FROM members WHERE run_id = ? AND generation = ?", [run_id, g])
            self._insert(con, "members", members, replace=False)
            self._insert(con, "samples", samples, replace=False)
            self._insert(con, "generations", [generation])

        self._write(work)

    def mark_centres_thinned(self, run_id: str, generations: list[int]) -> None:
        """The new centres of these generations of the run leave the disk (artifacts/retention.py
        marks them before it deletes them, so a kill between the two leaves a marked centre still
        on disk, never an unmarked one gone). A centre marked before keeps its time."""
        if not generations:
            return

        def work(con):
            con.execute("UPDATE generations SET center_thinned_at = ? WHERE run_id = ? AND center_thinned_at IS NULL AND list_contains(?, generation)",
                        [utcnow(), run_id, [int(g) for g in generations]])

        self._write(work)

    def thinned_centre_row(self, center_sha256: str) -> dict | None:
        """A generation row whose new centre is `center_sha256` and marked thinned (the earliest
        run's, when runs of identical settings share it): what its rebuild replays."""
        rows = self._dicts(
            "SELECT g.* FROM generations g JOIN runs r USING (run_id) WHERE g.center_sha256 = ? AND g.center_thinned_at IS NOT NULL "
            "ORDER BY r.created_at, g.run_id, g.generation LIMIT 1", [center_sha256])
        return rows[0] if rows else None

    def record_warm_start(self, row: dict) -> None:
        """One warm start (keyed by the sha256 of its model folder); re-recording replaces it."""
        self._write(lambda con: self._insert(con, "warm_starts", [{"created_at": utcnow(), **row}]))

    def warm_start_row(self, sha256: str) -> dict | None:
        rows = self._dicts("SELECT * FROM warm_starts WHERE warm_start_sha256 = ?", [sha256])
        return rows[0] if rows else None

    def warm_starts_to_continue(self, lineage_key: str, steps: int) -> list[dict]:
        """Recorded warm starts a warm start of `steps` steps could continue: the same base and
        settings but fewer steps, longest first."""
        return self._dicts(
            "SELECT * FROM warm_starts WHERE lineage_key = ? AND steps < ? AND optimizer_sha256 IS NOT NULL ORDER BY steps DESC, created_at DESC",
            [lineage_key, steps],
        )

    def record_eval(self, row: dict) -> None:
        """One evaluation (model 'centre' or 'base') keyed (run_id, generation, split, model)."""
        row = {"created_at": utcnow(), **row}
        if row.get("model") not in EVAL_MODELS:
            raise LedgerError(f"evals.model must be one of {', '.join(EVAL_MODELS)} (got {row.get('model')!r})")
        self._write(lambda con: self._insert(con, "evals", [row]))

    # --- reading ------------------------------------------------------------------------------------

    def query(self, sql: str, params: list | dict | None = None) -> tuple[list[str], list[tuple]]:
        """Any read-only SQL on the ledger alone: (column names, rows). A write statement is refused
        by DuckDB (the file is opened read-only); so is any file outside it (COPY ... TO, read_csv,
        ATTACH, INSTALL), external access being switched off on the connection first (it cannot be
        switched back on while the connection is open)."""

        def work(con):
            con.execute("SET enable_external_access = false")
            try:
                cur = con.execute(sql, params) if params is not None else con.execute(sql)
                if cur is None:  # DuckDB's answer to a query of only comments, blanks or semicolons
                    raise LedgerError("the query holds no SQL statement (only comments or blanks)")
                if cur.description is None:
                    return [], []
                return [d[0] for d in cur.description], cur.fetchall()
            except duckdb.PermissionException as exc:
                raise LedgerError(f"sql reads the ledger only, no other file: {_one_line(exc)}") from None
            except duckdb.Error as exc:
                raise LedgerError(_one_line(exc)) from None

        return self._read(work, missing=_RAISE)

    def _dicts(self, sql: str, params: list) -> list[dict]:
        def work(con):
            cur = con.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

        return self._read(work, missing=[])

    def run_row(self, run_id: str) -> dict | None:
        rows = self._dicts("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return rows[0] if rows else None

    def last_generation(self, run_id: str) -> int | None:
        rows = self._dicts("SELECT max(generation) AS g FROM generations WHERE run_id = ?", [run_id])
        return rows[0]["g"] if rows else None

    def generation_row(self, run_id: str, generation: int) -> dict | None:
        rows = self._dicts("SELECT * FROM generations WHERE run_id = ? AND generation = ?", [run_id, generation])
        return rows[0] if rows else None

    def member_rows(self, run_id: str, generation: int) -> list[dict]:
        return self._dicts("SELECT * FROM members WHERE run_id = ? AND generation = ? ORDER BY member", [run_id, generation])

    def export_parquet(self, run_id: str, out_dir: str | Path) -> list[Path]:
        """One Parquet file per table (`<table>.parquet`) filtered to the run, from one read-only
        connection (a consistent snapshot); problems is written whole (it has no run column)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

        def work(con):
            written = []
            for table in TABLES:
                target = out_dir / f"{table}.parquet"
                where, count = _EXPORT_FILTER.get(table, (" WHERE run_id = ?", 1))
                params = [run_id] * count
                literal = str(target).replace("'", "''")
                try:
                    con.execute(f"COPY (SELECT * FROM {table}{where}) TO '{literal}' (FORMAT parquet)", params)
                except duckdb.Error as exc:
                    raise LedgerError(f"exporting {table} to {target}: {_one_line(exc)}") from None
                written.append(target)
            return written

        return self._read(work, missing=_RAISE)

    def artifact_references(self, run_id: str | None = None) -> list[tuple[str, str, str]]:
        """(sha256, table, column) of every artifact the ledger references (of one run, or all),
        sorted: each column named *_sha256, except the runs columns that hash settings or the base
        model (not artifacts). The first generation's parent is the run's initial centre."""

        def work(con):
            cols = con.execute(
                "SELECT c.table_name, c.column_name, count(*) FILTER (WHERE r.column_name = 'run_id') > 0 FROM information_schema.columns c "
                "JOIN information_schema.columns r USING (table_schema, table_name) WHERE c.table_schema = 'main' "
                "AND c.column_name LIKE '%\\_sha256' ESCAPE '\\' GROUP BY 1, 2 ORDER BY 1, 2"
            ).fetchall()
            found: set[tuple[str, str, str]] = set()
            for table, column, has_run in cols:
                if (table, column) in NOT_ARTIFACTS or (run_id is not None and not has_run):
                    continue
                where, params = (' AND run_id = ?', [run_id]) if run_id is not None else ("", [])
                rows = con.execute(f'SELECT DISTINCT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL{where}', params).fetchall()
                found.update((v, table, column) for (v,) in rows)
            return sorted(found)

        return self._read(work, missing=[])

    def referenced_sha256(self) -> set[str]:
        """Every value of every column named *_sha256 (what gc must keep)."""

        def work(con):
            cols = con.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main' AND column_name LIKE '%\\_sha256' ESCAPE '\\'"
            ).fetchall()
            found: set[str] = set()
            for table, column in cols:
                found.update(v for (v,) in con.execute(f'SELECT DISTINCT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL').fetchall())
            return found

        return self._read(work, missing=set())

    def resolve_sha(self, prefix: str) -> str:
        """The one centre or member adapter sha256 in the ledger that starts with `prefix`."""
        prefix = prefix.strip().lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise LedgerError(f"not a sha256 or prefix: {prefix!r}")

        def work(con):
            return [r[0] for r in con.execute(
                """SELECT DISTINCT sha FROM (
                       SELECT center_sha256 AS sha FROM generations UNION ALL SELECT parent_center_sha256 FROM generations
                       UNION ALL SELECT adapter_sha256 FROM members UNION ALL SELECT warm_start_sha256 FROM warm_starts)
                   WHERE starts_with(sha, ?) ORDER BY sha LIMIT 11""",
                [prefix],
            ).fetchall()]

        found = self._read(work, missing=_RAISE)
        if not found:
            raise LedgerError(f"no centre, member adapter or warm start with sha256 {prefix} in {self.path}")
        if len(found) > 1:
            raise LedgerError(f"sha256 prefix {prefix} is ambiguous ({len(found) if len(found) <= 10 else 'over 10'} matches): give more digits")
        return found[0]

    def lineage(self, sha256: str, run_id: str | None = None) -> list[dict]:
        """The chain from a centre (or a member adapter) back to generation 0's centre, newest first.

        Steps, each a dict with `kind`:
          'member'  (only first, for a member adapter): run_id, generation, member, seed, sign,
                    adapter_sha256, reward_mean, center_sha256 = the centre it was perturbed from;
          'update'  generation g's row: run_id, generation, center_sha256 (theta_{g+1}, produced),
                    parent_center_sha256 (theta_g), reward_mean/std/max, update_norm, and members:
                    [{member, seed, sign, reward_mean, adapter_sha256}] whose rewards moved theta_g;
          'init'    run_id, center_sha256 = theta_0 (no generation produced it);
          'warm_start' (runs with a warm start, and a warm start's own sha): warm_start_sha256,
                    steps, seconds, final loss, parent_warm_start_sha256 (the shorter warm start
                    it continued), base_model_sha256; then one per warm start it continued;
          'base'    last: base_model, base_model_sha256.
        A prefix of 4+ hex digits is accepted. When several runs share a centre (identical
        settings), the earliest run is followed unless `run_id` is given."""
        sha = self.resolve_sha(sha256) if len(sha256) < 64 else sha256.lower()

        def work(con):
            run_filter = "AND g.run_id = ?" if run_id else ""
            extra = [run_id] if run_id else []
            steps: list[dict] = []
            row = con.execute(
                f"""SELECT g.run_id FROM generations g JOIN runs r USING (run_id)
                    WHERE (g.center_sha256 = ? OR g.parent_center_sha256 = ?) {run_filter} ORDER BY r.created_at, g.run_id LIMIT 1""",
                [sha, sha, *extra],
            ).fetchone()
            chain_run = row[0] if row else None
            centre = sha
            if chain_run is None and con.execute("SELECT count(*) FROM warm_starts WHERE warm_start_sha256 = ?", [sha]).fetchone()[0]:
                return _warm_start_chain(con, sha)
            if chain_run is None:  # a member adapter?
                mrun_filter = "AND m.run_id = ?" if run_id else ""
                m = con.execute(
                    f"""SELECT m.run_id, m.generation, m.member, m.seed, m.sign, m.adapter_sha256, m.reward_mean, g.parent_center_sha256
                        FROM members m JOIN generations g USING (run_id, generation) JOIN runs r USING (run_id)
                        WHERE m.adapter_sha256 = ? {mrun_filter} ORDER BY r.created_at, m.run_id, m.generation, m.member LIMIT 1""",
                    [sha, *extra],
                ).fetchone()
                if m is None:
                    where = f" of run {run_id}" if run_id else ""
                    raise LedgerError(f"{sha} is no centre or member adapter{where} in {self.path}")
                chain_run, centre = m[0], m[7]
                steps.append({"kind": "member", "run_id": m[0], "generation": m[1], "member": m[2], "seed": m[3], "sign": m[4],
                              "adapter_sha256": m[5], "reward_mean": m[6], "center_sha256": m[7]})
            seen = set()
            while centre not in seen:
                seen.add(centre)
                cur = con.execute(
                    "SELECT * FROM generations WHERE run_id = ? AND center_sha256 = ? ORDER BY generation DESC LIMIT 1", [chain_run, centre]
                )
                names = [d[0] for d in cur.description]
                g = cur.fetchone()
                if g is None:
                    steps.append({"kind": "init", "run_id": chain_run, "center_sha256": centre})
                    run = con.execute("SELECT warm_start_sha256, base_model, base_model_sha256 FROM runs WHERE run_id = ?", [chain_run]).fetchone()
                    if run and run[0]:
                        steps.extend(_warm_start_chain(con, run[0]))
                    elif run:
                        steps.append({"kind": "base", "base_model": run[1], "base_model_sha256": run[2]})
                    break
                g = dict(zip(names, g))
                members = con.execute(
                    "SELECT member, seed, sign, reward_mean, adapter_sha256 FROM members WHERE run_id = ? AND generation = ? ORDER BY member",
                    [chain_run, g["generation"]],
                ).fetchall()
                steps.append({
                    "kind": "update", "run_id": chain_run, "generation": g["generation"], "center_sha256": g["center_sha256"],
                    "parent_center_sha256": g["parent_center_sha256"], "reward_mean": g["reward_mean"], "reward_std": g["reward_std"],
                    "reward_max": g["reward_max"], "update_norm": g.get("update_norm"),
                    "members": [dict(zip(("member", "seed", "sign", "reward_mean", "adapter_sha256"), r)) for r in members],
                })
                centre = g["parent_center_sha256"]
            return steps

        return self._read(work, missing=_RAISE)


_RAISE = object()

# export_parquet's filter of the tables without a run_id column: (WHERE clause, how many run_id
# parameters it takes); problems is written whole, warm_starts as the run's chain of warm starts.
_EXPORT_FILTER: dict[str, tuple[str, int]] = {
    "problems": ("", 0),
    "warm_starts": (""" WHERE warm_start_sha256 IN (
        WITH RECURSIVE chain(sha) AS (
            SELECT warm_start_sha256 FROM runs WHERE run_id = ? AND warm_start_sha256 IS NOT NULL
            UNION SELECT w.parent_warm_start_sha256 FROM warm_starts w JOIN chain c ON w.warm_start_sha256 = c.sha
            WHERE w.parent_warm_start_sha256 IS NOT NULL)
        SELECT sha FROM chain)""", 1),
}


def _warm_start_chain(con: duckdb.DuckDBPyConnection, sha: str) -> list[dict]:
    """A warm start, the shorter ones it continued, then its base model (lineage steps)."""
    steps: list[dict] = []
    base = None
    while sha and sha not in {s["warm_start_sha256"] for s in steps}:
        cur = con.execute("SELECT * FROM warm_starts WHERE warm_start_sha256 = ?", [sha])
        names = [d[0] for d in cur.description]
        row = cur.fetchone()
        if row is None:
            steps.append({"kind": "warm_start", "warm_start_sha256": sha, "steps": None, "seconds": None, "final_loss": None,
                          "parent_warm_start_sha256": None, "base_model_sha256": None})
            break
        w = dict(zip(names, row))
        curve = w["loss_curve"] or []
        steps.append({"kind": "warm_start", "warm_start_sha256": sha, "steps": w["steps"], "seconds": w["seconds"],
                      "final_loss": curve[-1] if curve else None, "parent_warm_start_sha256": w["parent_warm_start_sha256"],
                      "base_model_sha256": w["base_model_sha256"]})
        base = (w["base_model"], w["base_model_sha256"])
        sha = w["parent_warm_start_sha256"]
    if base is not None:
        steps.append({"kind": "base", "base_model": base[0], "base_model_sha256": base[1]})
    return steps


def migrate(con: duckdb.DuckDBPyConnection, path: str | Path) -> None:
    """Bring the file open on `con` (at `path`, for messages) to CURRENT_VERSION, in one transaction:
    every step from its version on; a new file gets them all (the schema, keys included)."""
    version = _version(con)
    if version > CURRENT_VERSION:
        raise LedgerError(f"ledger {path} has schema v{version}, newer than this code's v{CURRENT_VERSION}: upgrade es-countdown")
    if version == CURRENT_VERSION:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        for v in range(version + 1, CURRENT_VERSION + 1):
            for statement in MIGRATIONS[v]:
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [v, utcnow()])
        con.execute("COMMIT")
    except BaseException as exc:
        con.execute("ROLLBACK")
        if isinstance(exc, duckdb.Error):
            raise LedgerError(f"migrating ledger {path} from v{version}: {_one_line(exc)}") from None
        raise


def _version(con: duckdb.DuckDBPyConnection) -> int:
    has_table = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' AND table_name = 'schema_version'"
    ).fetchone()[0]
    if not has_table:
        others = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main'").fetchone()[0]
        if others:
            raise LedgerError("the ledger file has tables but no schema_version table: not an es-countdown ledger")
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def to_jsonable(value: Any) -> Any:
    """A DuckDB value as JSON: timestamps ISO 8601, NaN/inf as null, lists and structs recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        return float(value)  # Decimal
    except (TypeError, ValueError):
        return str(value)


__all__ = ["Ledger", "LedgerError", "LEDGER_FILE", "CURRENT_VERSION", "MIGRATIONS", "TABLES", "migrate", "to_jsonable"]
