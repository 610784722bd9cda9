"""Evaluation tasks: a generation's members (every backend, through `generate_population`); stored
adapters, such as the centre or a base model on a held-out set (through `generate`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from prefect import task

from artifacts.checkpoints import CENTRE_FILE, adapter_folder, load_checkpoint
from artifacts.store import ArtifactStore
from es_core.backends.base import Adapter, AdapterRef, BackendError, InMemoryAdapter
from es_core.countdown.problems import Problem
from es_core.es import PopulationPlan, problem_groups
from es_core.evaluation import MemberScore, heldout_summary, score_population
from tasks.common import CONTENT_CACHE, retry_on
from tasks.members import GenerationMembers


def _scored(generate, problems: list[Problem], prompts: list[str], reward_kind: str, groups=None) -> tuple[list[MemberScore], float]:
    """Each member's scores from `generate()` (completions[member][prompt], or over its `groups`
    problems) and its seconds."""
    started = time.perf_counter()
    completions = generate()
    seconds = time.perf_counter() - started
    return score_population(problems, prompts, completions, reward_kind, groups), seconds


# what a backend reports as its failure (a server's) is retried, not a bug or an engine's error
_backend_failed = retry_on((BackendError,))


@task(cache_policy=CONTENT_CACHE, retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_backend_failed,
      task_run_name="evaluate-g{plan.generation}")
def evaluate_population(
    backend,
    artifacts_dir: str,
    center_sha256: str,
    plan: PopulationPlan,
    problems: list[Problem],
    prompts: list[str],
    max_new_tokens: int,
    reward_kind: str,
    model_key: str,
    decoding=None,
    members: GenerationMembers | None = None,
    members_per_prompt: int = 0,
) -> dict:
    """Greedy completions of every prompt under every member of a generation (or, with
    `members_per_prompt`, of each member's group's share: es_core.es.problem_groups), scored.

    The members are the centre checkpoint plus their seeds' noise (`members`: built for this centre
    and plan, shared with the generation's other tasks, tasks/members.py); the backend takes them as
    it decodes them (es_core/backends/base.py `Members`), any files it loads written for this call
    and deleted after it (`GenerationMembers.serving`). The cache
    key is that content: the centre's hash and the plan; `model_key` (how the backend decodes) is
    part of it. `decoding` is set once decoding is under way (background work waits for it).
    Retried with backoff on a backend's (a server's) failure."""
    members = members.check(center_sha256, plan) if members is not None else GenerationMembers(artifacts_dir, center_sha256, plan)
    on_decode = decoding.set if decoding is not None else None
    groups = problem_groups(len(plan.members), len(problems), members_per_prompt)
    with members.serving() as served:  # files a backend loads last while it decodes them, never in the run's store
        scores, seconds = _scored(lambda: backend.generate_population(served, prompts, max_new_tokens, on_decode, groups), problems, prompts,
                                  reward_kind, groups)
    return {"scores": scores, "generate_seconds": seconds}


def _stored_adapter(store: ArtifactStore, name: str, sha256: str | None, scratch: ArtifactStore) -> Adapter:
    """A stored adapter (sha None: the base model) as a backend takes it. A centre stored without
    its padding (es_centre.safetensors: at R 576, 425 MB where its PEFT folder is 703 MB) is held in
    memory as its checkpoint loads it, its PEFT folder written into `scratch` only for a backend that
    loads files (SGLang; the embedded engine takes the tensors); any other adapter is its folder
    (a weights-space member joined into `scratch`, else the artifact itself)."""
    if sha256 is None:
        return AdapterRef(name, None)
    # which kind it is from its folder's names; its files are hashed once, where they are read
    # (load_checkpoint, adapter_folder), not also here (425 MB at R 576)
    if not (store.path(sha256) / CENTRE_FILE).is_file():
        return AdapterRef(name, adapter_folder(store, sha256, scratch))
    state, spec = load_checkpoint(store, sha256)
    # the values its PEFT folder holds (adapter_files writes float32)
    tensors = {k: v.to(torch.float32) for k, v in state.centre.items()}
    return InMemoryAdapter(name, tensors, spec.lora_alpha / spec.rank, lambda: adapter_folder(store, sha256, scratch))


def _score_adapters(backend, artifacts_dir: str, adapters: list[tuple[str, str | None]], problems: list[Problem], prompts: list[str],
                    max_new_tokens: int, reward_kind: str, members_per_prompt: int = 0) -> list[MemberScore]:
    store = ArtifactStore(Path(artifacts_dir))
    # what is built for this call (a folder a backend loads) lives in a scratch store beside the
    # store (ArtifactStore.scratch), gone after it
    with store.scratch("served") as scratch:
        refs = [_stored_adapter(store, name, sha, scratch) for name, sha in adapters]
        groups = problem_groups(len(refs), len(problems), members_per_prompt)
        return _scored(lambda: backend.generate(refs, prompts, max_new_tokens, groups), problems, prompts, reward_kind, groups)[0]


@task(cache_policy=CONTENT_CACHE, retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_backend_failed)
def evaluate_adapters(
    backend,
    artifacts_dir: str,
    adapters: list[tuple[str, str | None]],
    problems: list[Problem],
    prompts: list[str],
    max_new_tokens: int,
    reward_kind: str,
    model_key: str,
    members_per_prompt: int = 0,
) -> list[MemberScore]:
    """Stored adapter artifacts (name, sha256; sha None: the base model) on these prompts (with
    `members_per_prompt`, each on its group's share, as the generation decoded them), scored: what
    replay decodes again, from the files the ledger names."""
    return _score_adapters(backend, artifacts_dir, adapters, problems, prompts, max_new_tokens, reward_kind, members_per_prompt)


@task(cache_policy=CONTENT_CACHE, retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_backend_failed,
      task_run_name="eval-{adapter[0]}-on-{split}")
def evaluate_heldout(
    backend,
    artifacts_dir: str,
    adapter: tuple[str, str | None],
    split: str,
    problems: list[Problem],
    prompts: list[str],
    max_new_tokens: int,
    reward_kind: str,
    model_key: str,
) -> dict:
    """The centre (or the base model, sha None) on held-out set `split`: summary with 95% bootstrap
    intervals, and every completion kept as a JSONL artifact."""
    (score,) = _score_adapters(backend, artifacts_dir, [adapter], problems, prompts, max_new_tokens, reward_kind)
    lines = "".join(json.dumps(vars(s)) + "\n" for s in score.samples)
    samples = ArtifactStore(Path(artifacts_dir)).put_bytes(lines.encode(), "samples.jsonl")
    return {**heldout_summary(score), "samples_sha256": samples.sha256}
