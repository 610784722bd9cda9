"""The one path from a run's settings to a generation's plan and update rule, and the update itself:
what the run's `aggregate` task (tasks/population.py), `replay` and the rebuild of a thinned centre
(artifacts/rebuild.py) all take, so a centre rebuilt outside a run is the run's own bits."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from es_core.es import DrawnPopulation, ESState, PopulationPlan, UpdateRule, ask, es_update, group_fitness
from es_core.finite import check_finite_update
from es_core.lora import find_targets_in_folder
from es_core.optimisers import optimiser_named
from es_core.search_space import SearchSpace
from es_core.settings import ESSettings, Settings
from es_core.weights_space import WeightsSpace, weights_space_of


def generation_plan(es: ESSettings, generation: int, space: WeightsSpace | None = None) -> PopulationPlan:
    """Generation g's plan as the run's settings make it (es.ask), in the run's space (`run_space`)."""
    return ask(es.seed, generation, es.population, es.sigma, es.perturb, es.antithetic, space)


def run_space(settings: Settings, model_path: str | Path) -> WeightsSpace | None:
    """The space a run searches: None (the LoRA factors) or its WeightsSpace, from its settings and
    the model its ES perturbs (the sigma scales of es.sigma_scale weight_rms are that model's)."""
    es = settings.es
    if es.space == "lora":
        return None
    targets = find_targets_in_folder(model_path, settings.lora.layers, settings.lora.modules)
    return weights_space_of(es.noise_rank, es.centre_rank, es.sigma_scale, model_path, targets)


def update_rule(es: ESSettings) -> UpdateRule:
    """How the run's settings turn rewards into a step: fitness, shaping, optimiser."""
    optimiser = optimiser_named(es.optimizer, es.learning_rate, (es.adam_beta1, es.adam_beta2), es.adam_eps)
    return UpdateRule(optimiser, es.fitness, es.shaping, es.members_per_prompt)


def next_state(state: ESState, population: DrawnPopulation, space: SearchSpace, rewards: Sequence[float],
               sample_rewards: Sequence[Sequence[float]], rule: UpdateRule) -> tuple[ESState, dict, list[float]]:
    """theta_{g+1} from theta_g, the generation's drawn population and its members' rewards (mean,
    and on each of their problems): (new state, the update's metrics, the fitness). A non-finite
    update raises (es_core/finite.py): a NaN centre is never stored."""
    plan: PopulationPlan = population.plan
    values = group_fitness(rule.fitness, sample_rewards, rule.members_per_prompt)
    new_state, metrics = es_update(state, population, rewards, rule, space, None if rule.fitness == "mean_reward" else values)
    check_finite_update(plan.generation, rewards, values, metrics, new_state)
    return new_state, metrics, values
