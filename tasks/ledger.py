"""Ledger writes as tasks (so the Prefect UI shows them and retries cover a busy or flaky disk):
idempotent on their keys, so a retried task never duplicates a row. A refusal (LedgerError: other
settings under a recorded run id, say) is final and not retried."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from artifacts.ledger import Ledger, LedgerError
from es_core.countdown.problems import Problem
from es_core.es import PopulationPlan
from es_core.evaluation import MemberScore
from tasks.common import NO_CACHE, retry_on, wait_for_decoding


# a disk that was busy or flaky is tried again; a refusal would only be repeated
LEDGER_WRITE = dict(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on((BaseException,), final=(LedgerError,)))


def problem_rows(problems: list[Problem]) -> list[dict]:
    return [{"problem_id": p.id, "numbers": list(p.numbers), "target": p.target, "split": p.split} for p in problems]


@task(**LEDGER_WRITE)
def record_problems(data_dir: str, problems: list[Problem]) -> None:
    """The problems an experiment trains and is evaluated on (a re-recorded id is replaced)."""
    Ledger(Path(data_dir)).record_problems(problem_rows(problems))


@task(**LEDGER_WRITE, task_run_name="record-run-{run_id}")
def record_run(data_dir: str, run_id: str, settings_json: str, settings_sha256: str, run_name: str, seed: int, base_model: dict,
               warm_start_sha256: str | None) -> None:
    """The run row (status running): created, or on a resume checked against what was recorded."""
    Ledger(Path(data_dir)).record_run(run_id, run_name, settings_json, settings_sha256, base_model["path"], base_model["sha256"], seed,
                                      warm_start_sha256=warm_start_sha256)


@task(**LEDGER_WRITE, task_run_name="run-{status}")
def set_run_status(data_dir: str, run_id: str, status: str) -> None:
    """running, completed or failed."""
    Ledger(Path(data_dir)).set_run_status(run_id, status)


@task(**LEDGER_WRITE)
def record_warm_start(data_dir: str, row: dict) -> None:
    """The warm start a run starts from: base -> warm start, steps, seconds, loss curve."""
    Ledger(Path(data_dir)).record_warm_start(row)


@task(**LEDGER_WRITE, task_run_name="record-eval-{row[model]}-g{row[generation]}-on-{row[split]}")
def record_eval(data_dir: str, row: dict) -> None:
    """One held-out evaluation (centre, base model or warm start)."""
    Ledger(Path(data_dir)).record_eval(row)


def evaluated(data_dir: str, run_id: str, generation: int, split: str, model: str) -> bool:
    """Is this evaluation recorded already (a resume skips it)?"""
    _, rows = Ledger(Path(data_dir)).query("SELECT count(*) FROM evals WHERE run_id = ? AND generation = ? AND split = ? AND model = ?",
                                           [run_id, generation, split, model])
    return rows[0][0] > 0


def generation_rows(run_id: str, plan: PopulationPlan, parent_sha256: str, member_adapters: list[tuple[str, str]], scores: list[MemberScore],
                    update: dict, timing: dict) -> tuple[dict, list[dict], list[dict]]:
    """The ledger rows of a scored and updated generation: (generation, members, samples)."""
    g = plan.generation
    generation = {
        "run_id": run_id, "generation": g, "center_sha256": update["center_sha256"], "center_path": update["center_path"],
        "parent_center_sha256": parent_sha256, "reward_mean": update["reward_mean"], "reward_std": update["reward_std"],
        "reward_max": update["reward_max"], "update_norm": update["update_norm"], "truncation_kept": update.get("truncation_kept"), **timing,
    }
    members = [
        {
            "run_id": run_id, "generation": g, "member": m.index, "seed": m.seed, "sign": m.sign, "adapter_sha256": sha,
            "adapter_path": path, "reward_mean": s.reward_mean, "format_rate": s.format_rate,
            "accuracy": s.accuracy, "tokens": s.tokens, "server": s.server, "fitness": f,
        }
        for m, (sha, path), s, f in zip(plan.members, member_adapters, scores, update["fitness"])
    ]
    samples = [{"run_id": run_id, "generation": g, "member": m.index, **vars(sample)} for m, s in zip(plan.members, scores) for sample in s.samples]
    return generation, members, samples


@task(**LEDGER_WRITE, task_run_name="commit-g{plan.generation}")
def commit_generation(data_dir: str, run_id: str, plan: PopulationPlan, parent_sha256: str, member_adapters: list[tuple[str, str]],
                      scores: list[MemberScore], update: dict, timing: dict, new_problems: list[Problem] | None = None, decoding=None) -> dict:
    """Members, samples, new problems (a fresh training stream's) and the generation row land in
    one transaction, or not at all; returns the generation and member rows."""
    wait_for_decoding(decoding)
    generation, members, samples = generation_rows(run_id, plan, parent_sha256, member_adapters, scores, update, timing)
    Ledger(Path(data_dir)).commit_generation(generation, members, samples, problem_rows(new_problems) if new_problems is not None else None)
    return {"generation": generation, "members": members}


@task(cache_policy=NO_CACHE, task_run_name="publish-g{generation}")
def publish_generation(progress, generation: int, committed: dict, decoding=None) -> None:
    """The console line, progress bar and member table of a committed generation (Prefect UI)."""
    wait_for_decoding(decoding)
    progress.generation(generation, committed["generation"], committed["members"])
