"""Population tasks: the generation-0 centre, member adapters from seeds, the ES update."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from artifacts.checkpoints import load_checkpoint, put_adapter_folder, put_checkpoint
from artifacts.store import ArtifactStore
from es_core.es import ESState, Member, es_update, stacked_population
from es_core.lora import init_center, find_targets_in_folder, spec_from_tensors
from tasks.common import CONTENT_CACHE, wait_for_gate
from tasks.noise import NoisePool, population_args


@task(cache_policy=CONTENT_CACHE)
def init_population(artifacts_dir: str, base_model_path: str, base_model_sha256: str, layers: list[int], modules: list[str], rank: int, lora_alpha: float, init_std: float | None, seed: int) -> str:
    """Generation 0's centre (A seeded, B = 0: the base model) as a checkpoint artifact; returns its sha256."""
    targets = find_targets_in_folder(base_model_path, layers, modules)
    center = init_center(targets, rank, seed, init_std)
    spec = spec_from_tensors(center, lora_alpha)
    return put_checkpoint(ArtifactStore(Path(artifacts_dir)), ESState(center), spec).sha256


@task(cache_policy=CONTENT_CACHE)
def perturb(artifacts_dir: str, center_sha256: str, members: list[tuple[int, int, int]], sigma: float, perturb_factor: str, gate=None,
            noise: NoisePool | None = None) -> list[tuple[str, str]]:
    """Materialise a generation's member adapters (centre + sigma * sign * eps(seed)); returns (sha256, path) each."""
    wait_for_gate(gate)
    store = ArtifactStore(Path(artifacts_dir))
    state, spec = load_checkpoint(store, center_sha256)
    plan = [Member(*m) for m in members]
    population = stacked_population(state.center, plan, sigma, perturb_factor, *population_args(noise, state.center, plan, sigma, perturb_factor))
    shas = []
    for i in range(len(population)):
        ref = put_adapter_folder(store, population.member(i), spec)
        shas.append((ref.sha256, str(ref.path)))
    return shas


@task(cache_policy=CONTENT_CACHE)
def aggregate(artifacts_dir: str, center_sha256: str, members: list[tuple[int, int, int]], rewards: list[float], learning_rate: float, shaping: str,
              optimizer: str, perturb_factor: str, adam: tuple[float, float, float], noise: NoisePool | None = None,
              fitness: list[float] | None = None) -> dict:
    """theta_{g+1} = theta_g + alpha * (1/N) * sum_i w_i eps_i, w shaped from the members' mean
    rewards (or from `fitness`, see es_core.es.FITNESS); returns the new centre's sha256 and metrics."""
    store = ArtifactStore(Path(artifacts_dir))
    state, spec = load_checkpoint(store, center_sha256)
    plan = [Member(i, seed, sign) for i, seed, sign in members]
    drawn = noise.get(state.center, plan, perturb_factor) if noise is not None else None
    new_state, metrics = es_update(state, plan, rewards, learning_rate, shaping, optimizer, perturb_factor, adam[:2], adam[2], drawn, fitness)
    ref = put_checkpoint(store, new_state, spec)
    return {"center_sha256": ref.sha256, "center_path": str(ref.path), **metrics}
