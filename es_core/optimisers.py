"""The step an ES gradient estimate takes: plain SGD (the paper's) or Adam on the same estimate.

One interface, as optax's: an optimiser is a small frozen value (its hyperparameters) with one
method, `step`, that moves a state's centre along a flat gradient and advances its own moments,
which live on the state (`ESState.adam_*`) so that a checkpoint holds them. Chosen by name in
settings (`es.optimizer`), built by `optimiser_named`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch

from es_core.es import ESState
from es_core.lora import LoRATensors


class Optimiser(Protocol):
    learning_rate: float

    def step(self, state: ESState, gradient: torch.Tensor, keys: Sequence[str]) -> tuple[ESState, torch.Tensor]:
        """`state` with its centre moved along `gradient` (flat over `keys`, in order: the tensors
        the noise moves) and the optimiser's moments advanced; and the step taken, flat."""
        ...


def flat(tensors: LoRATensors, keys: Sequence[str]) -> torch.Tensor:
    """The tensors of `keys`, flattened and concatenated in that order."""
    return torch.cat([tensors[k].reshape(-1) for k in keys]) if keys else torch.empty(0)


def split(values: torch.Tensor, like: LoRATensors, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Views of values[..., total] as the tensors of `keys` shaped as in `like` (a leading axis is kept)."""
    out, offset = {}, 0
    lead = values.shape[:-1]
    for key in keys:
        n = like[key].numel()
        out[key] = values[..., offset:offset + n].view(*lead, *like[key].shape)
        offset += n
    return out


@dataclass(frozen=True)
class SGD:
    """theta += alpha * g: the paper's step."""

    learning_rate: float

    def step(self, state: ESState, gradient: torch.Tensor, keys: Sequence[str]) -> tuple[ESState, torch.Tensor]:
        # one flat vector rather than a few ops per tensor: hundreds of small tensors at rank 1
        step = self.learning_rate * gradient
        moved = split(flat(state.centre, keys) + step, state.centre, keys)
        return replace(state, centre={k: moved.get(k, v) for k, v in state.centre.items()}), step


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba 2015) on the ES gradient estimate, ascending; moments for every tensor of
    the centre (zero where the noise does not move), as a checkpoint stores them."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def step(self, state: ESState, gradient: torch.Tensor, keys: Sequence[str]) -> tuple[ESState, torch.Tensor]:
        grad = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.centre.items()}
        grad.update(split(gradient, state.centre, keys))
        b1, b2 = self.beta1, self.beta2
        t = state.adam_step + 1
        m_prev = state.adam_m or {k: torch.zeros_like(g) for k, g in grad.items()}
        v_prev = state.adam_v or {k: torch.zeros_like(g) for k, g in grad.items()}
        m = {k: b1 * m_prev[k] + (1 - b1) * g for k, g in grad.items()}
        v = {k: b2 * v_prev[k] + (1 - b2) * g * g for k, g in grad.items()}
        step = {k: self.learning_rate * (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + self.eps) for k in grad}
        centre = {k: (value + step[k]) if k in step else value for k, value in state.centre.items()}
        step_flat = torch.cat([step[k].reshape(-1) for k in sorted(step)]) if step else torch.zeros(0)
        return replace(state, centre=centre, adam_m=m, adam_v=v, adam_step=t), step_flat


def optimiser_named(name: str, learning_rate: float, adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8) -> Optimiser:
    """The optimiser `es.optimizer` names, with its hyperparameters."""
    if name == "sgd":
        return SGD(learning_rate)
    if name == "adam":
        return Adam(learning_rate, *adam_betas, adam_eps)
    raise ValueError(f"unknown optimizer {name!r}")
