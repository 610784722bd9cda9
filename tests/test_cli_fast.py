"""Commands whose answer is known before Prefect starts its temporary server (18-50 s) give it
without starting it: a complete run resumed, a recorded run id asked to run with other settings, a
PREFECT_API_URL no server answers. The flow module is replaced by one that fails if called."""

import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from artifacts.ledger import Ledger
from artifacts.store import ArtifactStore
from es_core.settings import load_settings
from flows.cli import main as cli_main
from flows.report import REPORT_FILE
from tests.test_ledger import fake_generation

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "experiments" / "smoke.yaml"


class FlowStarted(BaseException):  # past the CLI's one-line handler of Exception
    pass


@pytest.fixture
def flow_calls(monkeypatch) -> list:
    """Calls of the es-countdown flow: a stand-in module records them and stops there."""
    calls = []

    def es_countdown(**kwargs):
        calls.append(kwargs)
        raise FlowStarted

    monkeypatch.setitem(sys.modules, "flows.es_countdown", types.SimpleNamespace(es_countdown=es_countdown))
    return calls


def recorded_smoke_run(data: Path, run_id: str, generations: int, status: str, report: bool) -> None:
    """A run of configs/experiments/smoke.yaml as the flow records it: its settings, `generations`
    committed generations, its status, its latest centre's folder in the store (a ledger without
    it is a run to restore, not a complete one), and its report file or none."""
    settings = load_settings(SMOKE, [f"data_dir={data}"])
    ledger = Ledger(data)
    ledger.record_run(run_id, settings.run_name, settings.model_dump_json(), settings.fingerprint(), "/models/base", "b" * 64, settings.es.seed)
    for g in range(generations):
        rows = fake_generation(run_id, g)
        ledger.commit_generation(*rows)
        if g == generations - 1:
            ArtifactStore(data / "artifacts").path(rows[0]["center_sha256"]).mkdir(parents=True)
    ledger.set_run_status(run_id, status)
    if report:
        (data / "reports" / run_id).mkdir(parents=True)
        (data / "reports" / run_id / REPORT_FILE).write_text("# report\n")


def cli(*argv) -> int:
    return cli_main([str(a) for a in argv])


def test_resuming_a_complete_run_says_so_without_the_flow(tmp_path, capsys, flow_calls):
    recorded_smoke_run(tmp_path / "data", "done", generations=2, status="completed", report=True)
    assert cli("resume", "done", "--data-dir", tmp_path / "data") == 0
    out = capsys.readouterr().out
    assert "run done is complete (2 of 2 generations)" in out and "nothing to do" in out
    assert flow_calls == []


@pytest.mark.parametrize(
    "generations, status, report, sets",
    [
        (1, "failed", False, []),  # killed after generation 0
        (2, "running", False, []),  # killed after the last commit, before the final evaluation
        (2, "completed", False, []),  # killed while the report was written
        (2, "completed", True, ["es.generations=3"]),  # extended
        (2, "completed", True, ["eval.base_model=false"]),  # another setting the flow acts on
    ],
)
def test_a_run_with_work_left_is_resumed_by_the_flow(tmp_path, capsys, flow_calls, generations, status, report, sets):
    recorded_smoke_run(tmp_path / "data", "r", generations, status, report)
    argv = ["resume", "r", "--data-dir", tmp_path / "data"]
    for item in sets:
        argv += ["--set", item]
    with pytest.raises(FlowStarted):
        cli(*argv)
    assert flow_calls and flow_calls[0]["run_id"] == "r"


def test_run_of_a_complete_recorded_id_with_its_config_says_so(tmp_path, capsys, flow_calls):
    recorded_smoke_run(tmp_path / "data", "done", generations=2, status="completed", report=True)
    assert cli("run", "--config", SMOKE, "--run-id", "done", "--data-dir", tmp_path / "data") == 0
    assert "run done is complete" in capsys.readouterr().out
    assert flow_calls == []


@pytest.mark.parametrize(
    "sets, message",
    [
        (["es.sigma=0.02"], "es.sigma=0.02 asked, but run r was recorded with es.sigma = 0.1"),  # smoke.yaml: 0.1
        (["lora.rank=2"], "lora.rank=2 asked, but run r was recorded with lora.rank = 1"),
    ],
)
def test_run_of_a_recorded_id_with_other_settings_stops_before_the_flow(tmp_path, capsys, flow_calls, sets, message):
    recorded_smoke_run(tmp_path / "data", "r", generations=1, status="failed", report=False)
    argv = ["run", "--config", SMOKE, "--run-id", "r", "--data-dir", tmp_path / "data"]
    for item in sets:
        argv += ["--set", item]
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("es-countdown: error: ") and "\n" not in err and message in err, err
    assert flow_calls == []


def test_run_of_a_recorded_id_with_its_config_resumes_in_the_flow(tmp_path, flow_calls):
    recorded_smoke_run(tmp_path / "data", "r", generations=1, status="failed", report=False)
    with pytest.raises(FlowStarted):
        cli("run", "--config", SMOKE, "--run-id", "r", "--data-dir", tmp_path / "data")
    assert flow_calls[0]["run_id"] == "r"


def test_a_prefect_api_url_nobody_answers_is_one_line_before_prefect_starts(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recorded_smoke_run(tmp_path / "data", "r", generations=1, status="failed", report=False)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "ES_MODEL__CACHE_DIR": str(tmp_path / "models")}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "resume", "r", "--data-dir", str(tmp_path / "data")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    err = out.stderr.strip()
    assert err == f"es-countdown: error: PREFECT_API_URL=http://127.0.0.1:{port}/api does not answer (ConnectionError): start that server " \
                  "(prefect server start) or unset PREFECT_API_URL to run on a temporary one", err
    assert "Flow run" not in out.stdout + out.stderr
