"""The user's real path, end to end: a local Prefect server, the `gpu` deployment from prefect.yaml,
a process worker on pool `gpu`, `prefect deployment run es-countdown/gpu` waited on until
Completed; then the same flow run retried as the UI's retry button does it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from artifacts.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "ES_PROJECT_DIR": str(ROOT)}
    server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "server.log")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(1)
    else:
        stop(server)
        pytest.fail("prefect server did not become healthy: " + (tmp_path / "server.log").read_text()[-2000:])
    yield env
    stop(server)


def prefect(env, *args, timeout=300) -> str:
    out = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def flow_run_state(env, flow_run_id: str) -> str:
    r = requests.get(f"{env['PREFECT_API_URL']}/flow_runs/{flow_run_id}", timeout=10)
    r.raise_for_status()
    return r.json()["state"]["type"]


def wait_terminal(env, flow_run_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = flow_run_state(env, flow_run_id)
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(2)
    return "TIMEOUT"


def task_run_states(env, flow_run_id: str, attempt: int) -> list[tuple[str, str]]:
    """(task function, state name) of the task runs of one attempt of a flow run."""
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}
    r = requests.post(f"{env['PREFECT_API_URL']}/task_runs/filter", json=body, timeout=10)
    r.raise_for_status()
    return [(t["task_key"].rsplit("-", 1)[0], t["state"]["name"]) for t in r.json() if t["flow_run_run_count"] == attempt]


def test_deployment_run_on_a_process_worker_then_ui_retry(prefect_server, tmp_path, model_cache):
    env = {**prefect_server, "ES_MODEL__CACHE_DIR": str(model_cache)}
    data_dir = tmp_path / "data"
    prefect(env, "work-pool", "create", "gpu", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")
    worker = start([PREFECT, "worker", "start", "--pool", "gpu"], env, tmp_path / "worker.log")
    try:
        params = ["--param", "config_path=configs/experiments/smoke.yaml", "--param", f"data_dir={data_dir}", "--param", "run_id=deployed-smoke"]
        out = prefect(env, "deployment", "run", "es-countdown/gpu", *params, "--watch", "--watch-timeout", "1500", timeout=1600)
        assert "Completed" in out or "COMPLETED" in out, out[-2000:] + (tmp_path / "worker.log").read_text()[-3000:]
        ledger = Ledger(data_dir)
        assert ledger.run_row("deployed-smoke")["status"] == "completed"
        _, rows = ledger.query("SELECT count(*) FROM generations WHERE run_id = 'deployed-smoke'")
        assert rows[0][0] == 2
        _, before = ledger.query("SELECT count(*) FROM samples WHERE run_id = 'deployed-smoke'")

        # the flow run id of that deployment run
        r = requests.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json={"limit": 5}, timeout=10)
        flow_run_id = r.json()[0]["id"]
        # the UI's Retry button: set the finished run back to Scheduled (AwaitingRetry), forced
        r = requests.post(
            f"{env['PREFECT_API_URL']}/flow_runs/{flow_run_id}/set_state",
            json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True},
            timeout=10,
        )
        r.raise_for_status()
        assert wait_terminal(env, flow_run_id, 900) == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        _, after = ledger.query("SELECT count(*) FROM samples WHERE run_id = 'deployed-smoke'")
        assert after == before  # nothing duplicated
        # no task body ran twice: the retry's content-cached tasks are all Cached
        cached_kinds = ("init_population", "write_members", "evaluate_population", "evaluate_heldout", "aggregate")
        retried = [(n, s) for n, s in task_run_states(env, flow_run_id, attempt=2) if n in cached_kinds]
        assert retried and all(s == "Cached" for _, s in retried), retried

        # resume by id alone: the deployment gives no config_path, so the recorded settings apply
        by_id = ["--param", f"data_dir={data_dir}", "--param", "run_id=deployed-smoke"]
        out = prefect(env, "deployment", "run", "es-countdown/gpu", *by_id, "--watch", "--watch-timeout", "900", timeout=1000)
        assert "Completed" in out or "COMPLETED" in out, out[-2000:] + (tmp_path / "worker.log").read_text()[-3000:]
        # a config that asks for other settings than the recorded run's is refused
        other = ["--param", "config_path=configs/experiments/countdown_es.yaml", *by_id]
        refused = subprocess.run([PREFECT, "deployment", "run", "es-countdown/gpu", *other, "--watch", "--watch-timeout", "600"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=700)
        assert "Failed" in refused.stdout or "FAILED" in refused.stdout, refused.stdout[-2000:]
        assert "was started with other settings" in (tmp_path / "worker.log").read_text()
        _, runs = ledger.query("SELECT run_id, status FROM runs")
        assert runs == [("deployed-smoke", "completed")]
        assert ledger.query("SELECT count(*) FROM samples WHERE run_id = 'deployed-smoke'")[1] == before
    finally:
        stop(worker)
