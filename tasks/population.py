"""Population tasks: the generation-0 centre, the members' adapter files, the ES update (tell).
The one path from a run's settings to a generation's plan and update rule, which the run, its
replay and the rebuild of a thinned centre all take, is es_core/plan.py."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from artifacts.checkpoints import put_checkpoint
from artifacts.store import ArtifactStore
from es_core.es import ESState, PopulationPlan, UpdateRule
from es_core.lora import find_targets_in_folder, init_centre, spec_from_tensors
from es_core.plan import next_state
from es_core.settings import Settings
from es_core.weights_space import zero_centre
from tasks.common import CONTENT_CACHE, wait_for_decoding
from tasks.members import GenerationMembers


def search_description(settings: Settings, model_path: str | Path) -> str:
    """What a run's ES moves, in words for its log: the space, how many matrices in which layers,
    the ranks and the population (a config whose lora.layers was meant for LoRA space keeps them in
    weights space: this line shows it)."""
    es, lora = settings.es, settings.lora
    targets = find_targets_in_folder(model_path, lora.layers, lora.modules)
    layers = sorted({t.layer for t in targets})
    span = f"layers {layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else f"layers {layers}"
    if es.space == "lora":
        what = f"LoRA factors of rank {lora.rank} on {len(targets)} matrices ({span})"
    else:
        what = f"the weights of {len(targets)} matrices ({span}): members rank {es.noise_rank}, centre rank {es.centre_rank}"
    groups = (f" ({settings.data.prompts_per_generation} in all, {settings.member_groups} groups of {es.members_per_prompt} members)"
              if settings.member_groups > 1 else "")
    return f"{what}; {es.population} members x {settings.problems_per_member} problems{groups}, sigma {es.sigma:g} ({es.sigma_scale}), alpha {es.learning_rate:g}"


@task(cache_policy=CONTENT_CACHE)
def init_population(artifacts_dir: str, base_model_path: str, base_model_sha256: str, layers: list[int] | str, modules: list[str], rank: int,
                    lora_alpha: float, init_std: float | None, seed: int, space: str = "lora") -> str:
    """Generation 0's centre as a checkpoint artifact; returns its sha256. LoRA space: A seeded,
    B = 0 (the base model). Weights space: no change yet, A = B = 0 at the centre's rank (`rank`)."""
    targets = find_targets_in_folder(base_model_path, layers, modules)
    centre = zero_centre(targets, rank) if space == "weights" else init_centre(targets, rank, seed, init_std)
    return put_checkpoint(ArtifactStore(Path(artifacts_dir)), ESState(centre), spec_from_tensors(centre, lora_alpha)).sha256


@task(cache_policy=CONTENT_CACHE, task_run_name="members-g{plan.generation}")
def write_members(artifacts_dir: str, center_sha256: str, plan: PopulationPlan, decoding=None, members: GenerationMembers | None = None) -> list[tuple[str, str]]:
    """A generation's members as the ledger names them: LoRA space, adapters (centre + sigma * sign * eps(seed));
    weights space, records (weights_space.MemberRecord). Returns (sha256, path) each."""
    wait_for_decoding(decoding)
    members = members.check(center_sha256, plan) if members is not None else GenerationMembers(artifacts_dir, center_sha256, plan)
    return [(ref.sha256, str(ref.path)) for ref in members.adapter_files()]


@task(cache_policy=CONTENT_CACHE, task_run_name="aggregate-g{plan.generation}")
def aggregate(artifacts_dir: str, center_sha256: str, plan: PopulationPlan, rewards: list[float], sample_rewards: list[list[float]], rule: UpdateRule,
              members: GenerationMembers | None = None) -> dict:
    """theta_{g+1} = theta_g + alpha * (1/N) * sum_i w_i eps_i, w shaped from the members' fitness
    (es_core.es.FITNESS[rule.fitness] of their rewards on each prompt, `sample_rewards[member][prompt]`
    over the member's own problems, per group of members that decoded the same ones;
    the paper's, mean_reward, is the mean rewards `rewards` as recorded on the members); returns
    the new centre's sha256, the metrics and the fitness."""
    members = members.check(center_sha256, plan) if members is not None else GenerationMembers(artifacts_dir, center_sha256, plan)
    new_state, metrics, values = next_state(members.state, members.population, members.space, rewards, sample_rewards, rule)  # a NaN centre is never stored
    ref = put_checkpoint(members.store, new_state, members.spec)
    return {"center_sha256": ref.sha256, "center_path": str(ref.path), "fitness": values, **metrics}
