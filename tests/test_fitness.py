"""Fitness: a member's rewards on the prompts -> one number, before shaping (es.fitness)."""

import math

import pytest
import torch

from es_core.es import FITNESS, ESState, Member, PopulationPlan, UpdateRule, draw_population, es_update, mean_reward, prompt_normalized, zscore
from es_core.optimisers import SGD
from es_core.search_space import LORA_SPACE


def test_mean_reward_is_the_papers_fitness():
    assert mean_reward([[1.1, 0.1], [0.1, 0.1]]) == pytest.approx([0.6, 0.1])


def test_prompt_normalized_drops_prompts_every_member_scored_alike():
    # prompt 0: nobody solves it; prompt 2: everybody does; only prompt 1 tells the members apart
    rewards = [[0.1, 1.1, 1.1], [0.1, 0.1, 1.1], [0.1, 0.1, 1.1], [0.1, 1.1, 1.1]]
    fitness = prompt_normalized(rewards)
    assert fitness[0] == pytest.approx(fitness[3]) and fitness[1] == pytest.approx(fitness[2])
    assert fitness[0] > 0 > fitness[1]
    assert fitness == pytest.approx([1 / 3, -1 / 3, -1 / 3, 1 / 3], abs=1e-6)  # z = +-1 on one prompt of three


def test_prompt_normalized_ignores_prompt_difficulty_that_mean_reward_rewards():
    # member 0 solves a prompt half the members solve; member 1 one that only it solves. By mean
    # reward they tie; per prompt, member 1's success is the rarer, so it weighs more.
    rewards = [[1.1, 0.1, 0.1], [0.1, 1.1, 0.1], [1.1, 0.1, 0.1], [0.1, 0.1, 0.1]]
    assert mean_reward(rewards)[0] == pytest.approx(mean_reward(rewards)[1])
    fitness = prompt_normalized(rewards)
    assert fitness[1] > fitness[0]
    # a constant added to one prompt's rewards (its difficulty) changes nothing
    shifted = [[r[0] + 0.5, r[1], r[2]] for r in rewards]
    assert prompt_normalized(shifted) == pytest.approx(fitness)


def test_prompt_normalized_all_equal_and_failed_samples():
    assert prompt_normalized([[0.1, 0.1], [0.1, 0.1]]) == [0.0, 0.0]
    fitness = prompt_normalized([[1.1, float("nan")], [0.1, 0.1]])
    assert all(math.isfinite(f) for f in fitness) and fitness[0] > fitness[1]
    with pytest.raises(ValueError):
        prompt_normalized([[0.1, 0.2], [0.1]])


def test_update_shapes_the_fitness_given_and_reports_the_rewards():
    centre = {"a.lora_A.weight": torch.zeros(4, 3), "a.lora_B.weight": torch.zeros(2, 4)}
    members = [Member(0, 11, 1), Member(1, 11, -1), Member(2, 12, 1), Member(3, 12, -1)]
    rewards = [0.6, 0.1, 0.1, 0.6]
    fitness = [-1.0, 1.0, 0.5, -0.5]
    population = draw_population(PopulationPlan(0, tuple(members), 0.05), LORA_SPACE.noise_layout(centre))
    by_fitness, metrics = es_update(ESState(centre), population, rewards, UpdateRule(SGD(0.1)), LORA_SPACE, fitness=fitness)
    by_rewards, _ = es_update(ESState(centre), population, rewards, UpdateRule(SGD(0.1)), LORA_SPACE)
    assert metrics["weights"] == pytest.approx(zscore(fitness).tolist())
    assert metrics["reward_mean"] == pytest.approx(0.35)  # the ledger's reward columns stay rewards
    assert not torch.equal(by_fitness.centre["a.lora_A.weight"], by_rewards.centre["a.lora_A.weight"])
    with pytest.raises(ValueError):
        es_update(ESState(centre), population, rewards, UpdateRule(SGD(0.1)), LORA_SPACE, fitness=[1.0])


def test_every_fitness_is_named_in_settings():
    from es_core.settings import ESSettings

    assert set(FITNESS) == set(ESSettings.model_fields["fitness"].annotation.__args__)
