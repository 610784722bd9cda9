"""`es-countdown`: run, resume and replay experiments; ask the ledger questions.

    es-countdown run --config configs/experiments/smoke.yaml [--set es.sigma=0.01] [--data-dir DIR]
    es-countdown resume RUN_ID [--data-dir DIR]
    es-countdown replay RUN_ID --generation G [--reevaluate]
    es-countdown sql "SELECT ..." | lineage SHA | export RUN_ID | gc [--yes] | verify [RUN_ID]

Runs go through Prefect: with no PREFECT_API_URL, in-process on Prefect's ephemeral API (no server
needed); with one, they show in that server's UI. Every failure that stops a command is one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="ledger + artifacts root (default: ES_DATA_DIR or ./runs)")


def _default_data_dir(value: str | None) -> str:
    from artifacts.commands import default_data_dir

    return str(default_data_dir(value))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="es-countdown", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start an experiment (the `es-countdown` flow, in-process)")
    run.add_argument("--config", required=True, help="YAML experiment, e.g. configs/experiments/smoke.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    run.add_argument("--run-id", default=None, help="name the run (default: <run_name>-<utc time>-<hex>)")
    run.add_argument("--backend", choices=["embedded", "sglang"], default=None, help="shorthand for --set backend.kind=...")
    _data_dir_arg(run)
    run.set_defaults(handler=_cmd_run)

    resume = sub.add_parser("resume", help="continue a run after its last recorded generation")
    resume.add_argument("run_id")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="e.g. es.generations=200 to extend a finished run")
    _data_dir_arg(resume)
    resume.set_defaults(handler=_cmd_resume)

    replay = sub.add_parser("replay", help="rebuild a generation from the ledger and check every hash")
    replay.add_argument("run_id")
    replay.add_argument("--generation", type=int, required=True)
    replay.add_argument("--reevaluate", action="store_true", help="also regenerate completions and compare rewards")
    _data_dir_arg(replay)
    replay.set_defaults(handler=_cmd_replay)

    from artifacts.cli import register

    register(sub)
    return parser


def _cmd_run(args) -> int:
    from es_core.settings import load_settings

    overrides = list(args.overrides) + ([f"backend.kind={args.backend}"] if args.backend else [])
    if args.data_dir:
        overrides.append(f"data_dir={Path(args.data_dir).resolve()}")
    _check_run_id(args.run_id)
    settings = load_settings(args.config, overrides)  # a broken config stops here, before any work
    from flows.preflight import check_settings

    check_settings(settings)  # so does a model, file or data dir the run could not use
    with _writer_lock(settings.data_dir, args.run_id):
        recorded = _recorded_run_settings(settings, args.run_id, overrides, args.config)
        if recorded is not None and (done := _complete(settings.data_dir, args.run_id, recorded.es.generations)):
            print(done)
            return 0
        _check_prefect_api()
        _isolate_ephemeral_prefect(str(settings.data_dir))
        from flows.es_countdown import es_countdown
        from flows.stopping import stop_on_signals

        with stop_on_signals():  # SIGTERM, Ctrl-C: stopped in seconds, the run marked failed
            result = es_countdown(config_path=str(Path(args.config).resolve()), overrides=overrides, run_id=args.run_id, data_dir=str(settings.data_dir))
    print(f"run {result['run_id']}: final centre {result['center_sha256'][:12]}, report {result['report']}")
    return 0


def _resume_overrides(args) -> list[str]:
    # generations may grow on resume; anything that changes results is refused by the flow
    return list(args.overrides)


def _cmd_resume(args) -> int:
    _check_run_id(args.run_id)
    from flows.preflight import check_writable_data_dir, resume_settings

    data_dir = Path(_default_data_dir(args.data_dir))
    check_writable_data_dir(data_dir, "resume writes the ledger and artifacts there")
    # the lock before the other checks: a run another process is writing has no ledger yet, maybe
    with _writer_lock(data_dir, args.run_id):
        if done := _complete_on_resume(data_dir, args.run_id, args.overrides):  # before the model check (torch) too
            print(done)
            return 0
        resume_settings(args.run_id, _resume_overrides(args), data_dir)
        from flows.recorded import check_recorded_models

        check_recorded_models(args.run_id, data_dir)  # a damaged model: one line now, not after Prefect starts
        _check_prefect_api()
        _isolate_ephemeral_prefect(str(data_dir))
        from flows.es_countdown import es_countdown
        from flows.stopping import stop_on_signals

        with stop_on_signals():
            result = es_countdown(run_id=args.run_id, overrides=_resume_overrides(args), data_dir=_default_data_dir(args.data_dir))
    print(f"run {result['run_id']}: final centre {result['center_sha256'][:12]}, report {result['report']}")
    return 0


def _cmd_replay(args) -> int:
    _check_run_id(args.run_id)
    from flows.preflight import check_replay

    # a replay only reads the data dir: a read-only copy of one can be checked
    check_replay(args.run_id, args.generation, Path(_default_data_dir(args.data_dir)))
    _check_prefect_api()
    _isolate_ephemeral_prefect(_default_data_dir(args.data_dir))
    from flows.replay import replay

    result = replay(args.run_id, args.generation, _default_data_dir(args.data_dir), args.reevaluate)
    return 0 if result["ok"] else 1


# --- what can be answered before Prefect starts (issue 19) ------------------------------------------
# The flow runs on Prefect's temporary server, which takes 18-50 s to start on a small machine:
# a command whose answer is already in the ledger, or that would fail at once, answers first.


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _recorded_run_settings(settings, run_id: str | None, overrides: list[str], config: str):
    """For `run --run-id` of a run the ledger holds: its recorded settings, if the config asks for
    the same (the flow resumes it); a one-line ConfigError if not, as the flow would raise after
    starting Prefect. None for a new run."""
    from artifacts.ledger import LEDGER_FILE

    root = Path(settings.data_dir)
    if run_id is None or not (root / LEDGER_FILE).is_file():
        return None
    from artifacts.commands import open_ledger
    from es_core.settings import ConfigError
    from flows.recorded import recorded_settings

    run = open_ledger(root).run_row(run_id)
    if run is None:
        return None
    resumed = recorded_settings(run, root, overrides)  # an override that changes results: one line
    if resumed.fingerprint() != settings.fingerprint():
        raise ConfigError(f"run {run_id} in {root} was started with other settings than {config}; start a new run id")
    return resumed


def _complete(data_dir, run_id: str, generations: int) -> str | None:
    """The line to print instead of running the flow when `run_id` is complete: status completed,
    `generations` committed, its report written (a run killed before its report was written is
    not complete: the flow finishes it), its latest centre on disk (a ledger without it: the flow
    rebuilds it, artifacts/rebuild.py `restore_centres`). None otherwise."""
    from artifacts.commands import ARTIFACTS_DIR, open_ledger
    from artifacts.retention import centres_to_restore
    from artifacts.store import ArtifactStore
    from flows.report import REPORT_FILE
    from tasks.common import DataDir

    ledger = open_ledger(data_dir)
    run, last = ledger.run_row(run_id), ledger.last_generation(run_id)
    if run is None or run["status"] != "completed" or last is None or last + 1 < generations:
        return None
    if centres_to_restore(ledger, ArtifactStore(Path(data_dir) / ARTIFACTS_DIR), run_id) is not None:
        return None  # its latest centre is missing but rebuildable from the ledger: the flow restores it
    report = DataDir(Path(data_dir)).run_dir(run_id) / REPORT_FILE
    if not report.is_file():
        return None
    return (f"run {run_id} is complete ({last + 1} of {generations} generations), report {report}: nothing to do "
            f"(to extend it: es-countdown resume {run_id} --set es.generations=N, N > {last + 1})")


def _complete_on_resume(data_dir: Path, run_id: str, overrides: list[str]) -> str | None:
    """`_complete` for a resume: es.generations as recorded or as overridden. Any other override
    (eval.base_model, say) may give the flow work: then None."""
    import json

    from artifacts.commands import open_ledger
    from es_core.settings import parse_overrides

    if any(_key(o) != "es.generations" for o in overrides):
        return None
    run = open_ledger(data_dir).run_row(run_id)
    if run is None:
        return None  # resume_settings says so in one line
    generations = parse_overrides(list(overrides)).get("es", {}).get("generations", json.loads(run["config_json"])["es"]["generations"])
    return _complete(data_dir, run_id, generations) if isinstance(generations, int) else None  # a bad value: the full checks name it


def _check_prefect_api() -> None:
    """With PREFECT_API_URL set (environment or Prefect profile), the flow reports to that server:
    one that does not answer is named now, in seconds, not after Prefect's retries (20 s). Any
    HTTP answer counts (a server behind auth may refuse /health)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    import requests

    from es_core.settings import ConfigError

    try:
        requests.get(f"{url.rstrip('/')}/health", timeout=5)
    except requests.RequestException as exc:
        raise ConfigError(f"PREFECT_API_URL={url} does not answer ({type(exc).__name__}): start that server "
                          f"(prefect server start) or unset PREFECT_API_URL to run on a temporary one") from None


# --- one writer per run id (issue 17) ---------------------------------------------------------------


def _check_run_id(run_id: str | None) -> None:
    """A run id that is not a plain name (a path, `..`) stops here in one line, before any work."""
    if run_id is not None:
        from artifacts.runs import check_run_id

        check_run_id(run_id)


def _writer_lock(data_dir, run_id: str | None):
    """The run's write lock, held while the flow runs (a second writer of the id is refused in one
    line naming the holder); a new run without --run-id gets a fresh id and needs none."""
    import contextlib

    from artifacts.runs import RunLock

    return RunLock(data_dir, run_id) if run_id is not None else contextlib.nullcontext()


def _isolate_ephemeral_prefect(data_dir: str) -> None:
    """With no Prefect server configured, Prefect runs an ephemeral API on one shared SQLite file;
    two runs at once then trip over its lock. Give each data dir its own (a configured server, or
    a database the user chose, is left alone)."""
    if "PREFECT_API_URL" in os.environ or "PREFECT_API_DATABASE_CONNECTION_URL" in os.environ:
        return
    from flows.preflight import prefect_database_folder

    folder = prefect_database_folder(Path(data_dir))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{folder / 'prefect.db'}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here, nor on GPU hosts
    # Prefect waits 20 s for its ephemeral API; a fresh database took 25-28 s to come up on a slow
    # 2-core machine (imports alone 9 s), and the run then failed before any work
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    from artifacts.cli import dispatch

    try:
        return dispatch(args)
    except KeyboardInterrupt as stop:  # Ctrl-C, or flows.stopping.Stopped (SIGTERM too)
        from flows.stopping import tell_stopped

        signum = getattr(stop, "signum", signal.SIGINT)
        tell_stopped(signum)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
