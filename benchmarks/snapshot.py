"""What a GPU command has learned so far, kept under its $OUT while it runs: the slim ledger
(artifacts/slim.py `slim_copy`), the learning-*.json files of benchmarks/learning_runs.py
and the runs' logs, each file replaced whole by a rename, so a command killed at its limit (the
device machine's 10 minutes, or less where less device time is left) still brings back the last
complete snapshot instead of nothing.

    python -m benchmarks.snapshot DATA_DIR OUT_DIR [--every 60]   # with --every: until killed

A snapshot taken while a run commits finds the ledger locked (DuckDB lets no reader in beside a
writer): it is skipped, the previous one kept, and the next try comes `--every` seconds later. The
run waits for a snapshot's read as for any reader's (artifacts/ledger.py), a second or two.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import duckdb

PARTIAL = ".partial"  # a file being written: a kill leaves it under that name, never the real one


def snapshot(data_dir: Path, out_dir: Path) -> bool:
    """One snapshot of `data_dir` into `out_dir`; False (the previous snapshot kept) when the ledger
    was locked by a commit or is not there yet."""
    from artifacts.slim import slim_copy

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not (data_dir / "ledger.duckdb").is_file():
        return False
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f"ledger.duckdb{PARTIAL}"
    try:
        slim_copy(data_dir, partial)
    except duckdb.IOException:  # a writer holds the file: the next snapshot
        partial.unlink(missing_ok=True)
        return False
    os.replace(partial, out_dir / "ledger.duckdb")
    for source in sorted(data_dir.glob("learning-*.json")):
        _replace(out_dir / source.name, lambda path, source=source: shutil.copyfile(source, path))
    logs = sorted(data_dir.glob("*.log"))
    if logs:
        _replace(out_dir / "logs.tgz", lambda path: _tar(path, logs))
    return True


def _replace(target: Path, write) -> None:
    partial = target.with_name(target.name + PARTIAL)
    write(partial)
    os.replace(partial, target)


def _tar(path: Path, files: list[Path]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--every", type=float, default=None, help="seconds between snapshots, until killed (default: one snapshot)")
    parser.add_argument("--tries", type=int, default=5, help="without --every: tries, a second apart, while the ledger is locked")
    args = parser.parse_args(argv)
    if args.every is None:  # the last one, after the runs: a commit still closing gets a few tries
        for _ in range(args.tries):
            if snapshot(args.data_dir, args.out_dir):
                return 0
            time.sleep(1.0)
        return 1
    while True:
        time.sleep(args.every)
        snapshot(args.data_dir, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
