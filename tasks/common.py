"""What every task shares: where a run's files live and how results are cached.

Cache keys are content: the task's inputs, which are artifact hashes, seeds and settings values
(never tensors or models), the task's own source, and `code_version()`, the source of everything a
task calls, so a fix in es_core/es.py or the reward invalidates cached rewards and updates (Prefect's
TASK_SOURCE hashes the task's body only). What decides how the model decodes (dtype and device as
resolved, compile, backend) enters the evaluation tasks as `model_key` (`evaluation_key`).
Engines and servers travel as `backend`, the event of a generation's decoding having started as
`decoding` (the evaluation sets it, background work waits for it: flows/pipeline.py), and the
generation's members built once for all its tasks (tasks/members.py) as `members`: all excluded
from the key.
Results persist under the data dir, so a re-run or a resume skips finished work. (Prefect's
DEFAULT policy keys on the flow run id, which a re-run does not share.)
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
from collections import ChainMap
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import cloudpickle
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.serializers import PickleSerializer
from pydantic import Field

from artifacts.runs import check_run_id
from es_core.evaluation import MemberScore, SampleScore

# The packages whose code a task calls, and the libraries whose versions change what it computes.
CODE_PACKAGES = ("es_core", "artifacts", "tasks")
CODE_LIBRARIES = ("torch", "numpy", "transformers", "safetensors")


def source_hash(packages: tuple[str, ...] = CODE_PACKAGES, libraries: tuple[str, ...] = CODE_LIBRARIES) -> str:
    """sha256 over every .py file of `packages` (as found on sys.path; by path relative to the
    package's parent, so a checkout's location does not matter) and the installed versions of
    `libraries`. Uncached: `code_version()` is this, once per process."""
    h = hashlib.sha256()
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"code_version: package {package} not found")
        folder = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(folder.rglob("*.py")):
            h.update(f"{package}/{path.relative_to(folder).as_posix()}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    for library in libraries:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{library}=={version}\n".encode())
    return h.hexdigest()


@functools.cache
def code_version() -> str:
    """The version of the code a task calls, for cache keys: sha256 of the source files of es_core,
    artifacts and tasks (every .py file) and of the torch, numpy, transformers and safetensors
    versions. Computed once per process (tens of ms). CONTENT_CACHE includes it; a task with its
    own cache policy should too (`+ CODE_VERSION`), or key on `code_version()` directly."""
    return source_hash()


@dataclass
class _CodeVersion(CachePolicy):
    """A cache policy whose key is code_version(): added to a task's policy, any change to the code
    it calls misses the cache."""

    def compute_key(self, task_ctx, inputs: Optional[dict[str, Any]], flow_parameters: Optional[dict[str, Any]], **kwargs: Any) -> Optional[str]:
        return code_version()


CODE_VERSION = _CodeVersion()
CONTENT_CACHE = (INPUTS - "backend" - "decoding" - "members") + TASK_SOURCE + CODE_VERSION
NO_CACHE = NO_CACHE


def evaluation_key(settings, base_model_sha256: str) -> str:
    """What decides how a backend decodes, as the evaluation tasks' `model_key`: the base model's
    hash, the backend, the prompt style, compile and batch rows (a batch's shape can change bf16
    results), and what the backend itself names (`decode_key`: for the embedded engine the dtype
    and device as they resolve on this machine, `auto` being bf16 on CUDA and float32 on CPU, a GPU
    by its name, and the dtype of its LoRA slots; on a Ray cluster as they resolve in its engines, and
    how many; for SGLang the dtype asked of the server and its
    LoRA kernels and extra arguments). JSON, so the Prefect UI shows it."""
    from es_core.backends import backend_class, backend_kind

    key: dict[str, Any] = {
        "base_model_sha256": base_model_sha256, "backend": settings.backend.kind, "prompt_style": settings.prompt.style,
        "compile": settings.generation.compile, "max_batch_rows": settings.generation.max_batch_rows,
    }
    key |= backend_class(backend_kind(settings)).decode_key(settings)
    return json.dumps(key, sort_keys=True)


@dataclass(frozen=True)
class DataDir:
    """The layout of one data dir: ledger, artifacts, converted models, cached task results."""

    root: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def task_results(self) -> Path:
        return self.root / "task-results"

    def run_dir(self, run_id: str) -> Path:
        """A run's own files: report, reward curve, SGLang server logs."""
        path = self.root / "reports" / check_run_id(run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def result_storage(self) -> Path:
        # a Path is a local result store Prefect needs no saved block for
        self.task_results.mkdir(parents=True, exist_ok=True)
        return self.task_results


_SAMPLE_FIELDS = tuple(f.name for f in fields(SampleScore))


def _member_score_columns(score: MemberScore):
    """A member's scores as columns of plain values: cloudpickle's Python hook runs once per
    object, so a population's 1,024 samples as objects took 12 ms of each generation on a 2-core
    machine, as columns 2 ms (and each prompt text is stored once)."""
    columns = [[getattr(s, f) for s in score.samples] for f in _SAMPLE_FIELDS]
    return _member_score_from_columns, (score.reward_mean, score.format_rate, score.accuracy, score.tokens, columns, score.server)


def _member_score_from_columns(reward_mean, format_rate, accuracy, tokens, columns: list[list], server: str) -> MemberScore:
    samples = tuple(SampleScore(*values) for values in zip(*columns)) if columns and columns[0] else ()
    return MemberScore(reward_mean, format_rate, accuracy, tokens, samples, server)


class _ResultPickler(cloudpickle.Pickler):
    """cloudpickle, with evaluation results stored as columns."""

    dispatch_table = ChainMap({MemberScore: _member_score_columns}, cloudpickle.Pickler.dispatch_table)


class OneLinePickleSerializer(PickleSerializer):
    """Prefect's pickle serializer for task results, with evaluation scores pickled as columns and
    its base64 done in one call: `base64.encodebytes` loops in Python over 57-byte lines, 10 ms per
    population result (1,024 completions) on the GPU machine, on the path between two generations.
    Its output is read back by PickleSerializer's `loads`."""

    type: str = Field(default="es-pickle", frozen=True)

    def dumps(self, obj) -> bytes:
        with io.BytesIO() as buffer:
            _ResultPickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
            return base64.b64encode(buffer.getvalue())


def persisted(task, data_dir: DataDir):
    """The task with its results written under this data dir."""
    return task.with_options(result_storage=data_dir.result_storage(), persist_result=True, result_serializer=OneLinePickleSerializer())


def retry_on(retried: tuple[type[BaseException], ...], final: tuple[type[BaseException], ...] = ()):
    """A task's retry_condition_fn: retry a run that failed with one of `retried`, unless it is also
    one of `final` (a refusal that a retry would only repeat)."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except final:
            return False
        except retried:
            return True
        except BaseException:  # noqa: BLE001 - neither: not retried
            return False
        return False

    return condition


def wait_for_decoding(decoding) -> None:
    """Background work starts once the GPU is decoding (flows/pipeline.py): before that it would
    take the GIL from the short CPU steps that decoding waits on."""
    if decoding is not None:
        decoding.wait()
