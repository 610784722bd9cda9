"""The ledger's commands in the `es-countdown` CLI: sql, runs, lineage, export, centre, gc, verify.

flows/cli.py calls `register(subparsers)`; `main(argv)` is a parser with only these commands (for
tests, and `python -m artifacts.cli`). Each subcommand takes `--data-dir DIR` (default ES_DATA_DIR,
else ./runs). Failures are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from artifacts import commands


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="ledger + artifacts root (default: ES_DATA_DIR or ./runs)")


def register(subparsers) -> None:
    """Add sql, runs, lineage, export, gc and verify to an argparse subparsers object."""
    p = subparsers.add_parser("sql", help="run a read-only SQL query on the ledger (works while a run is writing)")
    p.add_argument("query", help='e.g. "SELECT generation, reward_mean FROM generations ORDER BY generation"')
    p.add_argument("--format", choices=commands.FORMATS, default="table", help="table (long cells cut), csv or json (full values)")
    p.add_argument("--max-width", type=int, default=64, help="table format: longest cell shown (default 64: a whole sha256)")
    _data_dir(p)
    p.set_defaults(handler=_cmd_sql)

    p = subparsers.add_parser("runs", help="list the runs: status, generations committed, best held-out accuracy, start time")
    p.add_argument("--format", choices=("table", "json"), default="table")
    _data_dir(p)
    p.set_defaults(handler=_cmd_runs)

    p = subparsers.add_parser("lineage", help="the chain of centres from an adapter or centre back to generation 0")
    p.add_argument("sha", metavar="ADAPTER_OR_CENTER_SHA", help="a centre or member adapter sha256, or a unique prefix (4+ hex digits)")
    p.add_argument("--run-id", default=None, help="follow this run when several runs share the centre")
    p.add_argument("--format", choices=("table", "json"), default="table")
    _data_dir(p)
    p.set_defaults(handler=_cmd_lineage)

    p = subparsers.add_parser("export", help="write every ledger table of a run as Parquet")
    p.add_argument("run_id")
    p.add_argument("--out", default=None, help="folder (default: <data-dir>/exports/RUN_ID)")
    _data_dir(p)
    p.set_defaults(handler=_cmd_export)

    p = subparsers.add_parser("centre", help="write a centre's files (a thinned one rebuilt from the ledger, every hash checked) into a folder")
    p.add_argument("sha", metavar="CENTRE_SHA", help="a centre sha256, or a unique prefix (4+ hex digits)")
    p.add_argument("--out", default=None, help="folder (default: <data-dir>/exports/centres/SHA12)")
    p.add_argument("--peft", action="store_true", help="the PEFT adapter folder a backend loads, rather than the checkpoint's files")
    _data_dir(p)
    p.set_defaults(handler=_cmd_centre)

    p = subparsers.add_parser("gc", help="remove artifacts no ledger row references (dry run unless --yes)")
    p.add_argument("--yes", action="store_true", help="really delete (default: print what would go)")
    p.add_argument("--min-age-hours", type=float, default=24.0, help="keep unreferenced artifacts younger than this (a live run's current generation; default 24)")
    p.add_argument("--thin-centres", type=int, default=0, metavar="K",
                   help="also delete every run's centres but the keyframes every K generations, its latest and first and those evaluations name; "
                        "each is rebuilt exactly on demand from the ledger (as store.keep_centre_every K does during a run; default 0: keep all)")
    _data_dir(p)
    p.set_defaults(handler=_cmd_gc)

    p = subparsers.add_parser("verify", help="rehash every artifact the ledger references; list missing and corrupt files (exit 1 if any)")
    p.add_argument("run_id", nargs="?", default=None, help="only this run's artifacts (default: every run's)")
    p.add_argument("--rebuild", action="store_true", help="also rebuild every thinned centre from the ledger, each step's hash checked (exit 1 if one cannot be)")
    _data_dir(p)
    p.set_defaults(handler=_cmd_verify)


def _cmd_sql(args) -> int:
    sys.stdout.write(commands.sql(args.data_dir, args.query, args.format, args.max_width))
    return 0


def _cmd_runs(args) -> int:
    sys.stdout.write(commands.runs(args.data_dir, args.format))
    return 0


def _cmd_lineage(args) -> int:
    sys.stdout.write(commands.lineage(args.data_dir, args.sha, args.run_id, args.format))
    return 0


def _cmd_export(args) -> int:
    for path in commands.export(args.data_dir, args.run_id, args.out):
        print(path)
    return 0


def _cmd_centre(args) -> int:
    sys.stdout.write(commands.centre(args.data_dir, args.sha, args.out, args.peft))
    return 0


def _cmd_gc(args) -> int:
    sys.stdout.write(commands.gc(args.data_dir, args.yes, args.min_age_hours * 3600.0, args.thin_centres))
    return 0


def _cmd_verify(args) -> int:
    if args.run_id is not None:
        from artifacts.runs import check_run_id

        check_run_id(args.run_id)
    text, intact = commands.verify(args.data_dir, args.run_id, args.rebuild)
    sys.stdout.write(text)
    return 0 if intact else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="es-countdown", description="Ask the ledger questions.")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def dispatch(args) -> int:
    """Run a parsed command: any failure is one line on stderr and exit code 2 (ES_DEBUG=1: traceback)."""
    try:
        return args.handler(args)
    except BrokenPipeError:  # `es-countdown sql ... | head`
        return 0
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, no traceback
        if os.environ.get("ES_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"es-countdown: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
