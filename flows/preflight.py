"""Checks the CLI makes before a command starts Prefect or any work: each finds in a few seconds,
with one line, what the flow would otherwise hit after minutes (a model name that resolves to
nothing after 97 s and two Prefect tracebacks; a read-only data dir after 3 minutes and 24).

Nothing here writes: the data dir is probed with a temporary file that is gone at once, and the
ledger is only read (a current schema is never migrated by a read).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from artifacts.commands import open_ledger
from artifacts.ledger import LEDGER_FILE, Ledger
from es_core.settings import ConfigError, Settings, settings_from_dict
from flows.backend import check_backend

PREFECT_FOLDER = "prefect"  # <data_dir>/prefect/prefect.db: the ephemeral API's database of this data dir


def check_settings(settings: Settings, command: str = "run") -> None:
    """What the run reads and writes exists and can be: the data dir (writable), the base model
    (resolvable without building it), the problem file (every record valid), the interpreter that
    launches SGLang, and with runner.kind ray, Ray itself and the cluster at runner.address."""
    check_writable_data_dir(Path(settings.data_dir), f"{command} writes the ledger and artifacts there")
    if settings.model.cache_dir is not None:
        problem = _not_writable(Path(settings.model.cache_dir))
        if problem:
            raise ConfigError(f"model.cache_dir {settings.model.cache_dir} is not writable ({problem}); converted base models are kept there")
    check_backend(settings)
    from es_core.models import check_base_model  # imports torch: after the cheap checks

    check_base_model(settings.model)
    if settings.data.source != "generated":
        from es_core.countdown.problems import load_problems

        load_problems(settings.data)  # a file is read in well under a second; the generator is left to the run
    if settings.eval.sets:
        from es_core.countdown.problems import load_eval_set

        for spec in settings.eval.sets:
            load_eval_set(spec)


def resume_settings(run_id: str, overrides: list[str], data_dir: Path) -> Settings:
    """The stored settings of a recorded run under `overrides`, after the checks of a run."""
    run = _recorded_run(run_id, data_dir)
    settings = settings_from_dict(json.loads(run["config_json"]), [*overrides, f"data_dir={data_dir}"], where=f"run {run_id}")
    check_settings(settings, "resume")
    return settings


def check_replay(run_id: str, generation: int, data_dir: Path) -> None:
    """The run and its generation are in the ledger (replay only reads the data dir)."""
    ledger = open_ledger(data_dir)
    _recorded_run(run_id, data_dir, ledger)
    if ledger.generation_row(run_id, generation) is None:
        raise ConfigError(f"run {run_id} has no recorded generation {generation} (last: {ledger.last_generation(run_id)})")


def check_writable_data_dir(data_dir: Path, why: str) -> None:
    problem = _not_writable(data_dir)
    for path in (data_dir / LEDGER_FILE, data_dir / PREFECT_FOLDER / "prefect.db"):
        problem = problem or _not_writable_file(path)
    if problem:
        raise ConfigError(f"data dir {data_dir} is not writable ({problem}); {why}")


def prefect_database_folder(data_dir: Path) -> Path:
    """Where the ephemeral Prefect API of a command on `data_dir` keeps its database: inside the
    data dir, or, when that cannot be written (a replay of a read-only copy), a folder of the same
    data dir under the system's temporary folder."""
    folder = data_dir / PREFECT_FOLDER
    if not (_not_writable(folder) or _not_writable_file(folder / "prefect.db")):
        return folder
    key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"es-countdown-prefect-{key}"


# --- helpers ---------------------------------------------------------------------------------------


def _recorded_run(run_id: str, data_dir: Path, ledger: Ledger | None = None) -> dict:
    ledger = ledger or open_ledger(data_dir)  # a missing data dir or ledger: the ledger commands' one line
    run = ledger.run_row(run_id)
    if run is None:
        raise ConfigError(f"run {run_id} is not in the ledger at {ledger.path}")
    return run


def _not_writable(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (if missing, it will be made: its nearest existing
    parent decides), or None. A probe file rather than os.access: what counts is whether this
    process can create a file there, whatever its uid, capabilities or mount."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing}: not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".es-countdown-probe-"):
            pass
    except OSError as exc:
        return f"{existing}: {exc.strerror}"
    return None


def _not_writable_file(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        with open(path, "r+b"):  # opened for writing, nothing written
            pass
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None
