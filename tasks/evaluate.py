"""Evaluation tasks: a whole population in one batched call (embedded), one member (SGLang), held-out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task

from artifacts.store import ArtifactStore
from es_core.backends.base import AdapterRef
from es_core.countdown.problems import Problem
from es_core.evaluation import MemberScore, heldout_summary, score_member
from tasks.common import CONTENT_CACHE


def _refs(store: ArtifactStore, adapters: list[tuple[str, str | None]]) -> list[AdapterRef]:
    return [AdapterRef(name, store.get(sha) if sha else None) for name, sha in adapters]


@task(cache_policy=CONTENT_CACHE)
def evaluate_population(
    backend,
    artifacts_dir: str,
    adapters: list[tuple[str, str | None]],
    problems: list[Problem],
    prompts: list[str],
    max_new_tokens: int,
    reward_kind: str,
    model_key: str,
) -> dict:
    """Greedy completions of every prompt under every adapter in one batched call, scored.

    `model_key` (base model sha + backend) is only part of the cache key."""
    store = ArtifactStore(Path(artifacts_dir))
    started = time.perf_counter()
    completions = backend.generate(_refs(store, adapters), prompts, max_new_tokens)
    generate_seconds = time.perf_counter() - started
    scores = [score_member(problems, prompts, member_completions, reward_kind) for member_completions in completions]
    return {"scores": scores, "generate_seconds": generate_seconds}


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
    store = ArtifactStore(Path(artifacts_dir))
    started = time.perf_counter()
    completions = backend.generate(_refs(store, [adapter]), prompts, max_new_tokens)[0]
    return {"score": score_member(problems, prompts, completions, reward_kind), "generate_seconds": time.perf_counter() - started}


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
    store = ArtifactStore(Path(artifacts_dir))
    completions = backend.generate(_refs(store, [adapter]), prompts, max_new_tokens)[0]
    score: MemberScore = score_member(problems, prompts, completions, reward_kind)
    lines = "".join(json.dumps(vars(s)) + "\n" for s in score.samples)
    samples = store.put_bytes(lines.encode(), "samples.jsonl")
    return {**heldout_summary(score), "samples_sha256": samples.sha256}
