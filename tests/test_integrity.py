"""What a run's record guarantees: resume and replay use the stored settings, `verify` finds every
missing or corrupt artifact, replay checks the stored files, and what was scored is what was recorded."""

import os
import shutil
from pathlib import Path

import pytest

from artifacts.ledger import Ledger
from artifacts.store import ArtifactError, ArtifactStore
from es_core.seeding import NOISE_SCHEME
from es_core.settings import ConfigError, Settings
from flows.cli import main as cli_main
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


def copy_of(data_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(data_dir, tmp_path / "copy", symlinks=True)
    return tmp_path / "copy"


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
    with pytest.raises(ConfigError, match=r"es.sigma=0.1 asked, but run r was recorded with es.sigma = 0.05: a resume keeps"):
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


# --- what was scored is what was recorded ---------------------------------------------------------


def test_re_decoding_the_stored_member_adapters_gives_the_recorded_completions(recorded):
    """The embedded flow scores members it builds in memory while `write_members` writes their files: the
    files (the ledger's adapter hashes) must decode to the very completions the ledger holds. A
    flow that evaluated other members than it recorded (2 x sigma, another seed) fails here."""
    from flows.replay import replay

    _, rows = Ledger(recorded).query("SELECT member, list(completion ORDER BY problem_id) FROM samples WHERE run_id = ? AND generation = 1 GROUP BY 1", [RUN])
    assert len({tuple(texts) for _, texts in rows}) > 1, "members should decode differently at sigma 0.5"
    for generation in (0, 1):
        result = replay(RUN, generation, str(recorded), reevaluate=True)
        assert result["ok"], result["lines"]
        assert "re-evaluated 4 members, 12 completions" in "\n".join(result["lines"])


# --- verify, and replay against the stored files ----------------------------------------------------


def test_verify_lists_missing_and_corrupt_artifacts_by_file_and_replay_fails_on_a_flipped_byte(recorded, tmp_path, capsys):
    from flows.replay import replay

    from flows.cli import _complete

    data = copy_of(recorded, tmp_path)
    assert cli_main(["verify", RUN, "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("intact, 0 missing, 0 corrupt") and out.count("\n") == 1, out
    assert _complete(data, RUN, 2) is not None  # finished: resume would have nothing to do

    ledger = Ledger(data)
    member = ledger.member_rows(RUN, 1)[2]
    weights = data / "artifacts" / member["adapter_sha256"][:2] / member["adapter_sha256"] / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(raw))
    centre = ledger.generation_row(RUN, 1)["center_sha256"]  # the final centre
    shutil.rmtree(data / "artifacts" / centre[:2] / centre)

    assert cli_main(["verify", RUN, "--data-dir", str(data)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4, lines
    # the final centre is one recorded update from generation 1's parent, on disk: resume rebuilds it,
    # so the finished run is not reported complete (nothing to do) while it is missing
    assert any(line.startswith(f"RESTORABLE run {RUN}: its centres after generation 1's centre") and f"es-countdown resume {RUN}" in line
               for line in lines), lines
    assert _complete(data, RUN, 2) is None
    assert any(line.startswith(f"CORRUPT artifact {member['adapter_sha256']} is corrupt: {weights} has sha256") and "members.adapter_sha256" in line for line in lines), lines
    assert any(line.startswith(f"MISSING artifact {centre} is missing") and "evals.adapter_sha256, generations.center_sha256" in line for line in lines), lines
    assert lines[-1].endswith("1 missing, 1 corrupt"), lines
    assert cli_main(["verify", "--data-dir", str(data)]) == 1  # every run's
    capsys.readouterr()

    result = replay(RUN, 1, str(data))  # its members are rebuilt from seeds: the rebuilt hash still matches the ledger
    assert not result["ok"], result["lines"]
    assert any(f"CORRUPT stored member 2: artifact {member['adapter_sha256']} is corrupt: {weights}" in line for line in result["lines"]), result["lines"]


def flip_64_bytes(path: Path) -> None:
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    path.write_bytes(bytes(raw))


def test_replay_of_a_corrupt_stored_centre_fails_without_saying_it_matches(recorded, tmp_path):
    # the rebuilt centre has the ledger's hash, the stored copy is damaged: it printed both
    # "MISMATCH new centre: ... corrupt" and "new centre matches the ledger"
    from flows.replay import replay

    data = copy_of(recorded, tmp_path)
    centre = Ledger(data).generation_row(RUN, 1)["center_sha256"]
    flip_64_bytes(data / "artifacts" / centre[:2] / centre / "adapter_model.safetensors")
    result = replay(RUN, 1, str(data))
    lines = result["lines"]
    assert not result["ok"] and not any("matches" in line for line in lines), lines
    assert any(line.startswith(f"  CORRUPT stored new centre: artifact {centre} is corrupt:") for line in lines), lines
    assert f"  rebuilt new centre: the hash the ledger records ({centre[:12]})" in lines, lines
    assert lines[-1] == "replay FAILED: 1 corrupt stored artifact(s)", lines


# --- every model a run loads is checked against its hash (issue 26) -----------------------------------


def test_a_damaged_base_model_stops_a_resume_before_anything_is_committed(recorded, tmp_path, model_cache, monkeypatch):
    """64 flipped bytes in the converted base model's weights: loaded without a check, a resume
    committed generations decoded by another model."""
    from es_core.models import ModelError
    from flows.es_countdown import es_countdown

    data = copy_of(recorded, tmp_path)
    models = tmp_path / "models"
    shutil.copytree(model_cache, models)
    (weights,) = models.glob("tiny-llama-*/model.safetensors")
    flip_64_bytes(weights)
    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(models))
    with pytest.raises(ModelError) as err:
        es_countdown(run_id=RUN, overrides=["es.generations=3"], data_dir=str(data))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model folder {weights.parent} is damaged: {weights} has sha256 "), message
    assert f"delete {weights.parent} and it is built again" in message
    assert Ledger(data).last_generation(RUN) == 1 and Ledger(data).run_row(RUN)["status"] == "completed"


WARM = """
run_name: warm
model: {name: tiny-llama}
lora: {rank: 2, layers: [0, 1]}
es: {population: 4, sigma: 0.05, learning_rate: 0.05, generations: 1, seed: 3}
data: {train_size: 6, heldout_size: 4, prompts_per_generation: 3}
prompt: {style: raw}
generation: {max_new_tokens: 6, compile: false}
eval: {every: 0, base_model: false, warm_start: false}
warm_start: {steps: 2, batch_size: 2, learning_rate: 0.01, warmup_steps: 1}
"""


def test_a_damaged_warm_start_stops_a_resume_before_anything_is_committed(tmp_path, prefect_harness, model_cache, monkeypatch):
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config, data = tmp_path / "warm.yaml", tmp_path / "data"
    config.write_text(WARM)
    es_countdown(config_path=str(config), run_id="warm", data_dir=str(data))
    warm = Ledger(data).run_row("warm")["warm_start_sha256"]
    weights = data / "artifacts" / warm[:2] / warm / "model.safetensors"
    flip_64_bytes(weights)
    # the CLI: one line, exit code 2, before Prefect starts
    import subprocess
    import sys
    import time

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "resume", "warm", "--set", "es.generations=2", "--data-dir", str(data)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"})  # a Prefect start would fail differently
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"es-countdown: error: the warm-started model: artifact {warm} is corrupt: {weights} has sha256 "), done.stderr
    print(f"CLI refusal in {time.monotonic() - started:.1f} s")
    # the flow itself (a deployment run takes no CLI)
    with pytest.raises(ArtifactError) as err:
        es_countdown(run_id="warm", overrides=["es.generations=2"], data_dir=str(data))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"the warm-started model: artifact {warm} is corrupt: {weights} has sha256 "), message
    assert Ledger(data).last_generation("warm") == 0


# --- gc never removes what a run may still commit (issue 26) -------------------------------------------


def test_gc_during_a_run_removes_nothing_and_the_run_completes(tmp_path, prefect_harness, model_cache, monkeypatch):
    """A run writes a generation's centre before the ledger row that references it: a gc between
    the two (`--min-age-hours nan` made every unreferenced artifact old) removed a live run's
    centre; the run failed and its resume failed on the missing artifact."""
    import flows.es_countdown
    from flows.es_countdown import es_countdown

    from artifacts.commands import gc, verify
    from artifacts.runs import DataDirBusyError

    real_generation, answers = flows.es_countdown.generation, []

    def generation_with_gc(run, pipeline, g, centre):
        if g == 1:  # generation 0's centre written; its commit may be in flight
            try:
                answers.append(gc(tmp_path / "data", yes=True, min_age_s=0.0))
            except DataDirBusyError as exc:  # the CLI prints it in one line, exit code 2 (tests/test_ledger_cli.py)
                answers.append(str(exc))
        return real_generation(run, pipeline, g, centre)

    monkeypatch.setattr(flows.es_countdown, "generation", generation_with_gc)
    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    es_countdown(config_path=str(tiny_config(tmp_path)), run_id="live", data_dir=str(tmp_path / "data"))
    assert len(answers) == 1 and answers[0].startswith("a run is writing") and "gc removes nothing now" in answers[0], answers
    text, intact = verify(tmp_path / "data", "live")
    assert intact, text


def test_a_run_killed_before_its_commit_resumes_after_gc_removed_what_it_wrote(recorded, tmp_path, model_cache, monkeypatch):
    """Killed after generation 1's centre and members were written and cached, before their commit;
    gc then removes them, being unreferenced. The cached task results that name them must go too:
    a resume took the centre's hash from the cache and failed on the missing artifact."""
    import duckdb

    from artifacts.commands import gc, verify
    from flows.es_countdown import es_countdown

    data = copy_of(recorded, tmp_path)
    final = Ledger(data).generation_row(RUN, 1)["center_sha256"]
    con = duckdb.connect(str(data / "ledger.duckdb"))
    for table, generation in (("samples", 1), ("members", 1), ("generations", 1), ("evals", 2)):
        con.execute(f"DELETE FROM {table} WHERE run_id = ? AND generation = ?", [RUN, generation])
    con.close()
    out = gc(data, yes=True, min_age_s=0.0)
    assert f"removed {final}" in out and "cached task result(s) naming them" in out and "removed 0 unreferenced" not in out, out
    assert not ArtifactStore(data / "artifacts").exists(final)

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    result = es_countdown(run_id=RUN, data_dir=str(data))
    assert result["center_sha256"] == final  # rebuilt: the same content
    text, intact = verify(data, RUN)
    assert intact, text
