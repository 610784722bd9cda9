"""Population tasks: the generation-0 centre, member adapters from seeds, the ES update (tell)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from artifacts.checkpoints import load_checkpoint, put_adapter_folder, put_checkpoint
from artifacts.store import ArtifactRef, ArtifactStore
from es_core.es import FITNESS, DrawnPopulation, ESState, PopulationPlan, es_update, stacked_population
from es_core.finite import check_finite_update
from es_core.lora import AdapterSpec, LoRATensors, find_targets_in_folder, init_center, spec_from_tensors
from tasks.common import CONTENT_CACHE, wait_for_decoding
from tasks.noise import population_of


@task(cache_policy=CONTENT_CACHE)
def init_population(artifacts_dir: str, base_model_path: str, base_model_sha256: str, layers: list[int], modules: list[str], rank: int, lora_alpha: float, init_std: float | None, seed: int) -> str:
    """Generation 0's centre (A seeded, B = 0: the base model) as a checkpoint artifact; returns its sha256."""
    targets = find_targets_in_folder(base_model_path, layers, modules)
    center = init_center(targets, rank, seed, init_std)
    spec = spec_from_tensors(center, lora_alpha)
    return put_checkpoint(ArtifactStore(Path(artifacts_dir)), ESState(center), spec).sha256


def write_member_adapters(store: ArtifactStore, center: LoRATensors, spec: AdapterSpec, population: DrawnPopulation) -> list[ArtifactRef]:
    """The members centre + sigma * sign * eps(seed) as adapter artifacts, in plan order."""
    members = stacked_population(center, population)
    return [put_adapter_folder(store, members.member(i), spec) for i in range(len(members))]


@task(cache_policy=CONTENT_CACHE, task_run_name="perturb-g{plan.generation}")
def perturb(artifacts_dir: str, center_sha256: str, plan: PopulationPlan, decoding=None, drawn: DrawnPopulation | None = None) -> list[tuple[str, str]]:
    """Materialise a generation's member adapters (centre + sigma * sign * eps(seed)); returns (sha256, path) each."""
    wait_for_decoding(decoding)
    store = ArtifactStore(Path(artifacts_dir))
    state, spec = load_checkpoint(store, center_sha256)
    return [(ref.sha256, str(ref.path)) for ref in write_member_adapters(store, state.center, spec, population_of(plan, state.center, drawn))]


@task(cache_policy=CONTENT_CACHE, task_run_name="aggregate-g{plan.generation}")
def aggregate(artifacts_dir: str, center_sha256: str, plan: PopulationPlan, rewards: list[float], sample_rewards: list[list[float]], fitness: str,
              learning_rate: float, shaping: str, optimizer: str, adam: tuple[float, float, float], drawn: DrawnPopulation | None = None) -> dict:
    """theta_{g+1} = theta_g + alpha * (1/N) * sum_i w_i eps_i, w shaped from the members' fitness
    (es_core.es.FITNESS[fitness] of their rewards on each prompt, `sample_rewards[member][prompt]`;
    the paper's, mean_reward, is the mean rewards `rewards` as recorded on the members); returns
    the new centre's sha256, the metrics and the fitness."""
    store = ArtifactStore(Path(artifacts_dir))
    state, spec = load_checkpoint(store, center_sha256)
    values = FITNESS[fitness](sample_rewards)
    new_state, metrics = es_update(state, plan.members, rewards, learning_rate, shaping, optimizer, plan.perturb, adam[:2], adam[2],
                                   population_of(plan, state.center, drawn).noise, None if fitness == "mean_reward" else values)
    check_finite_update(plan.generation, rewards, values, metrics, new_state)  # a NaN centre is never stored
    ref = put_checkpoint(store, new_state, spec)
    return {"center_sha256": ref.sha256, "center_path": str(ref.path), "fitness": values, **metrics}
