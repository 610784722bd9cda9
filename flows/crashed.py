"""An `on_crashed` flow hook: the task runs a crashed flow run leaves unfinished are marked Crashed.

Why: when a worker's flow run process dies (killed, out of memory), the worker marks the flow run
Crashed and then runs the flow's on_crashed hooks (prefect/runner/runner.py, Prefect 3.8.8), but
nothing finalizes its task runs: the server cancels the task runs of a Cancelled flow run
(server/services/cancellation_cleanup.py) and has no such rule for Crashed, so the UI shows the
killed tasks Running for ever. Use: `@flow(..., on_crashed=[mark_unfinished_task_runs_crashed])`.

A flow run in-process (`es-countdown run`) that is SIGKILLed has nobody left to run a hook: there
the flow run stays Running too (see the README's Prefect UI section).
"""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

UNFINISHED = [StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED, StateType.PAUSED, StateType.CANCELLING]


def mark_unfinished_task_runs_crashed(flow, flow_run, state) -> None:
    """Set every unfinished task run of `flow_run` to Crashed, naming the flow run's crash."""
    message = f"its flow run crashed: {state.message}" if state is not None and state.message else "its flow run crashed"
    unfinished = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED)))
    with get_client(sync_client=True) as client:
        while True:  # a page at a time (the API returns at most 200)
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), task_run_filter=unfinished, limit=200)
            for task_run in task_runs:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            if len(task_runs) < 200:
                return
