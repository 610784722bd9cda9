"""Run ids are plain names, and a run id has one writer at a time (artifacts/runs.py, the CLI)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts.ledger import Ledger
from artifacts.runs import RunIdError, RunLock, RunLockedError, check_run_id
from flows.cli import main as cli_main
from tasks.common import DataDir
from tests.test_pipeline import tiny_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("run_id", ["main", "smollm2-s005", "tiny-20261201-101500-ab12", "Run_2.b", "x" * 128])
def test_plain_names_are_run_ids(run_id):
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", ["../../../escape", "a/b", "..", "a..b", "/abs", ".hidden", "-flag", "", "a b", "a\nb", "x" * 129, "a\\b"])
def test_paths_and_odd_names_are_refused_in_one_line(run_id):
    with pytest.raises(RunIdError) as err:
        check_run_id(run_id)
    assert "\n" not in str(err.value)


def test_a_run_id_that_is_a_path_writes_nothing_anywhere(tmp_path, capsys):
    data_dir = tmp_path / "deep" / "data"
    config = tiny_config(tmp_path)
    assert cli_main(["run", "--config", str(config), "--run-id", "../../../escape", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run id '../../../escape'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no data dir, no report outside it
    for command in (["resume", "../x"], ["replay", "a/b", "--generation", "0"]):
        assert cli_main([*command, "--data-dir", str(data_dir)]) == 2
        assert "run id" in capsys.readouterr().err
    # below the CLI too: the ledger and the data dir layout refuse it (a deployment passes run_id straight to the flow)
    with pytest.raises(RunIdError):
        Ledger(data_dir).record_run("../escape", "n", "{}", "s" * 64, "/m", "b" * 64, 0)
    with pytest.raises(RunIdError):
        DataDir(data_dir).run_dir("../escape")
    assert not data_dir.exists()


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from artifacts.runs import RunLock
lock = RunLock(sys.argv[2], sys.argv[3]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _cli(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def test_a_second_writer_of_a_run_id_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path, model_cache):
    data_dir = tmp_path / "data"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "ES_MODEL__CACHE_DIR": str(model_cache), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ROOT), str(data_dir), "dup2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["run", "--config", str(tiny_config(tmp_path)), "--run-id", "dup2"], ["resume", "dup2"]):
            started = time.monotonic()
            second = _cli([*command, "--data-dir", str(data_dir)], env, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            line = second.stderr.strip()
            assert line.count("\n") == 0, line
            assert f"run dup2 is being written by pid {holder.pid} on host {socket.gethostname()} since " in line
            print(f"{command[0]} refused in {time.monotonic() - started:.1f} s: {line}")
        assert not (data_dir / "ledger.duckdb").exists()  # refused before any work
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(data_dir, "dup2"):  # the OS released the dead holder's lock
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} "):  # and one process cannot take it twice either
            RunLock(data_dir, "dup2").acquire()


@pytest.mark.slow
def test_two_runs_of_one_id_at_once_one_runs_the_other_is_refused(tmp_path, model_cache):
    """The issue's case: two `run --run-id dup2` at the same time. The first computes every
    generation, the second stops at once with one line; the ledger holds one run's rows."""
    data_dir = tmp_path / "data"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "ES_MODEL__CACHE_DIR": str(model_cache), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "flows.cli", "run", "--config", str(tiny_config(tmp_path)), "--run-id", "dup2", "--data-dir", str(data_dir)]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_file = data_dir / "locks" / "dup2.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and f'"pid": {first.pid}' not in (lock_file.read_text() if lock_file.exists() else ""):
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started"
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr
    _, rows = Ledger(data_dir).query("SELECT count(*), count(DISTINCT generation) FROM generations WHERE run_id = 'dup2'")
    assert rows == [(2, 2)]
