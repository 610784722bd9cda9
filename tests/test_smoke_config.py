"""The quick start's run (configs/experiments/smoke.yaml) shows ES moving. A newcomer's first run
used to score 0 for every member of every generation (SmolLM2 never closes its <think> block in 32
tokens), so the rewards' spread and the update were 0 and the reward curve a flat line. With a
short warm start the members' rewards differ and the centre moves."""

from pathlib import Path

import pytest

from artifacts.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "experiments" / "smoke.yaml"

pytestmark = pytest.mark.slow


def test_the_smoke_run_spreads_rewards_and_moves_the_centre(tmp_path, prefect_harness, model_cache, monkeypatch):
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    data = tmp_path / "data"
    es_countdown(config_path=str(SMOKE), run_id="smoke", data_dir=str(data))
    ledger = Ledger(data)
    _, generations = ledger.query("SELECT generation, reward_std, update_norm FROM generations WHERE run_id = 'smoke' ORDER BY 1")
    assert len(generations) == 2
    # some generation, not every one: on another CPU a rounding difference may flip a greedy token
    moving = [g for g, reward_std, update_norm in generations if reward_std > 0 and update_norm > 0]
    assert moving, f"no generation with spread rewards and a nonzero update: {generations}"
    _, evals = ledger.query("SELECT model, reward_mean FROM evals WHERE run_id = 'smoke' AND generation = 0 AND split = 'heldout'")
    held_out = dict(evals)
    assert held_out["warm_start"] > held_out["base"], held_out  # what the warm start is there for
