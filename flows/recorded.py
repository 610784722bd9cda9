"""A recorded run's settings, as its ledger row stores them: what resume and replay start from.

`load_settings` lets `ES_*` environment variables override a file; for a recorded run that would
rebuild or continue another run than the one recorded (replay with ES_ES__SIGMA=0.01 set rebuilt a
sigma-0.05 run and reported it failed). So a variable that changes the run's results is refused
in one line naming it; those that do not (ES_DATA_DIR, ES_MODEL__CACHE_DIR, ES_SGLANG_URL,
ES_EVAL__*, ES_ES__GENERATIONS: outside `Settings.fingerprint()`) still apply. The same for a
`--set` given to resume: only what the fingerprint leaves out may change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from es_core.seeding import NOISE_SCHEME
from es_core.settings import ConfigError, Settings, merged, parse_overrides, settings_from_dict


def recorded_settings(run: dict, root: str | Path, overrides: list[str] | tuple[str, ...] = (), verb: str = "resume") -> Settings:
    """The settings of ledger row `run` (its config_json) under `overrides` and data_dir=root.
    One-line ConfigError when the run was drawn under another noise scheme, or an ES_* variable or
    an override would change its results."""
    run_id = run["run_id"]
    scheme = run.get("noise_scheme")
    if scheme != NOISE_SCHEME:
        raise ConfigError(f"run {run_id} was recorded with noise scheme {scheme}, this code draws {NOISE_SCHEME}: "
                          f"its members cannot be rebuilt, so it cannot {verb} here (use the code it was recorded with)")
    stored = json.loads(run["config_json"])
    settings = settings_from_dict(stored, [*overrides, f"data_dir={Path(root)}"], where=f"run {run_id}")  # a bad key stops here
    recorded, asked = _without_environment(stored, []), _without_environment(stored, overrides)
    if asked.fingerprint() != recorded.fingerprint():
        key, was, now = _first_difference(recorded, asked)
        raise ConfigError(f"{key}={json.dumps(now)} asked, but run {run_id} was recorded with {key} = {json.dumps(was)}: "
                          f"a {verb} keeps everything that changes results (start a new run id to change it)")
    if settings.fingerprint() != asked.fingerprint():
        key, was, now = _first_difference(asked, settings)
        variable = _variable_for(key)
        raise ConfigError(f"{variable}={os.environ.get(variable, '...')} in the environment would change run {run_id}'s recorded {key} "
                          f"({json.dumps(was)} -> {json.dumps(now)}): unset it; {verb} uses the recorded settings")
    return settings


def _without_environment(stored: dict[str, Any], overrides) -> Settings:
    """The stored settings under `overrides`, no ES_* variable read (Settings reads only what it is given)."""
    return Settings(**merged(stored, parse_overrides(list(overrides))))


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _first_difference(before: Settings, after: Settings) -> tuple[str, Any, Any]:
    """(dotted key, before, after) of the first setting in the fingerprint that differs."""
    a, b = _leaves(before.model_dump(mode="json")), _leaves(after.model_dump(mode="json"))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and _in_fingerprint(before, key, b.get(key)):
            return key, a.get(key), b.get(key)
    return "<settings>", None, None  # pragma: no cover - the fingerprints differ, so some key does


def _in_fingerprint(settings: Settings, key: str, value: Any) -> bool:
    """Would setting `key` to `value` alone change the fingerprint? (A value invalid alone, e.g. an
    odd population with antithetic pairs, counts as a change.)"""
    changed = settings.model_dump(mode="json")
    node = changed
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    try:
        return Settings(**changed).fingerprint() != settings.fingerprint()
    except ValueError:  # pydantic's ValidationError
        return True


def _variable_for(key: str) -> str:
    """The ES_* variable that sets a dotted key (ES_ES__SIGMA for es.sigma), as set in the environment."""
    wanted = "ES_" + key.replace(".", "__").upper()
    present = [name for name in os.environ if name.upper() == wanted]
    if present:
        return present[0]
    section = "ES_" + key.split(".")[0].upper()  # a whole section given as JSON, e.g. ES_ES='{"sigma": 0.01}'
    return next((name for name in os.environ if name.upper() == section), wanted)


def check_recorded_models(run_id: str, root: str | Path) -> None:
    """Before a resume starts Prefect: the run's warm-started model (an artifact) against its id,
    and its recorded base model folder, when es-countdown built it, against the file hashes recorded
    then. One line naming the damaged file. (The run checks both again as it opens them; a file
    unchanged since is not hashed twice in one process.)"""
    from artifacts.commands import ARTIFACTS_DIR, open_ledger
    from artifacts.store import ArtifactError, ArtifactStore
    from es_core.models import SOURCE_FILE, verify_model_folder

    run = open_ledger(root).run_row(run_id)
    if run is None:
        return
    store = ArtifactStore(Path(root) / ARTIFACTS_DIR)
    if run.get("warm_start_sha256") and store.exists(run["warm_start_sha256"]):  # a missing one is trained again by the run
        try:
            store.get(run["warm_start_sha256"])
        except ArtifactError as exc:
            raise ArtifactError(f"the warm-started model: {exc}; restore it from a copy (es-countdown verify lists every damaged artifact)") from None
    base = Path(run["base_model"] or "")
    if run["base_model"] and (base / SOURCE_FILE).is_file():
        verify_model_folder(base)
