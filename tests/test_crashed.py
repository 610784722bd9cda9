"""A crashed flow run's unfinished task runs end Crashed, not Running for ever (flows/crashed.py).

A flow run's process is SIGKILLed while its task runs; then what a process worker does when its
flow run process dies (Prefect 3.8.8, prefect/runner/runner.py): the flow run is set Crashed and the
flow's on_crashed hooks are called with (flow, flow_run, state). Against the test harness's API."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowFilter, FlowFilterName
from prefect.states import Crashed

from flows.crashed import mark_unfinished_task_runs_crashed

ROOT = Path(__file__).resolve().parent.parent

FLOW = """
import sys, time
from prefect import flow, task

@task
def decode() -> None:
    time.sleep(600)

@flow(name=sys.argv[1])
def killed() -> None:
    decode.submit().result()

killed()
"""


def task_states(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilterId

    return [t.state.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))]


def killed_while_its_task_runs(name: str, tmp_path):
    """A flow run whose process was SIGKILLed while its task ran; its flow run as the API has it."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "flow.log"
    process = subprocess.Popen([sys.executable, "-c", FLOW, name], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.time() + 180
            while time.time() < deadline:
                runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
                if runs and task_states(client, runs[0].id) == ["Running"]:
                    break
                assert process.poll() is None, log.read_text()[-2000:]
                time.sleep(0.5)
            else:
                pytest.fail("the task never ran: " + log.read_text()[-2000:])
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    return runs[0]


def worker_reports_the_crash(client, flow_run, hooks: list) -> None:
    """What the worker's runner does once the flow run's process has exited with -9."""
    state = Crashed(message="Flow run process exited with non-zero status code -9.")
    client.set_flow_run_state(flow_run.id, state, force=True)
    for hook in hooks:
        hook(flow=None, flow_run=flow_run, state=state)  # the runner loads the flow; the hook does not use it


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("hooks, left", [([], "Running"), ([mark_unfinished_task_runs_crashed], "Crashed")])
def test_a_killed_flow_runs_task_ends_crashed_only_with_the_hook(tmp_path, hooks, left):
    flow_run = killed_while_its_task_runs(f"killed-{left.lower()}", tmp_path)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.name == "Running"  # in-process: nobody is left to say otherwise
        worker_reports_the_crash(client, flow_run, hooks)
        assert client.read_flow_run(flow_run.id).state.name == "Crashed"
        assert task_states(client, flow_run.id) == [left]  # without the hook: Running for ever (issue 19)
