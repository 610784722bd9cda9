"""A generation's noise, drawn once: `es.draw_population` of its plan.

A generation's noise depends on its plan only (seeds, signs, sigma), never on rewards or on the
centre's values, so the flow draws generation g + 1's while g decodes (flows/pipeline.py) and hands
it to g + 1's tasks as `drawn`: the member build, the adapter files and the update then share one
draw (45 ms at SmolLM2 rank 1, 32 members, on a 2-core machine) instead of each drawing it. Without
it (a replay, a test) a task draws the same values itself: a run is bit-identical either way.
`drawn` is in no cache key; the plan it was drawn from is.
"""

from __future__ import annotations

from pathlib import Path

from artifacts.checkpoints import load_checkpoint
from artifacts.store import ArtifactStore
from es_core.es import DrawnPopulation, PopulationPlan, draw_population, noise_layout
from es_core.lora import LoRATensors


def run_noise_layout(artifacts_dir: str, center_sha256: str, perturb: str) -> tuple[tuple[str, int], ...]:
    """The tensors the noise moves and their sizes: those of every centre of a run (so, of its first)."""
    state, _ = load_checkpoint(ArtifactStore(Path(artifacts_dir)), center_sha256)
    return noise_layout(state.center, perturb)


def population_of(plan: PopulationPlan, center: LoRATensors, drawn: DrawnPopulation | None) -> DrawnPopulation:
    """The plan's noise and member offsets: `drawn` (drawn ahead for this plan), or drawn now."""
    if drawn is None:
        return draw_population(plan, noise_layout(center, plan.perturb))
    if drawn.plan != plan:
        raise ValueError(f"the noise drawn ahead is generation {drawn.plan.generation}'s, not generation {plan.generation}'s plan")
    return drawn
