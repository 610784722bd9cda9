"""ES over LoRA tensors, as in Qiu et al. 2025 ("Evolution Strategies at Scale", arXiv 2509.24372).

One generation: members are theta + sigma * eps_i with eps_i ~ N(0, I); rewards r_i are shaped
into weights w_i (z-scores in the paper); the centre moves by
    theta <- theta + alpha * (1/N) * sum_i w_i * eps_i
(sigma is not divided out, as in the paper's code). No file, Prefect, CUDA or logging here: the
`ESState` returned is the checkpoint.

The loop reads as evosax's ask / tell: `ask` plans a generation (seeds, signs, sigma),
`draw_population` draws its noise, the search space (es_core/search_space.py) builds the members
from the centre and the drawn population, and `es_update` (tell) shapes the rewards into weights
and hands them to the space, which moves the centre with an optimiser (es_core/optimisers.py).

Where we depart from the paper's code: noise is regenerated from an integer seed per member as
one Philox stream cut into the tensors (the paper reseeded every tensor with the same seed, which
correlates the noise of tensors of the same shape; its torch CPU randn also differs between CPUs:
es_core/seeding.py); members can come in antithetic pairs
(+eps, -eps); theta is LoRA A and B, not full weights; Adam on the same gradient estimate is an
option. Never an "advantage-weighted average of members":
the z-scores sum to zero, so such an average divides by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from es_core.lora import LoRATensors
from es_core.seeding import hash_int, standard_normal_f32

if TYPE_CHECKING:
    from es_core.optimisers import Optimiser
    from es_core.search_space import SearchSpace
    from es_core.weights_space import WeightsSpace

# --- members and their noise ------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """Member `index` of a generation is centre + sigma * sign * noise(seed)."""

    index: int
    seed: int
    sign: int  # +1 or -1 (antithetic partner)


def noise_seed(run_seed: int, generation: int, pair: int) -> int:
    """The integer a member's noise is regenerated from; stored in the ledger, never the noise."""
    return hash_int(f"es-noise:{int(run_seed)}:{int(generation)}:{int(pair)}")


def member_plan(run_seed: int, generation: int, population: int, antithetic: bool = True) -> list[Member]:
    if antithetic:
        if population % 2:
            raise ValueError(f"antithetic sampling needs an even population (got {population})")
        return [Member(i, noise_seed(run_seed, generation, i // 2), 1 if i % 2 == 0 else -1) for i in range(population)]
    return [Member(i, noise_seed(run_seed, generation, i), 1) for i in range(population)]


NoiseLayout = tuple[tuple[str, int], ...]  # (tensor key, numel) in the order a seed's noise stream is cut


def _draw_noise(seed: int, total: int, out: torch.Tensor) -> torch.Tensor:
    """`total` N(0, 1) float32 values of a member's seed (seeding.NOISE_SCHEME), into `out`."""
    standard_normal_f32(f"es-member-noise:{int(seed)}", total, out=out.numpy())
    return out


@dataclass(frozen=True)
class PopulationNoise:
    """The noise of a generation's distinct seeds, row i = noise(seeds[i]) over `layout`'s tensors
    (the keys the noise moves and their sizes): drawn once, reused by the members' build, the
    adapter files and the update, and drawable ahead of time since it depends on seeds only."""

    seeds: tuple[int, ...]
    layout: NoiseLayout
    eps: torch.Tensor  # [len(seeds), total] float32

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.layout]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.layout)

    def rows(self, seeds: Sequence[int]) -> torch.Tensor:
        """eps of these seeds, in this order (the matrix itself when they are `self.seeds`)."""
        if tuple(seeds) == self.seeds:
            return self.eps
        return self.eps.index_select(0, torch.tensor([self.seeds.index(s) for s in seeds], dtype=torch.long))

    def signed(self, members: Sequence[Member], sigma: float) -> torch.Tensor:
        """[members, total]: sigma * sign_i * eps_i, the members' offsets from the centre."""
        row = torch.tensor([self.seeds.index(m.seed) for m in members], dtype=torch.long)
        coef = torch.tensor([sigma * m.sign for m in members], dtype=torch.float32)
        return coef.unsqueeze(1) * self.eps.index_select(0, row)


def draw_population_noise(layout: NoiseLayout, members: Sequence[Member]) -> PopulationNoise:
    """One Philox stream per distinct seed (seeding.py), drawn straight into its row and cut into
    the layout's tensors in order: bit-identical on every machine."""
    seeds = tuple(dict.fromkeys(m.seed for m in members))
    eps = torch.empty(len(seeds), sum(n for _, n in layout), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        _draw_noise(seed, eps.shape[1], eps[i])
    return PopulationNoise(seeds, tuple(layout), eps)


# --- ask: a generation's members ---------------------------------------------------------------


@dataclass(frozen=True)
class PopulationPlan:
    """What `ask` returns for generation g: its members (seeds and signs), the scale of their noise
    and which LoRA factors it moves. Plain values, so it keys the cache of every task it enters;
    the one way sigma reaches the members."""

    generation: int
    members: tuple[Member, ...]
    sigma: float
    perturb: str = "both"  # "both", "A" or "B": the LoRA factors the noise moves
    space: "WeightsSpace | None" = None  # where the members live: None, the LoRA factors; else the weights (weights_space.py)


def ask(run_seed: int, generation: int, population: int, sigma: float, perturb: str = "both", antithetic: bool = True,
        space: "WeightsSpace | None" = None) -> PopulationPlan:
    """Generation g's members: seeds from (run seed, g, pair), +eps and -eps pairs when antithetic."""
    return PopulationPlan(int(generation), tuple(member_plan(run_seed, generation, population, antithetic)), float(sigma), perturb, space)


@dataclass(frozen=True)
class DrawnPopulation:
    """A plan's noise drawn over a layout, and the members' offsets from any centre of that layout:
    row i is sigma * sign_i * eps(seed_i). Depends on the plan alone, never on a centre or rewards,
    so it can be drawn ahead of time; the member build, the adapter files and the update share it."""

    plan: PopulationPlan
    noise: PopulationNoise
    offsets: torch.Tensor | None = None  # [members, total] float32 (LoRA space; weights space builds factors instead)


def draw_population(plan: PopulationPlan, layout: NoiseLayout) -> DrawnPopulation:
    """The plan's noise over `layout` (the search space's `noise_layout` of the run's centre)."""
    noise = draw_population_noise(layout, plan.members)
    return DrawnPopulation(plan, noise, noise.signed(plan.members, plan.sigma))


# --- which problems each member decodes ----------------------------------------------------------


def problem_groups(population: int, problems: int, members_per_prompt: int = 0) -> list[range] | None:
    """The problems (indices into the generation's batch) each member decodes: None when every member
    decodes every problem (members_per_prompt 0, the paper); else EGGROLL's groups, members
    [k G, (k + 1) G) on problems [k P/n, (k + 1) P/n) for n = N / G groups (antithetic partners,
    consecutive, share theirs)."""
    if not members_per_prompt or members_per_prompt >= population:
        return None
    if population % members_per_prompt:
        raise ValueError(f"{members_per_prompt} members a problem do not divide a population of {population}")
    groups = population // members_per_prompt
    if problems % groups:
        raise ValueError(f"{problems} problems do not split evenly over {groups} groups of members")
    per = problems // groups
    return [range((i // members_per_prompt) * per, (i // members_per_prompt + 1) * per) for i in range(population)]


# --- fitness shaping: rewards -> weights, one signature -----------------------------------------


def _finite(rewards: Sequence[float]) -> torch.Tensor:
    """NaN (a failed evaluation) ranks last: it takes the worst finite reward."""
    r = torch.tensor([float(x) for x in rewards], dtype=torch.float64)
    bad = ~torch.isfinite(r)
    if bad.all():
        return torch.zeros_like(r)
    r[bad] = r[~bad].min()
    return r


def zscore(rewards: Sequence[float]) -> torch.Tensor:
    """The paper's shaping: (r - mean) / (std + 1e-8), population std. All-equal rewards give 0."""
    r = _finite(rewards)
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-8)


def centered_rank(rewards: Sequence[float]) -> torch.Tensor:
    """Ranks mapped to [-0.5, 0.5] (ties share their mean rank), as evosax/OpenAI-ES."""
    r = _finite(rewards)
    n = len(r)
    if n < 2:
        return torch.zeros_like(r)
    order = torch.argsort(r, stable=True)
    ranks = torch.empty_like(r)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    for value in torch.unique(r):  # average ties so equal rewards get equal weight
        tied = r == value
        ranks[tied] = ranks[tied].mean()
    return ranks / (n - 1) - 0.5


SHAPING: dict[str, Callable[[Sequence[float]], torch.Tensor]] = {"zscore": zscore, "centered_rank": centered_rank}


# --- fitness: each member's rewards on the prompts -> one number, before shaping ------------------


def mean_reward(rewards: Sequence[Sequence[float]]) -> list[float]:
    """The paper's fitness: a member's mean reward over the prompts. rewards[member][prompt]."""
    return [sum(row) / max(len(row), 1) for row in rewards]


def prompt_normalized(rewards: Sequence[Sequence[float]]) -> list[float]:
    """Each prompt's rewards z-scored across the members (zero where every member scored the same),
    then averaged over the prompts, as EGGROLL normalises within each prompt's group: a hard prompt
    that no member solves, or an easy one that every member solves, adds nothing, and what is left
    is how a member differs from the others on the same prompt. rewards[member][prompt]."""
    r = _finite_matrix(rewards)  # [members, prompts]
    if r.numel() == 0:
        return [0.0] * len(rewards)
    std = r.std(0, unbiased=False)
    z = torch.where(std > 0, (r - r.mean(0)) / (std + 1e-8), torch.zeros_like(r))
    return z.mean(1).tolist()


def _finite_matrix(rewards: Sequence[Sequence[float]]) -> torch.Tensor:
    """rewards as [members, prompts] float64; NaN (a failed sample) takes its prompt's worst reward."""
    r = torch.tensor([[float(x) for x in row] for row in rewards], dtype=torch.float64)
    if r.ndim != 2:
        raise ValueError("rewards must be [members][prompts], every member scored on the same prompts")
    return torch.stack([_finite(col) for col in r.T], 1) if r.numel() else r


FITNESS: dict[str, Callable[[Sequence[Sequence[float]]], list[float]]] = {"mean_reward": mean_reward, "prompt_normalized": prompt_normalized}


def group_fitness(fitness: str, rewards: Sequence[Sequence[float]], members_per_prompt: int = 0) -> list[float]:
    """FITNESS[fitness] of each group of members on its own problems (rewards[member] over the
    member's problems, problem_groups' order), so prompt_normalized z-scores a problem among the
    members that decoded it; one group of all members when members_per_prompt is 0."""
    size = members_per_prompt or len(rewards)
    out: list[float] = []
    for start in range(0, len(rewards), max(size, 1)):
        out += FITNESS[fitness](rewards[start:start + size])
    return out


# --- tell: the update ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ESState:
    """What survives a resume: the centre theta_g and the optimiser's moments (Adam's; none for SGD)."""

    centre: LoRATensors
    generation: int = 0
    adam_m: LoRATensors | None = None
    adam_v: LoRATensors | None = None
    adam_step: int = 0


@dataclass(frozen=True)
class UpdateRule:
    """How the members' rewards move the centre: which fitness (FITNESS), shaped how (SHAPING), by
    which optimiser (es_core/optimisers.py). Plain values: part of the update task's cache key."""

    optimiser: "Optimiser"
    fitness: str = "mean_reward"
    shaping: str = "zscore"
    members_per_prompt: int = 0  # members decoding the same problems (es.members_per_prompt; 0: all of them)


def es_update(state: ESState, population: DrawnPopulation, rewards: Sequence[float], rule: UpdateRule, space: "SearchSpace",
              fitness: Sequence[float] | None = None) -> tuple[ESState, dict]:
    """tell: theta_{g+1} from theta_g, the generation's drawn population and its members' mean
    rewards (`fitness`: what is shaped into weights when it is not the mean reward, see FITNESS),
    in `space`. Pure: returns a new state and the metrics."""
    members = population.plan.members
    if len(members) != len(rewards):
        raise ValueError(f"{len(members)} members but {len(rewards)} rewards")
    if fitness is not None and len(fitness) != len(members):
        raise ValueError(f"{len(members)} members but {len(fitness)} fitness values")
    weights = SHAPING[rule.shaping](rewards if fitness is None else fitness)
    new_state, step_metrics = space.tell(state, population, weights, rule.optimiser)
    return new_state, {**reward_metrics(rewards), **step_metrics, "weights": [float(w) for w in weights]}


def reward_metrics(rewards: Sequence[float]) -> dict:
    """Mean, spread and range of the members' rewards (failed members, NaN, left out and counted)."""
    finite = [float(r) for r in rewards if math.isfinite(float(r))]
    return {
        "reward_mean": sum(finite) / len(finite) if finite else float("nan"),
        "reward_std": float(torch.tensor(finite, dtype=torch.float64).std(unbiased=False)) if finite else float("nan"),
        "reward_max": max(finite) if finite else float("nan"),
        "reward_min": min(finite) if finite else float("nan"),
        "failed_members": len(rewards) - len(finite),
    }


def optimizer_tensors(state: ESState) -> LoRATensors:
    """The Adam moments as flat tensors (for an artifact); empty for plain ES."""
    out: LoRATensors = {}
    for prefix, moments in (("adam_m.", state.adam_m), ("adam_v.", state.adam_v)):
        for k, v in (moments or {}).items():
            out[prefix + k] = v
    if state.adam_m is not None:
        out["adam_step"] = torch.tensor([state.adam_step], dtype=torch.int64)
    return out


def state_from_tensors(centre: LoRATensors, generation: int, optimizer: LoRATensors | None = None) -> ESState:
    if not optimizer:
        return ESState(centre=dict(centre), generation=generation)
    m = {k[len("adam_m.") :]: v for k, v in optimizer.items() if k.startswith("adam_m.")}
    v = {k[len("adam_v.") :]: t for k, t in optimizer.items() if k.startswith("adam_v.")}
    return ESState(dict(centre), generation, m, v, int(optimizer["adam_step"].item()))
