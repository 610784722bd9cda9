"""Wrong and hostile input at the command line: one line on stderr naming what and where, exit 2,
before Prefect or any work starts; nothing recorded is changed. (The reward's and the loaders'
own cases are in test_reward.py and test_problems.py.)"""

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from artifacts.ledger import CURRENT_VERSION, MIGRATIONS, Ledger
from es_core.settings import load_settings
from flows.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "experiments" / "smoke.yaml"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("es-countdown: error: ") and "\n" not in err, err
    return err


def run_smoke(capsys, data_dir: Path, *sets: str) -> str:
    argv = ["run", "--config", str(SMOKE), "--data-dir", str(data_dir)]
    for item in sets:
        argv += ["--set", item]
    assert cli_main(argv) == 2
    error = one_line_error(capsys)
    assert not data_dir.exists()  # the check came before anything was made (Prefect's folder first of all)
    return error


# --- settings a run cannot use -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, message",
    [
        # was: the right message after 97 s, 74 log lines and two Prefect tracebacks
        (["model.name=no-such-model"], "model.name 'no-such-model' is not a preset (smollm2-135m, "),
        (["model.name=/no/such/folder"], "not a HF model folder (no config.json): /no/such/folder"),
        (["model.name=/no/such/model.gguf"], "GGUF file not found: /no/such/model.gguf"),
        (["data.source=jsonl", "data.path=/no/such/problems.jsonl"], "problem file not found: /no/such/problems.jsonl"),
        (["data.source=paper", "data.path=/no/such/countdown.json"], "problem file not found: /no/such/countdown.json"),
        (["backend.kind=sglang", "backend.sglang.python=/no/such/python"], "backend.sglang.python '/no/such/python': '/no/such/python' is not a program on PATH"),
        (["eval.sets=[{name: paper-test, source: paper, path: /no/such/countdown.json}]"], "problem file not found: /no/such/countdown.json"),
    ],
)
def test_a_model_or_file_that_is_not_there_stops_the_run_at_once(tmp_path, capsys, monkeypatch, sets, message):
    monkeypatch.delenv("ES_SGLANG_URL", raising=False)  # attached to a server, no interpreter is launched
    assert message in run_smoke(capsys, tmp_path / "data", *sets)


def test_a_broken_problem_file_stops_the_run_naming_file_and_record(tmp_path, capsys):
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"numbers": [1, 2], "target": 3, "split": "heldout"}\n{"numbers": "123", "target": 6}\n')
    error = run_smoke(capsys, tmp_path / "data", "data.source=jsonl", f"data.path={problems}")
    assert error.endswith(f"{problems}:2: not a problem record: numbers must be a list of integers, not '123'")


def test_a_model_cache_that_is_a_file_stops_the_run(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    assert f"model.cache_dir {cache} is not writable ({cache}: not a folder)" in run_smoke(capsys, tmp_path / "data", f"model.cache_dir={cache}")


def test_a_bad_value_names_where_it_came_from(tmp_path, capsys, monkeypatch):
    # blamed smoke.yaml before, though the value came from --set (or the environment)
    error = run_smoke(capsys, tmp_path / "data", "es.population=-3")
    assert error.startswith("es-countdown: error: --set es.population=-3: es.population: Input should be greater than or equal to 2")
    monkeypatch.setenv("ES_ES__POPULATION", "-3")
    error = run_smoke(capsys, tmp_path / "data")
    assert error.startswith("es-countdown: error: environment variable ES_ES__POPULATION: es.population: ")
    monkeypatch.delenv("ES_ES__POPULATION")
    config = tmp_path / "exp.yaml"
    config.write_text(SMOKE.read_text() + "\nrun_name: [not, a, name]\n")
    assert cli_main(["run", "--config", str(config), "--data-dir", str(tmp_path / "data")]) == 2
    assert one_line_error(capsys).startswith(f"es-countdown: error: {config}: run_name: ")


def recorded_run(data_dir: Path, run_id: str = "r1") -> None:
    settings = load_settings(SMOKE, [f"data_dir={data_dir}"])
    Ledger(data_dir).record_run(run_id, settings.run_name, settings.model_dump_json(), settings.fingerprint(), "/models/base", "ab" * 32, 0)


def test_replay_and_resume_of_what_is_not_recorded_stop_before_prefect(tmp_path, capsys):
    data_dir = tmp_path / "data"
    assert cli_main(["replay", "r1", "--generation", "0", "--data-dir", str(data_dir)]) == 2
    assert one_line_error(capsys).endswith(f"no data dir at {data_dir} (give --data-dir DIR or set ES_DATA_DIR)")
    recorded_run(data_dir)
    assert cli_main(["replay", "r2", "--generation", "0", "--data-dir", str(data_dir)]) == 2
    assert one_line_error(capsys).endswith(f"run r2 is not in the ledger at {data_dir / 'ledger.duckdb'}")
    assert cli_main(["replay", "r1", "--generation", "3", "--data-dir", str(data_dir)]) == 2
    assert one_line_error(capsys).endswith("run r1 has no recorded generation 3 (last: None)")
    assert cli_main(["resume", "r2", "--data-dir", str(data_dir)]) == 2
    assert one_line_error(capsys).endswith(f"run r2 is not in the ledger at {data_dir / 'ledger.duckdb'}")
    assert cli_main(["resume", "r1", "--set", "es.generations=-1", "--data-dir", str(data_dir)]) == 2
    assert one_line_error(capsys).endswith("--set es.generations=-1: es.generations: Input should be greater than or equal to 0 (got -1)")
    assert not (data_dir / "prefect").exists()


# --- sql -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, message",
    [
        ("", 'sql: the query is empty (e.g. es-countdown sql "SELECT * FROM runs")'),  # was 'NoneType' ... 'description'
        ("  \n\t ", 'sql: the query is empty'),
        ("-- how many runs?", "the query holds no SQL statement (only comments or blanks)"),
        ("/* nothing */ ;", "the query holds no SQL statement (only comments or blanks)"),
    ],
)
def test_an_empty_query_is_one_line(tmp_path, capsys, query, message):
    recorded_run(tmp_path)
    assert cli_main(["sql", query, "--data-dir", str(tmp_path)]) == 2
    assert message in one_line_error(capsys)


# --- a data dir that cannot be written -----------------------------------------------------------


def tree_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def make_read_only():
    """Makes a folder read-only for a command: by its modes, and as root (whom modes do not stop)
    by running the command without the capabilities that override them. Undone afterwards."""
    made: list[Path] = []

    def read_only(folder: Path) -> list[str]:
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: a folder cannot be made read-only for a command")
            prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
        else:
            prefix = []
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        made.append(folder)
        probe = subprocess.run([*prefix, sys.executable, "-c", "import sys, tempfile; tempfile.TemporaryFile(dir=sys.argv[1])", str(folder)], capture_output=True)
        if probe.returncode == 0:
            pytest.skip(f"{folder} stays writable here")
        return prefix

    yield read_only
    for folder in made:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(stat.S_IRWXU | (path.stat().st_mode & 0o777))


def cli_process(prefix: list[str], args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), TMPDIR=str(tmp_path / "tmp"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([*prefix, sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_and_resume_into_a_read_only_data_dir_say_so_at_once(tmp_path, make_read_only):
    data_dir = tmp_path / "data"
    recorded_run(data_dir)
    prefix = make_read_only(data_dir)
    before = tree_state(data_dir)
    # was: about 3 minutes and up to 24 tracebacks, ending in a timeout of Prefect's ephemeral API
    for args in (["resume", "r1"], ["run", "--config", str(SMOKE)]):
        done = cli_process(prefix, [*args, "--data-dir", str(data_dir)], tmp_path, timeout=60)
        command = args[0]
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip() == f"es-countdown: error: data dir {data_dir} is not writable ({data_dir}: Permission denied); {command} writes the ledger and artifacts there"
    assert tree_state(data_dir) == before


def test_a_ledger_that_needs_migrating_in_a_read_only_dir_says_why(tmp_path, make_read_only):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with duckdb.connect(str(data_dir / "ledger.duckdb")) as con:  # a schema v1 file, as an old release wrote it
        for statement in MIGRATIONS[1]:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (1, now())")
    prefix = make_read_only(data_dir)
    done = cli_process(prefix, ["sql", "SELECT count(*) FROM runs", "--data-dir", str(data_dir)], tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"es-countdown: error: ledger {data_dir / 'ledger.duckdb'} has schema v1: it is migrated to v{CURRENT_VERSION} before it is read, which needs write access (")
    assert done.stderr.count("\n") == 1


TINY = """
run_name: tiny
model: {name: tiny-llama}
lora: {rank: 2, layers: [0, 1]}
es: {population: 4, sigma: 0.05, learning_rate: 0.05, generations: 2, seed: 3}
data: {train_size: 6, heldout_size: 4, prompts_per_generation: 3}
prompt: {style: raw}
generation: {max_new_tokens: 6, compile: false}
eval: {every: 0, base_model: false}
"""


@pytest.mark.slow
def test_replay_checks_a_read_only_copy_of_a_run_without_writing_to_it(tmp_path, prefect_harness, model_cache, monkeypatch, make_read_only):
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    data_dir = tmp_path / "data"
    es_countdown(config_path=str(config), run_id="ro", data_dir=str(data_dir))
    prefix = make_read_only(data_dir)
    before = tree_state(data_dir)
    done = cli_process(prefix, ["replay", "ro", "--generation", "1", "--data-dir", str(data_dir)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replay OK" in done.stderr + done.stdout and "Traceback" not in done.stderr
    assert tree_state(data_dir) == before
