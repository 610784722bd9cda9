"""The ledger to carry off a machine: every table whole, but the text of the samples (every prompt
and completion of every member: too large for a lent GPU machine's 64 MiB transfers), which it keeps
for each run's last generation only.

Every sample's reward, format and tokens stay: the per-problem rewards are what each update took (a
centre rebuilt from the ledger replays them, `es.members_per_prompt`'s groups z-score within them)
and what benchmarks/member_signal.py reads (31 MiB for 120 generations of 512 members on 64 problems
each: `python -m benchmarks.bench_slim_ledger`).

The copy is a ledger like any other, schema and keys included: put it in a fresh data dir as its
`ledger.duckdb` and `es-countdown resume RUN_ID` goes on from its last generation, the centres
rebuilt from the recorded rewards (artifacts/rebuild.py `restore_centres`). A slim copy made before
the copy had keys (the results under docs/results until 2026-12-08) is made a live ledger the same way:

    python -m artifacts.slim FOLDER_OF_ITS_LEDGER NEW_DATA_DIR/ledger.duckdb
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import duckdb

from artifacts.ledger import CURRENT_VERSION, LEDGER_FILE, TABLES, Ledger, LedgerError, migrate


def slim_copy(data_dir: Path, out: Path) -> Path:
    """The ledger of `data_dir` as a new ledger file `out` without the samples' text but for the last
    generation of each run; a source of an older schema is migrated in a temporary copy first (it is
    left as it was). A writer holding the source raises duckdb.IOException (try again later)."""
    source, out = Path(data_dir) / LEDGER_FILE, Path(out)
    if not source.is_file():
        raise LedgerError(f"no ledger at {source}: give the data dir (or the folder) that holds ledger.duckdb")
    if _version(source) >= CURRENT_VERSION:
        return _copy(source, out)
    # an older file (a copy committed before a schema step): migrated in a copy of its own, the
    # source left as it was recorded
    with tempfile.TemporaryDirectory(prefix="es-slim-") as scratch:
        shutil.copyfile(source, Path(scratch) / LEDGER_FILE)
        Ledger(scratch).query("SELECT 1")  # reading an older ledger migrates it first
        return _copy(Path(scratch) / LEDGER_FILE, out)


def _version(source: Path) -> int:
    """The file's schema version; a writer holding it raises duckdb.IOException at once (Ledger's
    own open would wait for it)."""
    con = duckdb.connect(str(source), read_only=True)
    try:
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    finally:
        con.close()


def _copy(source: Path, out: Path) -> Path:
    out.unlink(missing_ok=True)
    con = duckdb.connect(str(out))
    try:
        migrate(con, out)  # the schema with its keys: INSERT OR REPLACE, which every ledger write is, needs them
        con.execute(f"ATTACH '{source}' AS source (READ_ONLY)")
        version = con.execute("SELECT coalesce(max(version), 0) FROM source.schema_version").fetchone()[0]
        if version != CURRENT_VERSION:
            raise LedgerError(f"ledger {source} has schema v{version}, this code's is v{CURRENT_VERSION}: upgrade es-countdown")
        last = "(run_id, generation) IN (SELECT run_id, max(generation) FROM source.generations GROUP BY run_id)"
        for table in TABLES:
            columns = "*"
            if table == "samples":
                columns = f"* REPLACE (CASE WHEN {last} THEN prompt END AS prompt, CASE WHEN {last} THEN completion END AS completion)"
            con.execute(f"INSERT INTO main.{table} BY NAME SELECT {columns} FROM source.{table}")
    except BaseException:
        con.close()
        out.unlink(missing_ok=True)
        raise
    con.close()
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Copy a data dir's ledger without the samples' text (but each run's last generation's).")
    parser.add_argument("data_dir", type=Path, help="the data dir whose ledger.duckdb to copy (a slim copy's folder too)")
    parser.add_argument("out", type=Path, help="the new ledger file (e.g. NEW_DATA_DIR/ledger.duckdb); replaced")
    args = parser.parse_args(argv)
    try:
        print(slim_copy(args.data_dir, args.out))
    except (LedgerError, duckdb.Error) as exc:
        print(f"error: {str(exc).splitlines()[0]}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
