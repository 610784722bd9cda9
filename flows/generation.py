"""One ES generation, as the method reads: plan its members, evaluate them, update the centre,
commit the generation to the ledger. `generation` is that loop body; `ESRun` holds what every
generation of a run shares and runs each step as a Prefect task. The overlap of host work with
decoding is flows/pipeline.py's: here each step only says which decode it may overlap.

Arguments that are long lists or big objects go to tasks through `quote()`: Prefect would walk
every element looking for futures (the cache keys are the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prefect.utilities.annotations import quote

from es_core.countdown.problems import Problem, training_batch
from es_core.countdown.prompt import render_prompts
from es_core.es import DrawnPopulation, PopulationPlan
from es_core.evaluation import MemberScore
from es_core.keyframes import keeps_every_centre
from es_core.plan import generation_plan, update_rule
from es_core.search_space import search_space
from es_core.settings import Settings
from flows.pipeline import Pipeline
from tasks.common import DataDir, persisted
from tasks.evaluate import evaluate_heldout, evaluate_population
from tasks.ledger import commit_generation, evaluated, publish_generation, record_eval
from tasks.members import GenerationMembers
from tasks.population import aggregate, write_members
from tasks.retention import thin_centres

# Every held-out number is the paper's reward, whatever reward.kind trains on.
HELDOUT_REWARD = "paper"


def generation(run: "ESRun", pipeline: Pipeline, g: int, centre: str) -> str:
    """Generation g from centre (a checkpoint's sha256); returns the new centre's."""
    clock = Clock()
    inputs = pipeline.start(g)                                 # plan: made while g - 1 decoded
    members = GenerationMembers(run.artifacts, centre, inputs.plan, inputs.drawn)  # built once, for every task below
    adapters = run.write_members(pipeline, centre, inputs, members)  # the members' files, written while they decode
    scored = run.evaluate(pipeline, centre, inputs, members)   # evaluate: decode and score every member
    update = run.update(centre, inputs, members, scored.scores)  # tell: the centre moves by the shaped fitness
    pipeline.end_generation()
    run.commit(pipeline, inputs, centre, adapters, scored.scores, update, clock.timing(scored.generate_seconds))  # while g + 1 decodes
    return update["center_sha256"]


@dataclass(frozen=True)
class GenerationInputs:
    """What generation g needs before any reward: its plan (es.ask), the plan's noise, its prompts."""

    plan: PopulationPlan
    drawn: DrawnPopulation
    problems: list[Problem]
    prompts: list[str]


@dataclass(frozen=True)
class Scored:
    scores: list[MemberScore]
    generate_seconds: float  # decoding in this generation: 0 for a cached evaluation


@dataclass
class Clock:
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    t0: float = field(default_factory=time.perf_counter)

    def timing(self, generate_seconds: float) -> dict:
        return {"started_at": self.started_at, "finished_at": datetime.now(timezone.utc), "generate_seconds": generate_seconds,
                "wall_seconds": time.perf_counter() - self.t0}


class ESRun:
    """What every generation of a run shares: settings, data dir, backend, training problems,
    tokenizer, the noise layout, the progress display, and the tasks (with_options builds a new
    task object: once, not once per generation)."""

    def __init__(self, settings: Settings, data: DataDir, run_id: str, backend, model_key: str, tokenizer, train: list[Problem],
                 held_out_ids: set[str], eval_sets: dict[str, list[Problem]], space, layout, progress):
        self.settings, self.data, self.run_id, self.backend, self.model_key = settings, data, run_id, backend, model_key
        self.tokenizer, self.train, self.held_out_ids, self.layout, self.progress = tokenizer, train, held_out_ids, layout, progress
        self.eval_sets, self.space = eval_sets, space  # space: es_core.plan.run_space
        self.eval_prompts = {name: render_prompts(problems, settings.prompt.style, tokenizer) for name, problems in eval_sets.items()}
        self.root, self.artifacts = str(data.root), str(data.artifacts)
        self.rule = update_rule(settings.es)
        self._write_members, self._aggregate = persisted(write_members, data), persisted(aggregate, data)
        self._evaluate_population, self._evaluate_heldout = persisted(evaluate_population, data), persisted(evaluate_heldout, data)

    # --- plan -------------------------------------------------------------------------------------------

    def plan(self, g: int) -> GenerationInputs:
        """Generation g's members (seeds, signs, sigma), their noise and its training prompts: none
        depends on a reward, so the pipeline prepares them while the generation before decodes."""
        settings = self.settings
        plan = generation_plan(settings.es, g, self.space)
        problems = training_batch(settings.data, self.train, g, self.held_out_ids)
        return GenerationInputs(plan, search_space(plan).draw(plan, self.layout), problems, render_prompts(problems, settings.prompt.style, self.tokenizer))

    def write_members(self, pipeline: Pipeline, center_sha256: str, inputs: GenerationInputs, members: GenerationMembers):
        """The members' adapter artifacts (the ledger names them), written while they decode."""
        return pipeline.while_decoding(self._write_members, self.artifacts, center_sha256, quote(inputs.plan), members=quote(members))

    # --- evaluate -------------------------------------------------------------------------------------

    def evaluate(self, pipeline: Pipeline, center_sha256: str, inputs: GenerationInputs, members: GenerationMembers) -> Scored:
        """Every member on the generation's prompts (or its group's share): scores, and the seconds decoding took now."""
        generation = self.settings.generation
        state = self._evaluate_population(
            quote(self.backend), self.artifacts, center_sha256, quote(inputs.plan), quote(inputs.problems), quote(inputs.prompts),
            generation.max_new_tokens, self.settings.reward.kind, self.model_key, decoding=pipeline.decoding, members=quote(members),
            members_per_prompt=self.settings.es.members_per_prompt, return_state=True,
        )
        result = state.result()
        # a cached result carries the seconds of the run that decoded it; this generation decoded nothing
        return Scored(result["scores"], 0.0 if state.name == "Cached" else result["generate_seconds"])

    # --- update -----------------------------------------------------------------------------------------

    def update(self, center_sha256: str, inputs: GenerationInputs, members: GenerationMembers, scores: list[MemberScore]) -> dict:
        """The new centre from the members' rewards: its sha256, the update's metrics, the fitness."""
        return self._aggregate(
            self.artifacts, center_sha256, quote(inputs.plan), quote([s.reward_mean for s in scores]),
            quote([[sample.reward for sample in s.samples] for s in scores]), self.rule, members=quote(members),
        )

    # --- commit -----------------------------------------------------------------------------------------

    def commit(self, pipeline: Pipeline, inputs: GenerationInputs, parent_sha256: str, member_adapters, scores: list[MemberScore], update: dict,
               timing: dict) -> None:
        """Members, samples and the generation row in one transaction, then the console and UI:
        both while the next generation decodes."""
        fresh = inputs.problems if self.settings.data.train_problems == "fresh" else None
        committed = pipeline.while_next_decodes(
            commit_generation, self.root, self.run_id, quote(inputs.plan), parent_sha256, member_adapters, quote(scores),
            quote(update), quote(timing), quote(fresh),
        )
        pipeline.while_next_decodes(publish_generation, quote(self.progress), inputs.plan.generation, committed)
        keep_every = self.settings.store.keep_centre_every
        if not keeps_every_centre(keep_every):  # off: nothing runs, the store as it always was
            # here, not by gc: a run with the setting on stays within its disk with no manual step
            # (the preflight counts the thinned footprint), and it thins only what it has moved past
            pipeline.while_next_decodes(thin_centres, self.root, self.run_id, keep_every, inputs.plan.generation, committed)

    # --- held-out evaluations ------------------------------------------------------------------------------

    def eval_due(self, generations_done: int) -> bool:
        every = self.settings.eval.every
        return generations_done == self.settings.es.generations or (every > 0 and generations_done % every == 0)

    def heldout(self, label: int, name: str, adapter: tuple[str, str | None], backend=None, model_key: str | None = None) -> None:
        """`name` (base, warm_start or centre) on every held-out set, with the paper's reward; an
        evaluation recorded already (a resume) is skipped."""
        for split, problems in self.eval_sets.items():
            if evaluated(self.root, self.run_id, label, split, name):
                continue
            summary = self._evaluate_heldout(
                quote(backend or self.backend), self.artifacts, adapter, split, quote(problems), quote(self.eval_prompts[split]),
                self.settings.generation.max_new_tokens, HELDOUT_REWARD, model_key or self.model_key,
            )
            record_eval(self.root, {"run_id": self.run_id, "generation": label, "split": split, "model": name, "adapter_sha256": adapter[1], **summary})
            self.progress.heldout(label, f"{name}, {split}", summary)
