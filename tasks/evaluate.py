"""Evaluation tasks: a whole population in one batched call (embedded, members built from seeds in
memory), one member (SGLang, from its adapter artifact), held-out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task

from artifacts.checkpoints import load_checkpoint
from artifacts.store import ArtifactStore
from es_core.backends.base import AdapterRef
from es_core.countdown.problems import Problem
from es_core.es import Member, stacked_population
from es_core.evaluation import MemberScore, heldout_summary, score_population
from tasks.common import CONTENT_CACHE
from tasks.noise import NoisePool, population_args


def _scored(generate, problems: list[Problem], prompts: list[str], reward_kind: str) -> tuple[list[MemberScore], float]:
    """Each member's scores from `generate()` (completions[member][prompt]) and its seconds."""
    started = time.perf_counter()
    completions = generate()
    seconds = time.perf_counter() - started
    return score_population(problems, prompts, completions, reward_kind), seconds


def _generate_and_score(backend, artifacts_dir: str, adapters: list[tuple[str, str | None]], problems: list[Problem], prompts: list[str],
                        max_new_tokens: int, reward_kind: str) -> tuple[list[MemberScore], float]:
    """Scores of each adapter (sha None: the base model) and the seconds spent decoding."""
    store = ArtifactStore(Path(artifacts_dir))
    refs = [AdapterRef(name, store.get(sha) if sha else None) for name, sha in adapters]
    return _scored(lambda: backend.generate(refs, prompts, max_new_tokens), problems, prompts, reward_kind)


@task(cache_policy=CONTENT_CACHE)
def evaluate_population(
    backend,
    artifacts_dir: str,
    center_sha256: str,
    members: list[tuple[int, int, int]],
    sigma: float,
    perturb_factor: str,
    problems: list[Problem],
    prompts: list[str],
    max_new_tokens: int,
    reward_kind: str,
    model_key: str,
    gate=None,
    noise: NoisePool | None = None,
) -> dict:
    """Greedy completions of every prompt under every member (index, seed, sign) of a generation in
    one batched call of the embedded engine, scored.

    The members are built in memory from the centre checkpoint and their seeds: the same float32
    tensors `perturb` writes as adapter artifacts (a safetensors round trip is exact), so decoding
    need not wait for those files, which are written meanwhile. The cache key is that content: the
    centre's hash, the seeds and sigma; `model_key` (base model sha + backend) is only part of it.
    `gate` is set once decoding is under way (background work waits for it); `noise`, the run's
    pool of noise drawn ahead (none: drawn here)."""
    store = ArtifactStore(Path(artifacts_dir))
    state, spec = load_checkpoint(store, center_sha256)
    plan = [Member(*m) for m in members]
    tensors = stacked_population(state.center, plan, sigma, perturb_factor, *population_args(noise, state.center, plan, sigma, perturb_factor))
    on_decode = gate.set if gate is not None else None
    scores, seconds = _scored(lambda: backend.generate_tensors(tensors, prompts, max_new_tokens, scaling=spec.lora_alpha / spec.rank, on_decode=on_decode),
                              problems, prompts, reward_kind)
    return {"scores": scores, "generate_seconds": seconds}


@task(cache_policy=CONTENT_CACHE, retries=3, retry_delay_seconds=[2, 10, 30])
def evaluate_member(
    backend,
    artifacts_dir: str,
    adapter: tuple[str, str | None],
    problems: list[Problem],
    prompts: list[str],
    max_new_tokens: int,
    reward_kind: str,
    model_key: str,
) -> dict:
    """One member on a server (SGLang): retried with backoff on transient server errors."""
    scores, seconds = _generate_and_score(backend, artifacts_dir, [adapter], problems, prompts, max_new_tokens, reward_kind)
    return {"score": scores[0], "generate_seconds": seconds}


@task(cache_policy=CONTENT_CACHE)
def evaluate_heldout(
    backend,
    artifacts_dir: str,
    adapter: tuple[str, str | None],
    problems: list[Problem],
    prompts: list[str],
    max_new_tokens: int,
    reward_kind: str,
    model_key: str,
) -> dict:
    """The centre (or the base model, sha None) on the held-out split: summary with 95% bootstrap
    intervals, and every completion kept as a JSONL artifact."""
    (score,), _ = _generate_and_score(backend, artifacts_dir, [adapter], problems, prompts, max_new_tokens, reward_kind)
    lines = "".join(json.dumps(vars(s)) + "\n" for s in score.samples)
    samples = ArtifactStore(Path(artifacts_dir)).put_bytes(lines.encode(), "samples.jsonl")
    return {**heldout_summary(score), "samples_sha256": samples.sha256}
