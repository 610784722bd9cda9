"""One settings object: YAML + ES_ env vars + --set, and one-line errors naming the key."""

import re
from pathlib import Path

import pytest

from es_core.settings import ConfigError, load_settings

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "experiments"


def test_yaml_env_and_overrides_in_order(tmp_path, monkeypatch):
    path = tmp_path / "exp.yaml"
    path.write_text("es:\n  sigma: 0.002\n  population: 8\nlora:\n  rank: 4\n")
    s = load_settings(path)
    assert (s.es.sigma, s.es.population, s.lora.rank, s.lora.lora_alpha) == (0.002, 8, 4, 8.0)
    monkeypatch.setenv("ES_ES__SIGMA", "0.003")
    assert load_settings(path).es.sigma == 0.003  # env over YAML
    s = load_settings(path, ["es.sigma=0.004", "lora.layers=[0, 1]"])
    assert s.es.sigma == 0.004 and s.lora.layers == [0, 1]  # --set over env
    assert s.es.population == 8  # untouched keys keep the YAML value


def test_data_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ES_DATA_DIR", str(tmp_path / "d"))
    assert load_settings().data_dir == tmp_path / "d"


def test_fingerprint_changes_with_results_not_with_location(tmp_path):
    a = load_settings(None, ["es.sigma=0.01"])
    b = load_settings(None, ["es.sigma=0.01", f"data_dir={tmp_path}"])
    c = load_settings(None, ["es.sigma=0.02"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    # where the engines run is no part of it: a run started locally resumes on a Ray cluster
    on_ray = load_settings(None, ["es.sigma=0.01", "runner.kind=ray", "runner.address=head:6379", "runner.gpus_per_engine=0.5"])
    assert on_ray.fingerprint() == a.fingerprint()


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("es:\n  sgima: 0.1\n", [], "es.sgima: Extra inputs are not permitted"),
        ("es:\n  sigma: lots\n", [], "es.sigma: Input should be a valid number"),
        ("es:\n  population: 7\n", [], "population must be even"),
        ("es: [1, 2\n", [], "line"),
        ("- just a list\n", [], "mapping"),
        ("", ["es.sigma"], "expected key=value"),
        ("", ["backend.kind=tpu"], "backend.kind"),
        ("data:\n  source: paper\n", [], "data.path is required"),
        ("backend:\n  kind: sglang\n", ["runner.kind=ray"], "runner.kind ray runs embedded engines"),
        ("", ["runner.gpus_per_engine=2"], "runner.gpus_per_engine"),
    ],
)
def test_broken_config_is_one_line_naming_key_and_file(tmp_path, text, overrides, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    if "--set" not in str(err.value):
        assert str(path) in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        load_settings("/no/such.yaml")


@pytest.mark.parametrize("name", ["countdown_es.yaml", "smoke.yaml"])
def test_shipped_experiments_load(name):
    s = load_settings(CONFIGS / name)
    assert s.es.population % 2 == 0


def test_fingerprint_counts_evaluation_sets_and_warm_start_but_not_where_files_are(tmp_path):
    paper = "eval.sets=[{name: paper-test, source: paper, path: %s, size: 2000}]"
    plain = load_settings(None, [])
    with_set = load_settings(None, [paper % "/a/countdown.json"])
    moved = load_settings(None, [paper % "/b/countdown.json"])
    assert plain.fingerprint() != with_set.fingerprint() == moved.fingerprint()
    assert load_settings(None, ["eval.every=3", "eval.warm_start=false"]).fingerprint() == plain.fingerprint()
    assert load_settings(None, ["warm_start.steps=10"]).fingerprint() != plain.fingerprint()
    # a setting at its default is left out: adding one later keeps recorded runs' hashes
    assert load_settings(None, ["es.fitness=mean_reward", "data.train_problems=fixed"]).fingerprint() == plain.fingerprint()


@pytest.mark.parametrize(
    "overrides, env, origin",
    [
        (["es.population=-3"], {}, "--set es.population=-3: es.population: "),  # blamed the YAML file before
        (["es.population=4", "es.population=-1"], {}, "--set es.population=-1: es.population: "),  # the later --set wins
        ([], {"ES_ES__POPULATION": "-3"}, "environment variable ES_ES__POPULATION: es.population: "),
        ([], {"es_es__population": "-3"}, "environment variable es_es__population: es.population: "),
        ([], {"ES_ES": '{"population": -3}'}, "environment variable ES_ES: es.population: "),
        (["lora.layers=[0, x]"], {}, "--set lora.layers=[0, x]: lora.layers.1: "),
        # env sets the value, --set something else: the value's own source is named
        (["es.sigma=0.5"], {"ES_ES__POPULATION": "-3"}, "environment variable ES_ES__POPULATION: es.population: "),
    ],
)
def test_a_bad_value_names_the_source_it_came_from(tmp_path, monkeypatch, overrides, env, origin):
    path = tmp_path / "exp.yaml"
    path.write_text("es:\n  population: 8\n  sigma: 0.01\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings(path, overrides)
    assert str(err.value).startswith(origin), str(err.value)
    assert str(path) not in str(err.value)


def test_a_bad_value_in_the_file_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "exp.yaml"
    path.write_text("es:\n  population: -3\n")
    monkeypatch.setenv("ES_ES__SIGMA", "0.5")  # sets another key of the section
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: es.population: "):
        load_settings(path, ["es.learning_rate=0.1"])


def test_a_whole_section_error_names_every_source_inside_it(tmp_path, monkeypatch):
    # an odd population with antithetic pairs is the section's check: population came from --set,
    # antithetic from the environment, sigma from the file
    path = tmp_path / "exp.yaml"
    path.write_text("es:\n  sigma: 0.01\nlora:\n  rank: 2\n")
    monkeypatch.setenv("ES_ES__ANTITHETIC", "true")
    with pytest.raises(ConfigError) as err:
        load_settings(path, ["es.population=5", "lora.rank=4"])
    assert str(err.value).startswith(f"--set es.population=5 and environment variable ES_ES__ANTITHETIC and {path}: es: ")
    assert "population must be even" in str(err.value)


# --- issue 26: non-finite values, mistyped ES_ variables, a binary file ------------------------------


@pytest.mark.parametrize("override, key", [("es.learning_rate=.inf", "es.learning_rate"), ("es.sigma=1e309", "es.sigma"),
                                           ("es.sigma=.nan", "es.sigma"), ("warm_start.learning_rate=-.inf", "warm_start.learning_rate"),
                                           ("runner.shard_timeout_s=.inf", "runner.shard_timeout_s"), ("lora.alpha=.inf", "lora.alpha")])
def test_every_float_setting_is_finite(override, key):
    # an infinite learning rate ran to "completed" with a NaN centre, stored as null: never resumable
    with pytest.raises(ConfigError) as err:
        load_settings(None, [override])
    assert str(err.value).startswith(f"--set {override}: {key}: Input should be a finite number"), str(err.value)


def test_a_non_finite_value_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("es:\n  learning_rate: .inf\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: es.learning_rate: Input should be a finite number"):
        load_settings(path)


@pytest.mark.parametrize("variable, message", [
    ("ES_ES_SIGMA", "environment variable ES_ES_SIGMA is not a setting: did you mean ES_ES__SIGMA"),
    ("es_lora_rank", "environment variable es_lora_rank is not a setting: did you mean ES_LORA__RANK"),
    ("ES_DATADIR", "did you mean ES_DATA_DIR"),
    ("ES_WARMSTART__STEPS", "did you mean ES_WARM_START__STEPS"),
    ("ES_WARM_START_STEPZ", "a key of section warm_start is set as ES_WARM_START__KEY"),
])
def test_a_mistyped_es_variable_is_refused_naming_it(monkeypatch, variable, message):
    # pydantic-settings ignores an ES_ name it cannot place: ES_ES_SIGMA=0.5 changed nothing, silently
    monkeypatch.setenv(variable, "2")
    with pytest.raises(ConfigError) as err:
        load_settings(None, [])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_other_es_variables_are_left_alone(monkeypatch):
    for name in ("ES_JAVA_OPTS", "ES_HOME", "ES_DEBUG", "ES_SMOLLM2_GGUF", "ES_MODEL_CACHE"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("ES_ES__SIGMA", "0.5")
    assert load_settings(None, []).es.sigma == 0.5


def test_a_binary_config_file_is_named(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: not a YAML text file"):
        load_settings(path)


def test_lora_layers_is_a_list_or_all_and_weights_space_defaults_to_every_layer():
    from es_core.settings import settings_from_dict

    assert settings_from_dict({}, ["lora.layers=all"]).lora.layers == "all"
    assert settings_from_dict({"es": {"space": "weights"}}).lora.layers == "all"
    assert settings_from_dict({"es": {"space": "weights"}, "lora": {"layers": [0, 2]}}).lora.layers == [0, 2]
    assert settings_from_dict({}).lora.layers == list(range(11))  # LoRA space keeps its default (and its fingerprint)
    with pytest.raises(ConfigError, match=r"^--set lora.layers=alll: lora.layers: Value error, a list of layer indices, or all \(got 'alll'\)$"):
        settings_from_dict({}, ["lora.layers=alll"])
    with pytest.raises(ConfigError, match=r"es.optimizer adam is LoRA space only"):
        settings_from_dict({"es": {"space": "weights", "optimizer": "adam"}})
