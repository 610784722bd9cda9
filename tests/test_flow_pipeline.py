"""The pipeline that overlaps host work with decoding (flows/pipeline.py), under Prefect's test
harness with real tasks: what waits for which decode, and that every error of background work
reaches the flow."""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow, task

from flows.pipeline import Pipeline
from tasks.common import NO_CACHE

LOG: list[str] = []  # what the background tasks did, in order


@task(cache_policy=NO_CACHE)
def note(text: str, decoding=None) -> str:
    if decoding is not None:
        decoding.wait()
    LOG.append(text)
    return text


@task(cache_policy=NO_CACHE)
def fail(text: str, decoding=None) -> None:
    if decoding is not None:
        decoding.wait()
    LOG.append(text)
    raise OSError(f"disk full while {text}")


def settled_soon(condition, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture(autouse=True)
def empty_log():
    LOG.clear()


def test_next_inputs_are_prepared_once_this_generation_decodes_and_reused(prefect_harness):
    prepared: list[tuple[int, bool]] = []
    decoding_now: dict[int, threading.Event] = {}

    def prepare(g: int) -> str:
        prepared.append((g, g == 0 or decoding_now[g - 1].is_set()))
        return f"inputs {g}"

    with Pipeline(prepare, stop=3, log_error=print) as pipeline:
        assert pipeline.start(0) == "inputs 0" and prepared == [(0, True)]
        decoding_now[0] = pipeline.decoding
        time.sleep(0.2)
        assert prepared == [(0, True)]  # g + 1 waits for g's decoding
        pipeline.decoding.set()
        assert settled_soon(lambda: len(prepared) == 2)
        pipeline.end_generation()
        assert pipeline.start(1) == "inputs 1"
        decoding_now[1] = pipeline.decoding
        pipeline.end_generation()  # a cached evaluation never decoded: its end lets the look-ahead run
        assert pipeline.start(2) == "inputs 2"
        pipeline.end_generation()
    assert prepared == [(0, True), (1, True), (2, True)]  # each prepared once, never before the decode before it


def test_an_error_preparing_the_next_inputs_is_raised_when_they_are_taken(prefect_harness):
    def prepare(g: int) -> str:
        if g == 1:
            raise ValueError("no problems left for generation 1")
        return f"inputs {g}"

    with pytest.raises(ValueError, match="no problems left for generation 1"):
        with Pipeline(prepare, stop=2, log_error=print) as pipeline:
            pipeline.start(0)
            pipeline.decoding.set()
            pipeline.end_generation()
            pipeline.start(1)


@flow
def two_generations() -> list[str]:
    """Generation g's files while g decodes; g's commit while g + 1 decodes."""
    with Pipeline(lambda g: g, stop=2, log_error=print) as pipeline:
        pipeline.start(0)
        pipeline.while_decoding(note, "files 0")
        time.sleep(0.2)
        seen_before_decoding = list(LOG)
        pipeline.decoding.set()
        pipeline.end_generation()  # waits for files 0
        seen_at_end = list(LOG)
        pipeline.while_next_decodes(note, "commit 0")

        pipeline.start(1)
        pipeline.while_decoding(note, "files 1")
        time.sleep(0.2)
        seen_before_second_decoding = list(LOG)
        pipeline.decoding.set()
        pipeline.end_generation()
        pipeline.while_next_decodes(note, "commit 1")  # the run ends: the `with` block's settle runs it
    return [seen_before_decoding, seen_at_end, seen_before_second_decoding, list(LOG)]


def test_background_work_waits_for_the_decode_it_overlaps(prefect_harness):
    before, at_end, before_second, after = two_generations()
    assert before == [] and at_end == ["files 0"] and before_second == ["files 0"]
    assert after[0] == "files 0" and sorted(after[1:3]) == ["commit 0", "files 1"] and after[3] == "commit 1"


@flow
def failing_commit() -> None:
    with Pipeline(lambda g: g, stop=2, log_error=print) as pipeline:
        pipeline.start(0)
        pipeline.decoding.set()
        pipeline.end_generation()
        pipeline.while_next_decodes(fail, "committing generation 0")
        pipeline.start(1)
        pipeline.decoding.set()
        pipeline.end_generation()  # generation 0's commit is waited for here: its error surfaces
        LOG.append("not reached")


def test_an_error_in_background_work_surfaces_in_the_flow(prefect_harness):
    with pytest.raises(OSError, match="disk full while committing generation 0"):
        failing_commit()
    assert LOG == ["committing generation 0"]


ERRORS: list[str] = []


@flow
def loop_fails_while_a_commit_is_pending() -> None:
    with Pipeline(lambda g: g, stop=3, log_error=ERRORS.append) as pipeline:
        pipeline.start(0)
        pipeline.decoding.set()
        pipeline.end_generation()
        pipeline.while_next_decodes(note, "commit 0")
        pipeline.while_next_decodes(fail, "publishing generation 0")
        pipeline.start(1)
        raise KeyboardInterrupt  # before generation 1 decodes


def test_leaving_on_an_error_lets_scored_work_land_logs_its_errors_and_raises_the_original(prefect_harness):
    ERRORS.clear()
    with pytest.raises(KeyboardInterrupt):
        loop_fails_while_a_commit_is_pending()
    assert sorted(LOG) == ["commit 0", "publishing generation 0"]  # no decode came, and they ran all the same
    assert len(ERRORS) == 1 and "OSError: disk full while publishing generation 0" in ERRORS[0]


@flow
def settle_then_next_generation() -> list:
    with Pipeline(lambda g: g, stop=2, log_error=print) as pipeline:
        pipeline.start(0)
        pipeline.decoding.set()
        pipeline.end_generation()
        pipeline.while_next_decodes(note, "commit 0")
        pipeline.settle()  # a held-out evaluation reads the ledger next
        after_settle = list(LOG)
        pipeline.start(1)
        pipeline.while_decoding(note, "files 1")
        time.sleep(0.2)
        before_decoding = list(LOG)
        pipeline.decoding.set()
        pipeline.end_generation()
    return [after_settle, before_decoding, list(LOG)]


def test_settle_runs_everything_now_and_later_work_waits_for_its_decode_again(prefect_harness):
    after_settle, before_decoding, after = settle_then_next_generation()
    assert after_settle == ["commit 0"] and before_decoding == ["commit 0"] and after == ["commit 0", "files 1"]
