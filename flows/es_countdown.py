"""The `es-countdown` flow: ES over a population of LoRA adapters on Countdown.

Each generation g: members = centre_g + sigma * sign_i * eps(seed_i) are written as adapter
artifacts, scored by greedy decoding on a batch of training prompts, and the centre moves by the
z-scored rewards. Everything lands in the ledger; a generation is committed in one transaction, so
a killed run resumes after its last committed generation (cached task results make the redo cheap)
and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote

from artifacts.ledger import Ledger
from artifacts.store import ArtifactStore
from es_core.countdown.problems import experiment_problems, training_batch
from es_core.countdown.prompt import render_prompts
from es_core.es import FITNESS, member_plan
from es_core.models import load_tokenizer, resolve_device, resolve_dtype
from es_core.settings import ConfigError, Settings, load_settings
from flows.backend import LazyBackend, open_backend
from flows.crashed import mark_unfinished_task_runs_crashed
from flows.progress import RunProgress
from flows.recorded import recorded_settings
from flows.report import write_report
from tasks.common import DataDir, evaluation_key, persisted
from tasks.evaluate import evaluate_heldout, evaluate_member, evaluate_population
from tasks.ledger import commit_generation, publish_generation, record_eval, record_warm_start
from tasks.model import prepare_base_model
from tasks.noise import NoisePool
from tasks.population import aggregate, init_population, perturb
from tasks.warm_start import warm_start

# Every held-out number is the paper's reward, whatever reward.kind trains on.
HELDOUT_REWARD = "paper"


def new_run_id(run_name: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in run_name.lower()).strip("-") or "run"
    return f"{slug}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def resolve_settings(config_path: str | None, overrides: list[str] | None, run_id: str | None, data_dir: str | None) -> tuple[Settings, str, bool]:
    """(settings, run_id, resuming). A known run id resumes with its stored settings."""
    extra = [f"data_dir={data_dir}"] if data_dir else []
    settings = load_settings(config_path, [*(overrides or []), *extra]) if config_path else None
    root = Path(data_dir) if data_dir else (settings.data_dir if settings else load_settings(None, extra).data_dir)
    if run_id:
        stored = Ledger(root).run_row(run_id) if (root / "ledger.duckdb").exists() else None
        if stored:
            resumed = recorded_settings(stored, root, overrides or [])  # the stored settings; ES_* that change results refused
            if settings is not None and settings.fingerprint() != resumed.fingerprint():
                raise ConfigError(f"run {run_id} in {root} was started with other settings than {config_path}; start a new run id")
            return resumed, run_id, True
        if settings is None:
            raise ConfigError(f"run {run_id} is not in the ledger at {root / 'ledger.duckdb'}; give --config to start it")
    if settings is None:
        raise ConfigError("give a config path (or the id of a recorded run to resume)")
    return settings, run_id or new_run_id(settings.run_name), False


def _settle_quietly(pending: list, gate, logger) -> None:
    """On a failure, let generations already scored reach the ledger before the error surfaces."""
    gate.set()
    for future in pending:
        try:
            future.result(raise_on_failure=True)
        except BaseException as exc:  # the original error is the one to raise; this one is logged
            logger.error(f"background ledger write failed too: {type(exc).__name__}: {exc}")


def prepare_warm_start(settings: Settings, data: DataDir, base: dict, held_out_ids: set[str]) -> dict:
    """The warm-started base model (a cached task: trained once per settings, or continued from a
    shorter warm start), recorded in the ledger; returned as a base model dict (name, path, sha256)."""
    device = resolve_device(settings.model.device)
    args = (str(data.root), base["path"], base["sha256"], settings.warm_start, settings.prompt.style,
            str(resolve_dtype(settings.model.dtype, device)).removeprefix("torch."), device.type, sorted(held_out_ids))
    task = persisted(warm_start, data)
    row = task(*args)
    store = ArtifactStore(data.artifacts)
    if not (store.exists(row["warm_start_sha256"])):  # the cached result outlived its artifact (gc): train again
        row = task.with_options(refresh_cache=True)(*args)
    record_warm_start(str(data.root), {**row, "base_model": base["name"]})
    return {"name": f"{base['name']}+warm-start-{settings.warm_start.steps}", "path": str(store.path(row["warm_start_sha256"])),
            "sha256": row["warm_start_sha256"]}


def _problem_row(p) -> dict:
    return {"problem_id": p.id, "numbers": list(p.numbers), "target": p.target, "split": p.split}


def _json(text: str) -> dict:
    import json

    return json.loads(text)


@flow(name="es-countdown", log_prints=True, on_crashed=[mark_unfinished_task_runs_crashed])
def es_countdown(config_path: str | None = None, overrides: list[str] | None = None, run_id: str | None = None, data_dir: str | None = None) -> dict:
    """Run (or resume) an ES experiment; returns the run id, the final centre and its held-out scores."""
    logger = get_run_logger()
    settings, run_id, resuming = resolve_settings(config_path, overrides, run_id, data_dir)
    data = DataDir(Path(settings.data_dir))
    data.root.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(data.root)
    artifacts_dir = str(data.artifacts)
    es = settings.es

    # --- problems, base model (warm-started), run row -------------------------------------------
    train, eval_sets, held_out_ids = experiment_problems(settings.data, settings.eval)
    ledger.record_problems([_problem_row(p) for problems in [train, *eval_sets.values()] for p in problems])
    base = prepare_base_model(settings.model, str(settings.model.cache_dir or data.models))
    model = prepare_warm_start(settings, data, base, held_out_ids) if settings.warm_start.steps else base  # what ES perturbs
    ledger.record_run(run_id, settings.run_name, settings.model_dump_json(), settings.fingerprint(), base["path"], base["sha256"], es.seed,
                      warm_start_sha256=model["sha256"] if model is not base else None)
    ledger.set_run_status(run_id, "running")
    logger.info(f"run {run_id} ({'resuming' if resuming else 'new'}), ledger {data.root / 'ledger.duckdb'}")

    tokenizer = load_tokenizer(Path(model["path"]))
    eval_prompts = {name: render_prompts(problems, settings.prompt.style, tokenizer) for name, problems in eval_sets.items()}
    model_key = evaluation_key(settings, model["sha256"])
    evaluation = dict(max_new_tokens=settings.generation.max_new_tokens, reward_kind=settings.reward.kind, model_key=model_key)

    init_sha = persisted(init_population, data)(
        artifacts_dir, model["path"], model["sha256"], settings.lora.layers, settings.lora.modules,
        settings.lora.rank, settings.lora.lora_alpha, settings.lora.init_std, es.seed,
    )
    last = ledger.last_generation(run_id)
    start = 0 if last is None else last + 1
    center_sha = init_sha if last is None else ledger.generation_row(run_id, last)["center_sha256"]
    progress = RunProgress(run_id, es.generations, start)

    backend = open_backend(settings, Path(model["path"]), data.run_dir(run_id), run_id)
    # the base model itself, when ES runs on a warm start: opened only if its evaluation is not cached
    base_backend = LazyBackend(lambda: open_backend(settings, Path(base["path"]), data.run_dir(run_id), f"{run_id}-base")) if model is not base else backend
    # The ledger commit and UI artifacts of generation g, and the adapter files of g + 1's members,
    # are written in the background while g + 1 decodes: they wait for `gate`, set once decoding is
    # under way, so that they never hold the GIL while the short CPU steps between two decodes run.
    # A kill before a commit lands only means the resume redoes that generation from cached task
    # results. Anything that reads the ledger settles first.
    pending: list = []
    gate = threading.Event()
    noise = NoisePool()  # each generation's noise, drawn once, the next one's while this one decodes
    lookahead = ThreadPoolExecutor(1, thread_name_prefix="es-lookahead")  # and its prompts (10 ms of chat templates)

    def settle() -> None:
        gate.set()  # nothing is decoding now: let them run
        while pending:
            pending.pop(0).result(raise_on_failure=True)

    try:

        def heldout_eval(label: int, name: str, adapter: tuple[str, str | None], on=backend, key: str = model_key) -> None:
            """`name` (base, warm_start or centre) on every held-out set, with the paper's reward."""
            for split, problems in eval_sets.items():
                done = ledger.query("SELECT count(*) FROM evals WHERE run_id = ? AND generation = ? AND split = ? AND model = ?", [run_id, label, split, name])[1][0][0]
                if done:
                    continue
                summary = persisted(evaluate_heldout, data)(
                    quote(on), artifacts_dir, adapter, quote(problems), quote(eval_prompts[split]), settings.generation.max_new_tokens, HELDOUT_REWARD, key)
                record_eval(str(data.root), {"run_id": run_id, "generation": label, "split": split, "model": name, "adapter_sha256": adapter[1], **summary})
                progress.heldout(label, f"{name}, {split}", summary)

        def eval_due(generations_done: int) -> bool:
            every = settings.eval.every
            return generations_done == es.generations or (every > 0 and generations_done % every == 0)

        # --- generation 0: the base model (and its warm start) on the held-out sets ------------
        if settings.eval.base_model:
            heldout_eval(0, "base", ("base", None), base_backend, evaluation_key(settings, base["sha256"]))
            if base_backend is not backend:
                base_backend.close()
        if model is not base and settings.eval.warm_start:
            heldout_eval(0, "warm_start", ("warm_start", None))
        if start > 0 and eval_due(start):  # a kill between a commit and its evaluation
            heldout_eval(start, "centre", (f"centre_g{start}", center_sha))

        # with_options builds a new task object: once, not once per generation
        perturb_task, aggregate_task = persisted(perturb, data), persisted(aggregate, data)
        evaluate_population_task, evaluate_member_task = persisted(evaluate_population, data), persisted(evaluate_member, data)

        def training_inputs(generation: int, after: threading.Event | None = None) -> tuple[list, list[str]]:
            if after is not None:
                after.wait()
            batch = training_batch(settings.data, train, generation, held_out_ids)
            return batch, render_prompts(batch, settings.prompt.style, tokenizer)

        upcoming = None
        for g in range(start, es.generations):
            started_at, t0 = datetime.now(timezone.utc), time.perf_counter()

            # --- members: centre + sigma * sign * eps(seed) ------------------------------------------
            plan = member_plan(es.seed, g, es.population, es.antithetic)
            members = [(m.index, m.seed, m.sign) for m in plan]
            batch, prompts = upcoming.result() if upcoming is not None else training_inputs(g)
            upcoming = lookahead.submit(training_inputs, g + 1, gate) if g + 1 < es.generations else None
            # quote(): Prefect would walk every list element looking for futures (same cache keys)
            perturb_args = (artifacts_dir, center_sha, quote(members), es.sigma, es.perturb)
            if settings.backend.kind == "embedded" and g + 1 < es.generations:
                noise.prefetch(member_plan(es.seed, g + 1, es.population, es.antithetic), es.sigma, es.perturb, gate)

            # --- score every member on this generation's prompts ------------------------------------
            if settings.backend.kind == "embedded":
                # the engine builds the members from the seeds; their adapter artifacts are written meanwhile
                written = perturb_task.submit(*perturb_args, gate=gate, noise=quote(noise))
                result = evaluate_population_task(
                    quote(backend), artifacts_dir, center_sha, quote(members), es.sigma, es.perturb, quote(batch), quote(prompts), **evaluation,
                    gate=gate, noise=quote(noise),
                )
                scores, generate_seconds = result["scores"], result["generate_seconds"]
            else:
                member_adapters = perturb_task(*perturb_args, noise=quote(noise))  # the servers load the files
                adapters = [(f"g{g}_m{m.index:03d}", sha) for m, (sha, _) in zip(plan, member_adapters)]
                futures = [evaluate_member_task.submit(quote(backend), artifacts_dir, a, quote(batch), quote(prompts), **evaluation) for a in adapters]
                results = [f.result() for f in futures]
                scores = [r["score"] for r in results]
                generate_seconds = max(r["generate_seconds"] for r in results)
            gate.set()  # (a cached evaluation never decoded)
            rewards = [s.reward_mean for s in scores]
            fitness = FITNESS[es.fitness]([[sample.reward for sample in s.samples] for s in scores])

            # --- move the centre ------------------------------------------------------------------
            update = aggregate_task(
                artifacts_dir, center_sha, quote(members), quote(rewards), es.learning_rate, es.shaping, es.optimizer, es.perturb,
                (es.adam_beta1, es.adam_beta2, es.adam_eps), noise=quote(noise), fitness=quote(fitness) if es.fitness != "mean_reward" else None,
            )
            if settings.backend.kind == "embedded":
                member_adapters = written.result(raise_on_failure=True)

            # --- one transaction: members, samples, generation ----------------------------------------
            wall_seconds = time.perf_counter() - t0
            generation_row = {
                "run_id": run_id, "generation": g, "center_sha256": update["center_sha256"], "center_path": update["center_path"],
                "parent_center_sha256": center_sha, "reward_mean": update["reward_mean"], "reward_std": update["reward_std"],
                "reward_max": update["reward_max"], "started_at": started_at, "finished_at": datetime.now(timezone.utc),
                "update_norm": update["update_norm"], "generate_seconds": generate_seconds, "wall_seconds": wall_seconds,
            }
            member_rows = [
                {
                    "run_id": run_id, "generation": g, "member": m.index, "seed": m.seed, "sign": m.sign, "adapter_sha256": sha,
                    "adapter_path": path, "reward_mean": s.reward_mean, "format_rate": s.format_rate,
                    "accuracy": s.accuracy, "tokens": s.tokens, "server": s.server, "fitness": f,
                }
                for m, (sha, path), s, f in zip(plan, member_adapters, scores, fitness)
            ]
            sample_rows = [
                {"run_id": run_id, "generation": g, "member": m.index, **vars(sample)}
                for m, s in zip(plan, scores)
                for sample in s.samples
            ]
            settle()
            gate = threading.Event()  # the next generation's decoding
            # quote(): Prefect would otherwise walk the 1,000+ sample rows looking for futures
            new_problems = [_problem_row(p) for p in batch] if settings.data.train_problems == "fresh" else None
            committed = commit_generation.submit(str(data.root), quote(generation_row), quote(member_rows), quote(sample_rows), quote(new_problems), gate=gate)
            pending.extend([committed, publish_generation.submit(quote(progress), g, quote(generation_row), quote(member_rows), gate=gate, wait_for=[committed])])
            center_sha = update["center_sha256"]

            if eval_due(g + 1):
                settle()
                heldout_eval(g + 1, "centre", (f"centre_g{g + 1}", center_sha))
        settle()
    except BaseException:
        _settle_quietly(pending, gate, logger)
        ledger.set_run_status(run_id, "failed")
        raise
    finally:
        lookahead.shutdown(wait=False)
        backend.close()
        if base_backend is not backend:
            base_backend.close()

    ledger.set_run_status(run_id, "completed")
    report = write_report(ledger, run_id, data.run_dir(run_id), data.root / "ledger.duckdb")
    progress.finish(report)
    return {"run_id": run_id, "center_sha256": center_sha, "generations": es.generations, "report": str(report)}
