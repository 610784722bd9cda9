"""The `es-countdown` flow: ES over a population of LoRA adapters on Countdown.

Each generation g (flows/generation.py): plan its members, centre_g + sigma * sign_i * eps(seed_i);
evaluate them by greedy decoding on a batch of training prompts; update the centre by their shaped
fitness; commit members, samples and the new centre to the ledger in one transaction. The host work around decoding overlaps it (flows/pipeline.py). A killed run resumes
after its last committed generation (cached task results make the redo cheap) and ends
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.utilities.annotations import quote

from artifacts.ledger import Ledger
from artifacts.retention import centres_to_restore
from artifacts.runs import DataDirWriter
from artifacts.store import ArtifactError, ArtifactStore
from es_core.countdown.problems import experiment_problems
from es_core.models import ModelError, load_tokenizer, resolve_device, resolve_dtype
from es_core.plan import generation_plan, run_space
from es_core.settings import ConfigError, Settings, load_settings
from flows.backend import LazyBackend, open_backend
from flows.crashed import mark_unfinished_task_runs_crashed
from flows.generation import ESRun, generation
from flows.pipeline import Pipeline
from flows.progress import RunProgress
from flows.recorded import recorded_settings
from flows.report import write_report
from flows.stopping import failure_reason, note_run
from tasks.common import DataDir, evaluation_key, persisted
from tasks.ledger import record_problems, record_run, record_warm_start, set_run_status
from tasks.model import prepare_base_model
from tasks.members import run_noise_layout
from tasks.population import init_population, search_description
from tasks.retention import restore_centres
from tasks.warm_start import warm_start


def new_run_id(run_name: str) -> str:
    """<run name>-<utc time>-<4 hex>, of this flow run: its creation time and id, so that a retry of
    the flow run (the UI's Retry, or Prefect restarting a crashed one) continues the same ES run
    instead of starting a second one. Outside a flow run, the time now and random hex."""
    slug = run_name_slug(run_name)
    context = FlowRunContext.get()
    flow_run = context.flow_run if context is not None else None
    if flow_run is not None and flow_run.created is not None:
        return f"{slug}-{flow_run.created.astimezone(timezone.utc):%Y%m%d-%H%M%S}-{flow_run.id.hex[:4]}"
    return f"{slug}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def run_name_slug(run_name: str) -> str:
    """The run name as the start of a run id: ASCII letters and digits (accents dropped: "Zählen"
    gives "zahlen"), '-' for the rest, at most 100 characters, so that any run name makes a valid
    run id. (A non-ASCII name used to fail the run's first ledger write; the name itself is stored
    as given, in runs.run_name.)"""
    import re
    import unicodedata

    ascii_name = unicodedata.normalize("NFKD", run_name).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name).strip("-")[:100].strip("-") or "run"


# What a new run given no config runs (a deployment run with no config_path): the paper-scale experiment.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "experiments" / "countdown_es.yaml"


def resolve_settings(config_path: str | None, overrides: list[str] | None, run_id: str | None, data_dir: str | None) -> tuple[Settings, str, bool]:
    """(settings, run_id, resuming). A recorded run id resumes with its stored settings; a config
    given with it must ask for the same, none given is no conflict. A new run reads config_path, or
    DEFAULT_CONFIG if none is given, and without a run id is named after the flow run (so that a
    retry of the flow run finds it recorded, and resumes it)."""
    where = [f"data_dir={data_dir}"] if data_dir else []
    settings = load_settings(config_path, [*(overrides or []), *where]) if config_path else None
    if run_id is None:
        settings = settings or load_settings(DEFAULT_CONFIG, [*(overrides or []), *where])
        run_id = new_run_id(settings.run_name)
    root = Path(data_dir) if data_dir else (settings or load_settings(None, where)).data_dir
    stored = Ledger(root).run_row(run_id) if (root / "ledger.duckdb").exists() else None
    if stored:
        resumed = recorded_settings(stored, root, overrides or [])  # the stored settings; ES_* that change results refused
        if config_path and settings.fingerprint() != resumed.fingerprint():
            raise ConfigError(f"run {run_id} in {root} was started with other settings than {config_path}; start a new run id")
        return resumed, run_id, True
    if settings is None:
        raise ConfigError(f"run {run_id} is not in the ledger at {root / 'ledger.duckdb'}; give a config (--config, config_path) to start it")
    return settings, run_id, False


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
    try:  # every file against its hash before ES loads it (a flipped weight decoded silently before)
        folder = store.get(row["warm_start_sha256"])
    except ArtifactError as exc:
        raise ArtifactError(f"the warm-started model: {exc}; restore it from a copy (es-countdown verify lists every damaged artifact)") from None
    record_warm_start(str(data.root), {**row, "base_model": base["name"]})
    return {"name": f"{base['name']}+warm-start-{settings.warm_start.steps}", "path": str(folder), "sha256": row["warm_start_sha256"]}


def check_recorded_base_model(ledger: Ledger, run_id: str, base: dict) -> None:
    """On a resume, the base model must hash as recorded: a local folder whose files changed is
    refused here, before a warm start is trained on it (the run row's own check comes after)."""
    recorded = ledger.run_row(run_id)
    if recorded and recorded["base_model_sha256"] and recorded["base_model_sha256"] != base["sha256"]:
        raise ModelError(f"base model {base['path']} hashes to {base['sha256'][:12]}, run {run_id} was recorded with {recorded['base_model_sha256'][:12]}: "
                         "its files changed (damaged or replaced); restore them, or start a new run id")


@flow(name="es-countdown", log_prints=True, on_crashed=[mark_unfinished_task_runs_crashed])
def es_countdown(config_path: str | None = None, overrides: list[str] | None = None, run_id: str | None = None, data_dir: str | None = None) -> dict:
    """Run (or resume) an ES experiment; returns the run id, the final centre and its held-out scores."""
    settings, run_id, resuming = resolve_settings(config_path, overrides, run_id, data_dir)
    note_run(Path(settings.data_dir), run_id)  # what a stop signal marks failed (flows/stopping.py)
    try:
        return run_experiment(settings, run_id, resuming)
    except BaseException as exc:
        # Directly in the ledger, not by a task: the Prefect API may be what failed (or died with
        # the process group on Ctrl-C). A run that fails before its row exists gets one, failed.
        try:
            Ledger(Path(settings.data_dir)).record_failure(run_id, settings.run_name, settings.model_dump_json(), settings.fingerprint(),
                                                           settings.es.seed, failure_reason(exc))
        except Exception as ledger_error:  # noqa: BLE001 - the run's own error is the one to raise
            get_run_logger().error(f"run {run_id} could not be marked failed in the ledger: {ledger_error}")
        raise


def run_experiment(settings: Settings, run_id: str, resuming: bool) -> dict:
    """The body of the flow, for resolved settings and run id."""
    data = DataDir(Path(settings.data_dir))
    data.root.mkdir(parents=True, exist_ok=True)
    # held until the run ends: gc removes nothing while a run may still commit an artifact it wrote
    with DataDirWriter(data.root):
        return _run(settings, run_id, resuming, data)


def _run(settings: Settings, run_id: str, resuming: bool, data: DataDir) -> dict:
    logger = get_run_logger()
    root, es = str(data.root), settings.es

    # --- problems, base model (warm-started), run row -------------------------------------------
    train, eval_sets, held_out_ids = experiment_problems(settings.data, settings.eval)
    record_problems(root, quote([p for problems in [train, *eval_sets.values()] for p in problems]))
    base = prepare_base_model(settings.model, str(settings.model.cache_dir or data.models))  # its files checked (es_core/models.py)
    if resuming:
        check_recorded_base_model(Ledger(data.root), run_id, base)
    model = prepare_warm_start(settings, data, base, held_out_ids) if settings.warm_start.steps else base  # what ES perturbs
    record_run(root, run_id, settings.model_dump_json(), settings.fingerprint(), settings.run_name, es.seed, base,
               model["sha256"] if model is not base else None)
    logger.info(f"run {run_id} ({'resuming' if resuming else 'new'}), ledger {data.root / 'ledger.duckdb'}")

    # generation 0's centre: LoRA factors at lora.rank, or weights space's rank-R change (scaling 1)
    rank, alpha = (es.centre_rank, float(es.centre_rank)) if es.space == "weights" else (settings.lora.rank, settings.lora.lora_alpha)
    init_sha = persisted(init_population, data)(
        str(data.artifacts), model["path"], model["sha256"], settings.lora.layers, settings.lora.modules, rank, alpha, settings.lora.init_std,
        es.seed, es.space,
    )
    ledger = Ledger(data.root)
    last = ledger.last_generation(run_id)
    start = 0 if last is None else last + 1
    centre = init_sha if last is None else ledger.generation_row(run_id, last)["center_sha256"]
    missing = centres_to_restore(ledger, ArtifactStore(data.artifacts), run_id) if last is not None else None
    if missing:  # the ledger without its centres (a lent machine gone): rebuilt from the ledger
        restore_centres(root, run_id, missing, settings.store.keep_centre_every, model["path"], init_sha)

    space = run_space(settings, model["path"])  # the LoRA factors (None) or the weights of this model
    logger.info(f"run {run_id} searches {search_description(settings, model['path'])}")
    backend = open_backend(settings, Path(model["path"]), data.run_dir(run_id), run_id)
    # the base model itself, when ES runs on a warm start: opened only if its evaluation is not cached
    base_backend = LazyBackend(lambda: open_backend(settings, Path(base["path"]), data.run_dir(run_id), f"{run_id}-base")) if model is not base else backend
    run = ESRun(settings, data, run_id, backend, evaluation_key(settings, model["sha256"]), load_tokenizer(Path(model["path"])), train,
                held_out_ids, eval_sets, space, run_noise_layout(str(data.artifacts), init_sha, generation_plan(es, start, space)),
                RunProgress(run_id, es.generations, start))
    try:
        # --- generation 0: the base model (and its warm start) on the held-out sets ----------------
        if settings.eval.base_model:
            run.heldout(0, "base", ("base", None), base_backend, evaluation_key(settings, base["sha256"]))
            if base_backend is not backend:
                base_backend.close()
        if model is not base and settings.eval.warm_start:
            run.heldout(0, "warm_start", ("warm_start", None))
        if start > 0 and run.eval_due(start):  # a kill between a commit and its evaluation
            run.heldout(start, "centre", (f"centre_g{start}", centre))

        # --- the generations: plan -> evaluate -> update -> commit (flows/generation.py) ----------------
        with Pipeline(run.plan, es.generations, logger.error) as pipeline:
            for g in range(start, es.generations):
                centre = generation(run, pipeline, g, centre)
                if run.eval_due(g + 1):
                    pipeline.settle()  # the held-out evaluation reads the ledger
                    run.heldout(g + 1, "centre", (f"centre_g{g + 1}", centre))
    finally:
        backend.close()
        if base_backend is not backend:
            base_backend.close()

    set_run_status(root, run_id, "completed")
    report = write_report(ledger, run_id, data.run_dir(run_id), data.root / "ledger.duckdb")
    run.progress.finish(report)
    return {"run_id": run_id, "center_sha256": centre, "generations": es.generations, "report": str(report)}
