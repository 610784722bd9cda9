"""What a run's record guarantees: resume and replay use the stored settings."""

from pathlib import Path

import pytest

from artifacts.ledger import Ledger
from es_core.seeding import NOISE_SCHEME
from es_core.settings import ConfigError, Settings
from flows.recorded import recorded_settings
from tests.test_pipeline import tiny_config

RUN = "rec"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, prefect_harness, model_cache) -> Path:
    """A finished 2-generation tiny-llama run (embedded engine) at sigma 0.5, where members decode
    differently. Tests that damage it work on a copy."""
    from flows.es_countdown import es_countdown

    tmp = tmp_path_factory.mktemp("recorded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
        es_countdown(config_path=str(tiny_config(tmp)), overrides=["es.sigma=0.5"], run_id=RUN, data_dir=str(tmp / "data"))
    return tmp / "data"


# --- resume and replay use the stored settings ----------------------------------------------------


def run_row(scheme: str = NOISE_SCHEME) -> dict:
    """A run row as the ledger holds it (call it before setting an ES_* variable: Settings reads them)."""
    settings = Settings(es={"sigma": 0.05, "population": 4})
    return {"run_id": "r", "noise_scheme": scheme, "config_json": settings.model_dump_json()}


def test_the_stored_settings_apply_and_variables_outside_the_fingerprint_still_do(tmp_path, monkeypatch):
    monkeypatch.setenv("ES_EVAL__EVERY", "3")
    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(tmp_path / "models"))
    settings = recorded_settings(run_row(), tmp_path, ["es.generations=40"])
    assert settings.es.sigma == 0.05 and settings.es.generations == 40 and settings.eval.every == 3
    assert settings.data_dir == tmp_path and settings.model.cache_dir == tmp_path / "models"


@pytest.mark.parametrize("variable, value, key", [("ES_ES__SIGMA", "0.01", "es.sigma"), ("es_model__dtype", "bfloat16", "model.dtype"),
                                                  ("ES_ES", '{"learning_rate": 0.1}', "es.learning_rate")])
def test_an_environment_variable_that_changes_results_is_refused_naming_it(tmp_path, monkeypatch, variable, value, key):
    row = run_row()
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        recorded_settings(row, tmp_path, verb="replay")
    message = str(err.value)
    assert "\n" not in message and f"{variable}={value}" in message and f"recorded {key}" in message, message


def test_a_resume_override_that_changes_results_or_another_noise_scheme_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"resume --set es.sigma=0.1: run r was recorded with es.sigma = 0.05"):
        recorded_settings(run_row(), tmp_path, ["es.sigma=0.1"])
    with pytest.raises(ConfigError, match=f"noise scheme torch-cpu-randn, this code draws {NOISE_SCHEME}"):
        recorded_settings(run_row(scheme="torch-cpu-randn"), tmp_path, verb="replay")


def test_replay_and_resume_of_a_real_run_refuse_an_environment_override(recorded, monkeypatch):
    from flows.es_countdown import es_countdown
    from flows.replay import replay

    monkeypatch.setenv("ES_ES__SIGMA", "0.01")
    with pytest.raises(ConfigError, match=r"ES_ES__SIGMA=0.01 in the environment would change run rec's recorded es.sigma \(0.5 -> 0.01\)"):
        replay(RUN, 1, str(recorded))
    with pytest.raises(ConfigError, match="ES_ES__SIGMA=0.01"):
        es_countdown(run_id=RUN, overrides=["es.generations=3"], data_dir=str(recorded))
    assert Ledger(recorded).last_generation(RUN) == 1  # nothing ran
