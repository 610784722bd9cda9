"""A flow run retried, as the UI's Retry button or Prefect's restart of a crashed run does it,
continues the ES run of its first attempt, also when it was started without a run id."""

from __future__ import annotations

from pathlib import Path

from artifacts.ledger import Ledger
from tests.test_pipeline import tiny_config


def test_a_retried_flow_run_started_without_a_run_id_continues_its_es_run(tmp_path, prefect_harness, model_cache, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import AwaitingRetry

    from flows.es_countdown import es_countdown
    from flows.generation import ESRun

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config, data_dir = str(tiny_config(tmp_path, generations=3)), tmp_path / "data"
    update = ESRun.update

    def killed_in_generation_1(run, centre, inputs, *members_and_scores):
        if inputs.plan.generation == 1:
            raise RuntimeError("the machine went away in generation 1")
        return update(run, centre, inputs, *members_and_scores)

    monkeypatch.setattr(ESRun, "update", killed_in_generation_1)
    first = es_countdown(config_path=config, data_dir=str(data_dir), return_state=True)  # no run_id: the flow names the run
    assert first.is_failed()
    _, runs = Ledger(data_dir).query("SELECT run_id, status FROM runs")
    assert len(runs) == 1 and runs[0][1] == "failed" and Ledger(data_dir).last_generation(runs[0][0]) == 0

    # the UI's Retry: the same flow run set back to AwaitingRetry and run again by the worker
    monkeypatch.setattr(ESRun, "update", update)
    flow_run_id = first.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, AwaitingRetry(), force=True)
        flow_run = client.read_flow_run(flow_run_id)
    retried = run_flow(es_countdown, flow_run=flow_run, return_type="state")
    assert retried.is_completed(), retried

    _, after = Ledger(data_dir).query("SELECT run_id, status FROM runs")
    assert after == [(runs[0][0], "completed")]  # one ES run, continued and finished
    assert retried.result()["run_id"] == runs[0][0]
    _, generations = Ledger(data_dir).query("SELECT generation FROM generations WHERE run_id = ? ORDER BY generation", [runs[0][0]])
    assert [g for (g,) in generations] == [0, 1, 2]
    assert Path(retried.result()["report"]).is_file()
