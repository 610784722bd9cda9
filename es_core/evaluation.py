"""Scoring completions: per-sample reward parts, per-member summaries, bootstrap intervals."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from es_core.countdown.problems import Problem
from es_core.countdown.reward import RewardKind, score_parts


@dataclass(frozen=True)
class Completion:
    """What a backend returns for one prompt under one adapter: what is scored."""

    text: str  # generated text after the prompt, special tokens removed
    completion_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    server: str = ""  # who produced it: "embedded" or the SGLang URL


@dataclass(frozen=True)
class SampleScore:
    problem_id: str
    prompt: str
    completion: str
    reward: float
    format_reward: float
    format_ok: bool
    correct: bool
    completion_tokens: int


@dataclass(frozen=True)
class MemberScore:
    reward_mean: float
    format_rate: float
    accuracy: float
    tokens: int
    samples: tuple[SampleScore, ...]
    server: str = ""


def score_member(problems: Sequence[Problem], prompts: Sequence[str], completions: Sequence[Completion], reward_kind: RewardKind = "paper",
                 memo: dict | None = None) -> MemberScore:
    """`memo` (shared between the members of a population): reward parts by (prompt index, text);
    greedy members close to one centre often write the same completion."""
    if not (len(problems) == len(prompts) == len(completions)):
        raise ValueError(f"{len(problems)} problems, {len(prompts)} prompts, {len(completions)} completions")
    memo = {} if memo is None else memo
    samples = []
    for i, (problem, prompt, completion) in enumerate(zip(problems, prompts, completions)):
        parts = memo.get((i, completion.text))
        if parts is None:
            parts = memo[i, completion.text] = score_parts(completion.text, problem.numbers, problem.target, reward_kind)
        samples.append(
            SampleScore(problem.id, prompt, completion.text, parts.reward, parts.format_reward, parts.format_ok, parts.correct, completion.completion_tokens)
        )
    n = max(len(samples), 1)
    return MemberScore(
        reward_mean=sum(s.reward for s in samples) / n,
        format_rate=sum(s.format_ok for s in samples) / n,
        accuracy=sum(s.correct for s in samples) / n,
        tokens=sum(s.completion_tokens for s in samples),
        samples=tuple(samples),
        server=completions[0].server if completions else "",
    )


def score_population(problems: Sequence[Problem], prompts: Sequence[str], completions: Sequence[Sequence[Completion]],
                     reward_kind: RewardKind = "paper", groups: Sequence[Sequence[int]] | None = None) -> list[MemberScore]:
    """score_member for each member's completions (with `groups`, of its own problems: indices into
    `problems`), each distinct (prompt, completion) scored once."""
    memo: dict = {}
    if groups is None:
        return [score_member(problems, prompts, member, reward_kind, memo) for member in completions]
    return [score_member([problems[i] for i in own], [prompts[i] for i in own], member, reward_kind, memo)
            for own, member in zip(groups, completions, strict=True)]


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so a report is reproducible)."""
    values = [float(v) for v in values]
    if not values:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def heldout_summary(score: MemberScore, seed: int = 0) -> dict:
    """Mean reward, accuracy and format rate with 95% bootstrap intervals, for the evals table."""
    rewards = [s.reward for s in score.samples]
    correct = [float(s.correct) for s in score.samples]
    r_lo, r_hi = bootstrap_ci(rewards, seed=seed)
    a_lo, a_hi = bootstrap_ci(correct, seed=seed)
    return {
        "n": len(score.samples),
        "reward_mean": score.reward_mean,
        "reward_ci_low": r_lo,
        "reward_ci_high": r_hi,
        "accuracy": score.accuracy,
        "accuracy_ci_low": a_lo,
        "accuracy_ci_high": a_hi,
        "format_rate": score.format_rate,
    }
