"""Are two runs' recorded results the same bytes? Compares, table by table, every ledger column
that a run's content decides (hashes, seeds, rewards, completions, metrics, the stored settings),
leaving out what differs between any two runs (run ids, times, durations, paths, the code version
in a warm start's lineage key), and the sets of artifact sha256s each run's ledger names (each
stored one rehashed from its files).

    python -m scripts.compare_runs DATA_DIR_A DATA_DIR_B [--run-a ID] [--run-b ID]

(as a module, from the checkout, so that `artifacts` is this checkout's).

Each run defaults to the only (or the last) run in its data dir. Exit status 1 on any difference.
Used to show a refactor changes no recorded byte: a smoke run before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb

from artifacts.store import ArtifactStore

# what every two runs differ in, whatever they computed; lineage_key holds the code's version by design
VOLATILE = {"run_id", "created_at", "updated_at", "started_at", "finished_at", "generate_seconds", "wall_seconds", "seconds",
            "train_seconds", "center_path", "adapter_path", "lineage_key"}
WHERE_KEPT = ("data_dir",)  # settings that say where a run's files are, not what it computed (config_json)
TABLES = {"runs": "", "generations": "generation", "members": "generation, member", "samples": "generation, member, problem_id",
          "evals": "generation, split, model", "warm_starts": ""}
SHA_COLUMNS = ("center_sha256", "parent_center_sha256", "adapter_sha256", "samples_sha256", "warm_start_sha256", "optimizer_sha256")


def rows(db, table: str, run_id: str) -> tuple[list[str], list[tuple]]:
    columns = [r[0] for r in db.execute(f"DESCRIBE {table}").fetchall() if r[0] not in VOLATILE]
    if table == "warm_starts":
        where, params = "warm_start_sha256 IN (SELECT warm_start_sha256 FROM runs WHERE run_id = ?)", [run_id]
    else:
        where, params = "run_id = ?", [run_id]
    order = f" ORDER BY {TABLES[table]}" if TABLES[table] else ""
    found = db.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE {where}{order}", params).fetchall()
    if "config_json" in columns:
        i = columns.index("config_json")
        found = [(*row[:i], _without_location(row[i]), *row[i + 1:]) for row in found]
    return columns, found


def _without_location(config_json: str) -> str:
    config = json.loads(config_json)
    for key in WHERE_KEPT:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True)


def last_run(db) -> str:
    return db.execute("SELECT run_id FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_a", type=Path)
    parser.add_argument("data_b", type=Path)
    parser.add_argument("--run-a")
    parser.add_argument("--run-b")
    args = parser.parse_args(argv)
    a = duckdb.connect(str(args.data_a / "ledger.duckdb"), read_only=True)
    b = duckdb.connect(str(args.data_b / "ledger.duckdb"), read_only=True)
    run_a, run_b = args.run_a or last_run(a), args.run_b or last_run(b)
    differences, shas = 0, ({}, {})
    for table in TABLES:
        (cols, got_a), (_, got_b) = rows(a, table, run_a), rows(b, table, run_b)
        same = got_a == got_b
        print(f"{table:12} {len(got_a):5} rows  {'identical' if same else 'DIFFERENT'}  ({', '.join(cols)})")
        if not same:
            differences += 1
            for ra, rb in zip(got_a, got_b):
                if ra != rb:
                    print("   first difference:", [(c, x, y) for c, x, y in zip(cols, ra, rb) if x != y][:4])
                    break
        for side, got in enumerate((got_a, got_b)):
            for row in got:
                for c, value in zip(cols, row):
                    if c in SHA_COLUMNS and value:
                        shas[side].setdefault(c, set()).add(value)
    for side, root in enumerate((args.data_a, args.data_b)):
        store = ArtifactStore(root / "artifacts")
        for sha in sorted({s for found in shas[side].values() for s in found}):
            if store.exists(sha):
                store.get(sha)  # rehashes its files: ArtifactError if they are not what the sha256 says
    if shas[0] != shas[1]:
        differences += 1
        print("artifact sha256s: DIFFERENT", {c: len(shas[0].get(c, set()) ^ shas[1].get(c, set())) for c in set(shas[0]) | set(shas[1])})
    else:
        print(f"artifact sha256s: identical ({sum(len(v) for v in shas[0].values())} across {', '.join(sorted(shas[0]))})")
    print("SAME" if not differences else f"{differences} DIFFERENCES")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
