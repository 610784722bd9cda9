"""Which failures Prefect retries: the conditions the evaluation and ledger tasks use, on tasks run
by Prefect (the test harness) that fail once and then succeed."""

from __future__ import annotations

import pytest
from prefect import flow, task

from artifacts.ledger import LedgerError
from es_core.backends.base import BackendError
from tasks.evaluate import _backend_failed
from tasks.ledger import LEDGER_WRITE


def attempts_until_done(condition, error: BaseException) -> tuple[int, bool]:
    """Run a task that raises `error` on its first attempt, under `condition`, with 2 retries:
    (attempts made, whether it completed)."""
    attempts = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=condition)
    def fails_once() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise error
        return "done"

    @flow
    def one_task():
        return fails_once(return_state=True)

    completed = one_task(return_state=True).is_completed()
    return len(attempts), completed


@pytest.mark.parametrize(("error", "retried"), [
    (BackendError("sglang server at http://127.0.0.1:30000 did not answer"), True),
    (ValueError("a bug"), False),
    (RuntimeError("CUDA error: an illegal memory access"), False),
])
def test_evaluation_retries_a_backend_failure_and_nothing_else(prefect_harness, error, retried):
    assert attempts_until_done(_backend_failed, error) == ((2, True) if retried else (1, False))


@pytest.mark.parametrize(("error", "retried"), [
    (OSError("disk busy"), True),
    (RuntimeError("IO Error: Could not set lock on file"), True),
    (LedgerError("run r1 was recorded with other settings: start a new run id"), False),
])
def test_a_ledger_write_retries_anything_but_a_refusal(prefect_harness, error, retried):
    assert attempts_until_done(LEDGER_WRITE["retry_condition_fn"], error) == ((2, True) if retried else (1, False))
