"""Where ES searches: what a centre's noise moves, how members are built from the centre and their
noise, and how weighted noise moves the centre. The generation goes through this one interface;
`LoRASpace` (members are centre + sigma * sign * eps over the LoRA factors themselves, as the paper
perturbs its parameters) and `es_core.weights_space.WeightsSpace` (members are low-rank perturbations
of the weights, the centre a rank-R adapter) implement it; a plan names its space (`plan.space`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import torch

from es_core.es import DrawnPopulation, ESState, Member, NoiseLayout, PopulationNoise, PopulationPlan, draw_population
from es_core.lora import AdapterSpec, LoRATensors, StackedLoRA, adapter_files
from es_core.optimisers import Optimiser, flat, split


class SearchSpace(Protocol):
    def noise_layout(self, centre: LoRATensors, perturb: str) -> NoiseLayout:
        """(key, numel) of what the noise of a member of this centre is drawn over, in stream order."""
        ...

    def draw(self, plan: PopulationPlan, layout: NoiseLayout) -> DrawnPopulation:
        """The plan's noise over `layout`: depends on the plan alone, so it can be drawn ahead."""
        ...

    def members(self, centre: LoRATensors, population: DrawnPopulation) -> StackedLoRA:
        """Every member's LoRA tensors, stacked per key ([members, *shape]), as a backend decodes them
        (beside `shared(centre)` where that is not None)."""
        ...

    def shared(self, centre: LoRATensors) -> LoRATensors | None:
        """What every member shares and a backend may apply once for all rows; None if nothing is."""
        ...

    def record(self, centre: LoRATensors, centre_spec: AdapterSpec, centre_sha256: str, plan: PopulationPlan, index: int,
               members: Callable[[], StackedLoRA]) -> dict[str, bytes]:
        """Member `index` as the ledger keeps it: its artifact's files ({name: bytes}). `members()`
        gives the plan's members stacked (built on first call; a record that needs no tensors skips it)."""
        ...

    records_are_served: bool  # a member's record is the adapter a backend loads (else `adapter` builds that)

    def adapter(self, centre: LoRATensors, centre_spec: AdapterSpec, members: StackedLoRA, index: int) -> tuple[LoRATensors, AdapterSpec]:
        """Member `index` as one adapter a backend loads whole (SGLang's file)."""
        ...

    def tell(self, state: ESState, population: DrawnPopulation, weights: torch.Tensor, optimiser: Optimiser) -> tuple[ESState, dict]:
        """The next state: the centre moved by the optimiser along (1/N) * sum_i w_i * sign_i * eps_i;
        metrics grad_norm and update_norm."""
        ...


def _moves(key: str, perturb: str) -> bool:
    return perturb == "both" or key.endswith(f"lora_{perturb}.weight")


def _gradient(members: Sequence[Member], weights: torch.Tensor, noise: PopulationNoise) -> torch.Tensor:
    """(1/N) * sum_i w_i * sign_i * eps_i over the flat layout, as one [seeds] x [seeds, parameters]
    product. Antithetic partners share a seed, so each seed's noise enters once with its summed weight."""
    coefficient: dict[int, float] = {}
    for member, weight in zip(members, weights.tolist()):
        coefficient[member.seed] = coefficient.get(member.seed, 0.0) + member.sign * weight
    n = len(members)
    seeds = [seed for seed, c in coefficient.items() if c != 0.0]
    total = noise.total
    if not seeds or not total:
        return torch.zeros(total, dtype=torch.float32)
    scale = torch.tensor([coefficient[seed] / n for seed in seeds], dtype=torch.float32)
    return scale @ noise.rows(seeds)


@dataclass(frozen=True)
class LoRASpace:
    """ES over the LoRA factors: member i is centre + sigma * sign_i * eps(seed_i) on the factors
    `perturb` names (A, B or both), the others shared with the centre."""

    def noise_layout(self, centre: LoRATensors, perturb: str = "both") -> NoiseLayout:
        return tuple((k, centre[k].numel()) for k in sorted(centre) if _moves(k, perturb))

    def draw(self, plan: PopulationPlan, layout: NoiseLayout) -> DrawnPopulation:
        return draw_population(plan, layout)

    def members(self, centre: LoRATensors, population: DrawnPopulation) -> StackedLoRA:
        # centre + offsets on one [members, parameters] matrix: a few ops per key, not per member and key
        keys = self._checked(centre, population)
        size = len(population.plan.members)
        moved = split(flat(centre, keys).unsqueeze(0) + population.offsets, centre, keys)
        stacked = {key: moved[key] if key in moved else value.unsqueeze(0).expand(size, *value.shape) for key, value in centre.items()}
        return StackedLoRA(stacked, size)

    def shared(self, centre: LoRATensors) -> None:
        return None  # every factor is perturbed: the members share nothing a backend could apply once

    records_are_served = True  # a member's file is the whole member

    def record(self, centre, centre_spec, centre_sha256, plan, index, members):
        return adapter_files(members().member(index), centre_spec)

    def adapter(self, centre: LoRATensors, centre_spec: AdapterSpec, members: StackedLoRA, index: int) -> tuple[LoRATensors, AdapterSpec]:
        return members.member(index), centre_spec

    def tell(self, state: ESState, population: DrawnPopulation, weights: torch.Tensor, optimiser: Optimiser) -> tuple[ESState, dict]:
        keys = self._checked(state.centre, population)
        gradient = _gradient(population.plan.members, weights, population.noise)
        moved, step = optimiser.step(state, gradient, keys)
        metrics = {"grad_norm": float(gradient.double().norm()), "update_norm": float(step.double().norm())}
        return replace(moved, generation=state.generation + 1), metrics

    def _checked(self, centre: LoRATensors, population: DrawnPopulation) -> list[str]:
        if population.noise.layout != self.noise_layout(centre, population.plan.perturb):
            raise ValueError("the population was drawn for another LoRA layout than this centre's")
        return population.noise.keys


LORA_SPACE = LoRASpace()


def search_space(plan: PopulationPlan) -> SearchSpace:
    """The space a plan's members live in: the LoRA factors, or the weights (the plan's WeightsSpace)."""
    return LORA_SPACE if plan.space is None else plan.space
