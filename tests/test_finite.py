"""A generation's update must be finite before its centre is stored (issue 26): an infinite step,
a NaN reward or a NaN moment stops the run naming the generation; nothing of it is committed."""

import re

import pytest
import torch

from artifacts.ledger import Ledger
from es_core.es import ESState, UpdateRule, ask, es_update
from es_core.finite import NonFiniteUpdateError, check_finite_update
from es_core.optimisers import optimiser_named
from es_core.search_space import LORA_SPACE
from tests.test_es import centre
from tests.test_pipeline import tiny_config


def checked(rewards, learning_rate, optimizer="sgd", generation=5):
    c = centre()
    drawn = LORA_SPACE.draw(ask(1, generation, 4, 0.05, antithetic=False), LORA_SPACE.noise_layout(c))
    new, metrics = es_update(ESState(c, generation), drawn, rewards, UpdateRule(optimiser_named(optimizer, learning_rate)), LORA_SPACE)
    check_finite_update(generation, rewards, rewards, metrics, new)
    return new


def test_a_finite_update_passes():
    assert all(torch.isfinite(t).all() for t in checked([0.0, 1.0, 0.5, 0.2], 0.1).centre.values())


@pytest.mark.parametrize("rewards, learning_rate, optimizer, problem", [
    ([0.0, 1.0, 0.5, 0.2], 1e39, "sgd", r"the update's norm is inf"),  # finite as a setting, infinite in float32
    ([0.0, float("nan"), 0.5, 0.2], 0.1, "sgd", r"member 1's reward is nan"),
    ([0.0, 1.0, float("inf"), 0.2], 0.1, "adam", r"member 2's reward is inf"),
])
def test_a_non_finite_update_names_the_generation(rewards, learning_rate, optimizer, problem):
    with pytest.raises(NonFiniteUpdateError) as err:
        checked(rewards, learning_rate, optimizer)
    message = str(err.value)
    assert re.match(rf"generation 5: {problem}", message) and "\n" not in message, message
    assert "the ledger ends at generation 4" in message


def test_a_nan_in_the_new_centre_is_named():
    c = centre()
    bad = ESState({k: v.clone() for k, v in c.items()}, 1)
    bad.centre[next(iter(c))][0, 0] = float("nan")
    with pytest.raises(NonFiniteUpdateError, match=r"^generation 0: the new centre has non-finite values in .*lora_A"):
        check_finite_update(0, [0.0, 1.0], [0.0, 1.0], {"grad_norm": 1.0, "update_norm": 1.0}, bad)


def test_a_run_whose_update_overflows_stops_at_that_generation_with_nothing_committed(tmp_path, prefect_harness, model_cache, monkeypatch):
    """es.learning_rate 1e39 is a finite setting; times a float32 gradient it is inf. The run ran
    to "completed" with a NaN centre before. The reward is replaced by one that spreads the
    members (tiny-llama's random text scores 0 for every member: a zero update)."""
    import es_core.evaluation
    from es_core.countdown.reward import RewardParts
    from flows.es_countdown import es_countdown

    monkeypatch.setattr(es_core.evaluation, "score_parts", lambda text, numbers, target, kind="paper": RewardParts(len(text) % 7 / 7, 0.0, 0.0, None))
    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    data = tmp_path / "data"
    with pytest.raises(NonFiniteUpdateError, match=r"^generation 0: the update's norm is inf"):
        es_countdown(config_path=str(tiny_config(tmp_path)), overrides=["es.learning_rate=1e39", "eval.base_model=false"], run_id="inf",
                     data_dir=str(data))
    ledger = Ledger(data)
    assert ledger.last_generation("inf") is None and ledger.run_row("inf")["status"] == "failed"
