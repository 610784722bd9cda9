"""Checks the CLI makes before a command starts Prefect or any work: each finds in a few seconds,
with one line, what the flow would otherwise hit after minutes (a model name that resolves to
nothing after 97 s and two Prefect tracebacks; a read-only data dir after 3 minutes and 24).

Nothing here writes: the data dir is probed with a temporary file that is gone at once, and the
ledger is only read (a current schema is never migrated by a read).
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from pathlib import Path

from artifacts.commands import open_ledger
from artifacts.ledger import LEDGER_FILE, Ledger
from es_core.preflight import check_ledger_integers, check_lora_targets
from es_core.settings import ConfigError, Settings, settings_from_dict
from flows.backend import check_backend

PREFECT_FOLDER = "prefect"  # <data_dir>/prefect/prefect.db: the ephemeral API's database of this data dir


def check_settings(settings: Settings, command: str = "run", generations_done: int = 0) -> None:
    """What the run reads and writes exists and can be: the data dir (writable), the base model
    (resolvable without building it), the problem file (every record valid), the interpreter that
    launches SGLang, and with runner.kind ray, Ray itself and the cluster at runner.address; and
    what the run will meet (issue 26): integers the ledger stores, the problems it starts with,
    the device, lora.layers and lora.modules against the model's config, its peak memory, and
    the disk its generations (those after `generations_done`) will fill."""
    check_writable_data_dir(Path(settings.data_dir), f"{command} writes the ledger and artifacts there")
    if settings.model.cache_dir is not None:
        problem = _not_writable(Path(settings.model.cache_dir))
        if problem:
            raise ConfigError(f"model.cache_dir {settings.model.cache_dir} is not writable ({problem}); converted base models are kept there")
    check_backend(settings)
    from es_core.models import check_base_model  # imports torch: after the cheap checks

    check_base_model(settings.model)
    check_ledger_integers(settings)
    device = check_device(settings.model.device)
    shape = base_model_shape(settings.model)
    if shape is not None:
        check_lora_targets(shape, settings.lora.layers, settings.lora.modules, f"model {settings.model.name}")
        if settings.data.source == "generated":  # before drawing them: data.heldout_size=100000000 drew for minutes
            check_run_memory(settings, shape, device, [])
    problems = check_problems(settings)
    if shape is not None:
        check_run_memory(settings, shape, device, problems)
        check_run_disk(settings, shape, settings.es.generations - generations_done)


# --- what the run will meet: problems, model, device, memory (issue 26) ----------------------------


def check_problems(settings: Settings) -> list:
    """Every problem the run starts with: the files read (every record checked), the generated
    splits drawn, and the first batch of each generated stream the run draws later (fresh
    training problems, the warm start's), so that a shape that cannot supply them is refused now,
    in seconds, not after Prefect has started. (0.2 s at the defaults.)"""
    from es_core.countdown.problems import experiment_problems, training_batch

    train, eval_sets, held_out = experiment_problems(settings.data, settings.eval)
    if settings.data.train_problems == "fresh":
        training_batch(settings.data, train, 0, held_out)
    if settings.warm_start.steps:
        from es_core.warm_start import training_examples

        training_examples(settings.warm_start, 0, held_out)
    return [*train, *(p for problems in eval_sets.values() for p in problems)]


def check_device(device: str):
    """model.device as torch will take it, on this machine: auto, cpu, cuda or cuda:N of a GPU
    that is here. (torch.cuda.is_available and device_count do not create a CUDA context.)"""
    import re

    import torch

    from es_core.models import resolve_device

    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise ConfigError(f"model.device {device!r} is not auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device {device}: this machine has no CUDA device (use cpu or auto)")
        count = torch.cuda.device_count()
        if int(match.group(1) or 0) >= count:
            raise ConfigError(f"model.device {device}: this machine has {count} CUDA device{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})")
    return resolve_device(device)


def base_model_shape(model):
    """The base model's shape from its config alone (a preset's definition, a GGUF header, a
    folder's config.json), its folder checked for weights; None for a hub id still to download."""
    from es_core.models import PRESETS, RANDOM_INIT_KEY, _hub_folder, smollm2_gguf_path
    from es_core.preflight import ModelShape

    where = f"model.name {model.name}"
    if model.name in PRESETS:
        preset = PRESETS[model.name]
        config = dict(preset.config) if preset.kind == "random" else _gguf_config(smollm2_gguf_path(), where)
        return ModelShape.from_config(config, where)
    local = Path(model.name).expanduser()
    if local.suffix == ".gguf":
        return ModelShape.from_config(_gguf_config(local, where), where)
    if not local.exists() and not model.name.startswith((".", "/", "~")):
        if model.allow_download:
            return None
        local = _hub_folder(model.name, allow_download=False)
    try:
        config = json.loads((local / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: {local / 'config.json'} is not a readable JSON config ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: {local / 'config.json'} is not a JSON object")
    if RANDOM_INIT_KEY not in config:
        _check_weights(local, where)
    return ModelShape.from_config(config, where)


def _gguf_config(path: Path, where: str) -> dict:
    from es_core.preflight import read_gguf_config

    try:
        return read_gguf_config(path)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ConfigError(f"{where}: {path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def _check_weights(folder: Path, where: str) -> None:
    """The folder holds weights: safetensors files whose headers parse (a renamed text file does
    not), or PyTorch .bin files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files and not list(folder.glob("pytorch_model*.bin")):
        raise ConfigError(f"{where}: {folder} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
    for file in files:
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= file.stat().st_size - 8:
                    raise ValueError("header size past the end")
                json.loads(f.read(size))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: {file} is not a safetensors file ({exc})") from None


def available_memory(device) -> tuple[int, str]:
    """(bytes free, what has them): on CUDA the GPU's free memory (torch.cuda.mem_get_info, which
    creates the context the run needs anyway); on CPU MemAvailable of /proc/meminfo, less when a
    cgroup limit leaves less."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} ({torch.cuda.get_device_name(device)})"
    free = _meminfo_available()
    limit = _cgroup_room()
    if limit is not None and limit < free:
        return limit, "this machine's cgroup"
    return free, "this machine"


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_room() -> int | None:
    """What this process's memory cgroup still allows (v2, then v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def check_run_memory(settings: Settings, shape, device, problems: list) -> None:
    """The estimated peak memory of the run (es_core/preflight.py) against what the device has free.
    Only where this process holds the engine: SGLang servers and Ray engines have their own."""
    if settings.backend.kind != "embedded" or settings.runner.kind != "local":
        return
    from es_core.countdown.problems import Problem
    from es_core.countdown.prompt import user_message
    from es_core.models import resolve_dtype
    from es_core.preflight import check_memory, estimate_peak_memory

    base = len(user_message(Problem("", (1, 2), 3.0)))
    generated = Problem("", (99, 99, 99, 99), 100.0)  # the longest the generator makes (es_core.countdown.problems.ProblemShape)
    longest = max((len(user_message(p)) - base for p in problems or [generated]), default=0)
    model_bytes = resolve_dtype(settings.model.dtype, device).itemsize
    estimate = estimate_peak_memory(settings, shape, model_bytes, max(0, longest), prefect_server=_temporary_prefect_server(), on_cuda=device.type == "cuda")
    free, where = available_memory(device)
    check_memory(estimate, free, where)


def check_run_disk(settings: Settings, shape, generations: int) -> None:
    """What the generations still to run write against the free space of the data dir's disk (a run
    that fills it stops at the first artifact that does not fit, its recorded generations intact)."""
    import shutil

    from es_core.preflight import check_disk, estimate_run_disk

    free = shutil.disk_usage(_nearest_existing(Path(settings.data_dir))).free
    check_disk(estimate_run_disk(settings, shape, generations), free, f"data dir {settings.data_dir}")


def _temporary_prefect_server() -> bool:
    import os

    return "PREFECT_API_URL" not in os.environ


def resume_settings(run_id: str, overrides: list[str], data_dir: Path) -> Settings:
    """The stored settings of a recorded run under `overrides`, after the checks of a run."""
    ledger = open_ledger(data_dir)
    run = _recorded_run(run_id, data_dir, ledger)
    settings = settings_from_dict(json.loads(run["config_json"]), [*overrides, f"data_dir={data_dir}"], where=f"run {run_id}")
    last = ledger.last_generation(run_id)
    check_settings(settings, "resume", 0 if last is None else last + 1)
    return settings


def check_replay(run_id: str, generation: int, data_dir: Path) -> None:
    """The run and its generation are in the ledger (replay only reads the data dir)."""
    ledger = open_ledger(data_dir)
    _recorded_run(run_id, data_dir, ledger)
    if ledger.generation_row(run_id, generation) is None:
        raise ConfigError(f"run {run_id} has no recorded generation {generation} (last: {ledger.last_generation(run_id)})")


def check_writable_data_dir(data_dir: Path, why: str) -> None:
    problem = _not_writable(data_dir)
    for path in (data_dir / LEDGER_FILE, data_dir / PREFECT_FOLDER / "prefect.db"):
        problem = problem or _not_writable_file(path)
    if problem:
        raise ConfigError(f"data dir {data_dir} is not writable ({problem}); {why}")


def prefect_database_folder(data_dir: Path) -> Path:
    """Where the ephemeral Prefect API of a command on `data_dir` keeps its database: inside the
    data dir, or, when that cannot be written (a replay of a read-only copy), a folder of the same
    data dir under the system's temporary folder."""
    folder = data_dir / PREFECT_FOLDER
    if not (_not_writable(folder) or _not_writable_file(folder / "prefect.db")):
        return folder
    key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"es-countdown-prefect-{key}"


# --- helpers ---------------------------------------------------------------------------------------


def _recorded_run(run_id: str, data_dir: Path, ledger: Ledger | None = None) -> dict:
    ledger = ledger or open_ledger(data_dir)  # a missing data dir or ledger: the ledger commands' one line
    run = ledger.run_row(run_id)
    if run is None:
        raise ConfigError(f"run {run_id} is not in the ledger at {ledger.path}")
    return run


def _not_writable(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (if missing, it will be made: its nearest existing
    parent decides), or None. A probe file rather than os.access: what counts is whether this
    process can create a file there, whatever its uid, capabilities or mount."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing}: not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".es-countdown-probe-"):
            pass
    except OSError as exc:
        return f"{existing}: {exc.strerror}"
    return None


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (a folder still to be made is made in it)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _not_writable_file(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        with open(path, "r+b"):  # opened for writing, nothing written
            pass
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None
