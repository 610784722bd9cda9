"""ES over LoRA tensors, as in Qiu et al. 2025 ("Evolution Strategies at Scale", arXiv 2509.24372).

One generation: members are theta + sigma * eps_i with eps_i ~ N(0, I); rewards r_i are shaped
into weights w_i (z-scores in the paper); the centre moves by
    theta <- theta + alpha * (1/N) * sum_i w_i * eps_i
(sigma is not divided out, as in the paper's code). No file, Prefect, CUDA or logging here: the
`ESState` returned is the checkpoint.

Where we depart from the paper's code: noise is regenerated from an integer seed per member as
one Philox stream cut into the tensors (the paper reseeded every tensor with the same seed, which
correlates the noise of tensors of the same shape; its torch CPU randn also differs between CPUs:
es_core/seeding.py); members can come in antithetic pairs
(+eps, -eps); theta is LoRA A and B, not full weights; Adam on the same gradient estimate is an
option. Never an "advantage-weighted average of members":
the z-scores sum to zero, so such an average divides by zero.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch

from es_core.lora import LoRATensors, StackedLoRA
from es_core.seeding import hash_int, standard_normal_f32

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


def _moves(key: str, perturb: str) -> bool:
    return perturb == "both" or key.endswith(f"lora_{perturb}.weight")


def _draw_noise(seed: int, total: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """`total` N(0, 1) float32 values of a member's seed (seeding.NOISE_SCHEME), into `out` if given."""
    out = torch.empty(total, dtype=torch.float32) if out is None else out
    standard_normal_f32(f"es-member-noise:{int(seed)}", total, out=out.numpy())
    return out


def _noise_matrix(seeds: Sequence[int], total: int) -> torch.Tensor:
    """[len(seeds), total]: row i is seed i's noise, drawn straight into place."""
    eps = torch.empty(len(seeds), total, dtype=torch.float32)
    for i, seed in enumerate(seeds):
        _draw_noise(seed, total, out=eps[i])
    return eps


def _split(flat: torch.Tensor, center: LoRATensors, keys: list[str]) -> dict[str, torch.Tensor]:
    """Views of flat[..., total] as the tensors of `keys` (a leading member axis is kept)."""
    out, offset = {}, 0
    lead = flat.shape[:-1]
    for key in keys:
        n = center[key].numel()
        out[key] = flat[..., offset:offset + n].view(*lead, *center[key].shape)
        offset += n
    return out


def member_noise(center: LoRATensors, seed: int, perturb: str = "both") -> dict[str, torch.Tensor]:
    """eps of one member for every tensor the noise moves: one Philox stream per seed (seeding.py),
    cut into the tensors in sorted key order; bit-identical on every machine."""
    layout = noise_layout(center, perturb)
    return _split(_draw_noise(seed, sum(n for _, n in layout)), center, [k for k, _ in layout])


def iter_noise(center: LoRATensors, seed: int, perturb: str = "both") -> Iterator[tuple[str, torch.Tensor]]:
    """(key, eps) for each tensor the noise moves."""
    yield from member_noise(center, seed, perturb).items()


def perturb_center(center: LoRATensors, member: Member, sigma: float, perturb: str = "both") -> LoRATensors:
    """The member's LoRA tensors: theta + sigma * sign * eps."""
    out = dict(center)
    for key, eps in iter_noise(center, member.seed, perturb):
        out[key] = center[key] + (sigma * member.sign) * eps
    return out


@dataclass(frozen=True)
class PopulationNoise:
    """The noise of a generation's distinct seeds, row i = noise(seeds[i]) over `layout`'s tensors
    (the keys the noise moves and their sizes): drawn once, reused by the members' build, the
    adapter files and the update, and drawable ahead of time since it depends on seeds only."""

    seeds: tuple[int, ...]
    layout: tuple[tuple[str, int], ...]
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


def noise_layout(center: LoRATensors, perturb: str = "both") -> tuple[tuple[str, int], ...]:
    """(key, numel) of every tensor the noise moves, in the order the noise stream is cut."""
    return tuple((k, center[k].numel()) for k in sorted(center) if _moves(k, perturb))


def draw_population_noise(layout: tuple[tuple[str, int], ...], members: Sequence[Member]) -> PopulationNoise:
    seeds = tuple(dict.fromkeys(m.seed for m in members))
    return PopulationNoise(seeds, tuple(layout), _noise_matrix(seeds, sum(n for _, n in layout)))


def _checked_noise(noise: PopulationNoise | None, center: LoRATensors, members: Sequence[Member], perturb: str) -> PopulationNoise:
    layout = noise_layout(center, perturb)
    if noise is None:
        return draw_population_noise(layout, members)
    if noise.layout != layout or not {m.seed for m in members} <= set(noise.seeds):
        raise ValueError("the noise given was drawn for other seeds or another LoRA layout")
    return noise


def _flat(center: LoRATensors, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([center[k].reshape(-1) for k in keys]) if keys else torch.empty(0)


# --- ask: a generation's members ---------------------------------------------------------------


@dataclass(frozen=True)
class PopulationPlan:
    """What `ask` returns for generation g: its members (seeds and signs), the scale of their noise
    and which LoRA factors it moves. Plain values, so it keys the cache of every task it enters;
    the one way sigma reaches the members."""

    generation: int
    members: tuple[Member, ...]
    sigma: float
    perturb: str = "both"


def ask(run_seed: int, generation: int, population: int, sigma: float, perturb: str = "both", antithetic: bool = True) -> PopulationPlan:
    """Generation g's members: seeds from (run seed, g, pair), +eps and -eps pairs when antithetic."""
    return PopulationPlan(int(generation), tuple(member_plan(run_seed, generation, population, antithetic)), float(sigma), perturb)


@dataclass(frozen=True)
class DrawnPopulation:
    """A plan's noise drawn over a layout, and the members' offsets from any centre of that layout:
    row i is sigma * sign_i * eps(seed_i). Depends on the plan alone, never on a centre or rewards,
    so it can be drawn ahead of time; the member build, the adapter files and the update share it."""

    plan: PopulationPlan
    noise: PopulationNoise
    offsets: torch.Tensor  # [members, total] float32


def draw_population(plan: PopulationPlan, layout: tuple[tuple[str, int], ...]) -> DrawnPopulation:
    """The plan's noise over `layout` (`noise_layout` of the run's centre and plan.perturb)."""
    noise = draw_population_noise(layout, plan.members)
    return DrawnPopulation(plan, noise, noise.signed(plan.members, plan.sigma))


def stacked_population(center: LoRATensors, population: DrawnPopulation) -> StackedLoRA:
    """perturb_center for every member, stacked per key: bit-identical values (the same float32
    ops, on one [members, parameters] matrix), a few ops per key."""
    noise = population.noise
    if noise.layout != noise_layout(center, population.plan.perturb):
        raise ValueError("the population was drawn for another LoRA layout than this centre's")
    keys = noise.keys
    members = len(population.plan.members)
    moved = _split(_flat(center, keys).unsqueeze(0) + population.offsets, center, keys)
    stacked = {key: moved[key] if key in moved else value.unsqueeze(0).expand(members, *value.shape) for key, value in center.items()}
    return StackedLoRA(stacked, members)


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


# --- the update ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ESState:
    """What survives a resume: the centre theta_g and the optimizer's moments."""

    center: LoRATensors
    generation: int = 0
    adam_m: LoRATensors | None = None
    adam_v: LoRATensors | None = None
    adam_step: int = 0


def _gradient_flat(members: Sequence[Member], weights: torch.Tensor, noise: PopulationNoise) -> torch.Tensor:
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


def estimate_gradient(center: LoRATensors, members: Sequence[Member], weights: torch.Tensor, perturb: str = "both",
                      noise: PopulationNoise | None = None) -> LoRATensors:
    """(1/N) * sum_i w_i * sign_i * eps_i per tensor (zero for the tensors the noise does not move)."""
    noise = _checked_noise(noise, center, members, perturb)
    return _per_tensor(_gradient_flat(members, weights, noise), center, noise.keys)


def _per_tensor(grad_flat: torch.Tensor, center: LoRATensors, keys: list[str]) -> LoRATensors:
    """The flat gradient as one tensor per key of the centre (zero where the noise does not move)."""
    grad = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in center.items()}
    grad.update(_split(grad_flat, center, keys))
    return grad


def es_update(
    state: ESState,
    members: Sequence[Member],
    rewards: Sequence[float],
    learning_rate: float,
    shaping: str = "zscore",
    optimizer: str = "sgd",
    perturb: str = "both",
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    noise: PopulationNoise | None = None,
    fitness: Sequence[float] | None = None,
) -> tuple[ESState, dict]:
    """theta_{g+1} from theta_g, the members' seeds and their mean rewards (`noise`: the
    generation's, if drawn already; `fitness`: what is shaped into weights, when it is not the mean
    reward, see FITNESS). Pure: returns a new state."""
    if len(members) != len(rewards):
        raise ValueError(f"{len(members)} members but {len(rewards)} rewards")
    if fitness is not None and len(fitness) != len(members):
        raise ValueError(f"{len(members)} members but {len(fitness)} fitness values")
    weights = SHAPING[shaping](rewards if fitness is None else fitness)
    noise = _checked_noise(noise, state.center, members, perturb)
    keys = noise.keys
    grad_flat = _gradient_flat(members, weights, noise)
    if optimizer == "sgd":
        # one flat vector rather than a few ops per tensor: hundreds of small tensors at rank 1
        step_flat = learning_rate * grad_flat
        moved = _split(_flat(state.center, keys) + step_flat, state.center, keys)
        new_state = replace(state, generation=state.generation + 1, center={k: moved.get(k, v) for k, v in state.center.items()})
    elif optimizer == "adam":
        grad = _per_tensor(grad_flat, state.center, keys)
        b1, b2 = adam_betas
        t = state.adam_step + 1
        m_prev = state.adam_m or {k: torch.zeros_like(g) for k, g in grad.items()}
        v_prev = state.adam_v or {k: torch.zeros_like(g) for k, g in grad.items()}
        m = {k: b1 * m_prev[k] + (1 - b1) * g for k, g in grad.items()}
        v = {k: b2 * v_prev[k] + (1 - b2) * g * g for k, g in grad.items()}
        step = {k: learning_rate * (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + adam_eps) for k in grad}
        center = {k: (v + step[k]) if k in step else v for k, v in state.center.items()}
        new_state = replace(state, generation=state.generation + 1, center=center, adam_m=m, adam_v=v, adam_step=t)
        step_flat = torch.cat([step[k].reshape(-1) for k in sorted(step)]) if step else torch.zeros(0)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    finite = [float(r) for r in rewards if math.isfinite(float(r))]
    metrics = {
        "reward_mean": sum(finite) / len(finite) if finite else float("nan"),
        "reward_std": float(torch.tensor(finite, dtype=torch.float64).std(unbiased=False)) if finite else float("nan"),
        "reward_max": max(finite) if finite else float("nan"),
        "reward_min": min(finite) if finite else float("nan"),
        "failed_members": len(rewards) - len(finite),
        "grad_norm": float(grad_flat.double().norm()),
        "update_norm": float(step_flat.double().norm()),
        "weights": [float(w) for w in weights],
    }
    return new_state, metrics


def optimizer_tensors(state: ESState) -> LoRATensors:
    """The Adam moments as flat tensors (for an artifact); empty for plain ES."""
    out: LoRATensors = {}
    for prefix, moments in (("adam_m.", state.adam_m), ("adam_v.", state.adam_v)):
        for k, v in (moments or {}).items():
            out[prefix + k] = v
    if state.adam_m is not None:
        out["adam_step"] = torch.tensor([state.adam_step], dtype=torch.int64)
    return out


def state_from_tensors(center: LoRATensors, generation: int, optimizer: LoRATensors | None = None) -> ESState:
    if not optimizer:
        return ESState(center=dict(center), generation=generation)
    m = {k[len("adam_m.") :]: v for k, v in optimizer.items() if k.startswith("adam_m.")}
    v = {k[len("adam_v.") :]: t for k, t in optimizer.items() if k.startswith("adam_v.")}
    return ESState(dict(center), generation, m, v, int(optimizer["adam_step"].item()))


def tensors_sha256(tensors: LoRATensors) -> str:
    """A content hash of tensors (names, dtypes, shapes, bytes), independent of file format."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

