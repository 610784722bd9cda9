"""A generation's update must be finite before its centre is stored: a check beside `es_update`.

An infinite or NaN reward, fitness, gradient or step (a learning rate that overflows float32, a
backend that returned NaN) would otherwise be committed as the new centre, and every later member
would decode from NaN weights. `check_finite_update` raises one line naming the generation and what
is not finite; the task calls it before it stores the centre, so the ledger ends at the generation
before, whose centre stays the point a resume continues from.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


class NonFiniteUpdateError(ValueError):
    """A generation whose update is not finite: one line naming it."""


def _first_bad(values: Sequence[float]) -> int | None:
    return next((i for i, v in enumerate(values) if not math.isfinite(float(v))), None)


def check_finite_update(generation: int, rewards: Sequence[float], fitness: Sequence[float], metrics: dict, new_state) -> None:
    """Raise NonFiniteUpdateError unless the members' rewards and fitness, the update's gradient and
    step norms and every tensor of the new state (centre, optimizer moments) are finite."""
    problem = None
    if (i := _first_bad(rewards)) is not None:
        problem = f"member {i}'s reward is {float(rewards[i])}"
    elif (i := _first_bad(fitness)) is not None:
        problem = f"member {i}'s fitness is {float(fitness[i])}"
    elif not math.isfinite(metrics["grad_norm"]):
        problem = f"the gradient estimate's norm is {metrics['grad_norm']}"
    elif not math.isfinite(metrics["update_norm"]):
        problem = f"the update's norm is {metrics['update_norm']} (gradient norm {metrics['grad_norm']:.6g}: the learning rate overflows it)"
    else:
        for what, tensors in (("centre", new_state.centre), ("Adam first moment", new_state.adam_m), ("Adam second moment", new_state.adam_v)):
            bad = next((k for k, t in sorted((tensors or {}).items()) if not bool(torch.isfinite(t).all())), None)
            if bad is not None:
                problem = f"the new {what} has non-finite values in {bad}"
                break
    if problem is not None:
        raise NonFiniteUpdateError(
            f"generation {generation}: {problem}; its centre is not stored and nothing of it is committed: the ledger ends at "
            f"generation {generation - 1} (with the same settings a resume repeats this update; lower es.learning_rate or es.sigma in a new run)"
        )
