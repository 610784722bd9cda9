"""Task cache keys cover everything that changes a result: the evaluation's model key (dtype,
device, compile, backend, ...), the version of the code a task calls, and its inputs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow, task

from es_core.settings import load_settings
from tasks import common
from tasks.common import CODE_PACKAGES, CONTENT_CACHE, DataDir, code_version, evaluation_key, persisted

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("change", [
    "model.dtype=bfloat16", "model.dtype=float16", "model.device=cuda", "generation.compile=false", "backend.kind=sglang",
    "generation.max_batch_rows=64", "prompt.style=raw", "generation.lora_dtype=model", "runner.kind=ray",
])
def test_every_setting_that_changes_decoding_changes_the_model_key(change):
    base = evaluation_key(load_settings(None, ["model.device=cpu"]), "b" * 64)
    assert evaluation_key(load_settings(None, ["model.device=cpu", change]), "b" * 64) != base
    assert evaluation_key(load_settings(None, ["model.device=cpu"]), "c" * 64) != base  # the base model's hash


def test_the_model_key_is_what_the_settings_resolve_to_on_this_machine():
    on_cpu = load_settings(None, ["model.device=cpu"])
    # dtype auto is float32 on the CPU: the same decoding, the same key
    assert evaluation_key(on_cpu, "b" * 64) == evaluation_key(load_settings(None, ["model.device=cpu", "model.dtype=float32"]), "b" * 64)
    sglang = ["backend.kind=sglang"]
    assert evaluation_key(load_settings(None, sglang), "b" * 64) != evaluation_key(load_settings(None, [*sglang, "backend.sglang.lora_backend=triton"]), "b" * 64)
    assert evaluation_key(load_settings(None, sglang), "b" * 64) != evaluation_key(load_settings(None, [*sglang, "model.dtype=float16"]), "b" * 64)
    # on a Ray cluster, the device and dtype the engines get (a GPU each), and how they are split
    ray = ["model.device=cpu", "runner.kind=ray"]
    assert '"device": "cuda"' in evaluation_key(load_settings(None, ray), "b" * 64)
    assert evaluation_key(load_settings(None, ray), "b" * 64) != evaluation_key(load_settings(None, [*ray, "runner.engines=2"]), "b" * 64)
    assert evaluation_key(load_settings(None, [*ray, "runner.gpus_per_engine=0"]), "b" * 64) != evaluation_key(load_settings(None, ray), "b" * 64)
    assert evaluation_key(load_settings(None, [*ray, "generation.lora_dtype=model"]), "b" * 64) != evaluation_key(load_settings(None, ray), "b" * 64)


_CODE_VERSION = """
import sys
sys.path.insert(0, sys.argv[1])
from tasks.common import code_version
print(code_version())
"""


def test_code_version_changes_with_any_source_file_and_not_with_the_checkouts_place(tmp_path):
    copy = tmp_path / "elsewhere"
    for package in CODE_PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))

    def version_of(root: Path) -> str:
        run = subprocess.run([sys.executable, "-c", _CODE_VERSION, str(root)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.strip()

    assert version_of(copy) == code_version()  # the same files elsewhere: the same version
    for source in ("es_core/es.py", "es_core/countdown/reward.py", "artifacts/checkpoints.py"):
        path = copy / source
        original = path.read_bytes()
        path.write_bytes(original + b"\n# a fix\n")
        assert version_of(copy) != code_version(), source
        path.write_bytes(original)


@task(cache_policy=CONTENT_CACHE)
def _doubled(x: int, model_key: str) -> int:
    return 2 * x


def test_a_changed_model_key_or_code_version_misses_the_cache(tmp_path, prefect_harness, monkeypatch):
    cached_task = persisted(_doubled, DataDir(tmp_path))

    @flow
    def once(model_key: str) -> str:
        return cached_task(3, model_key, return_state=True).name

    assert once("float32") == "Completed"
    assert once("float32") == "Cached"
    assert once("bfloat16") == "Completed"
    monkeypatch.setattr(common, "code_version", lambda: "another version of es_core/es.py")
    assert once("float32") == "Completed"
    assert once("float32") == "Cached"


def test_a_bfloat16_run_does_not_reuse_a_float32_runs_evaluations(tmp_path, prefect_harness, model_cache, monkeypatch):
    """The issue's case: two runs in one data dir, model.dtype float32 then bfloat16. Every
    evaluation of the second is computed, none taken from the first's cache."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.es_countdown import es_countdown
    from tests.test_pipeline import tiny_config

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config, data_dir = str(tiny_config(tmp_path)), str(tmp_path / "data")
    es_countdown(config_path=config, overrides=["model.dtype=float32"], run_id="f32", data_dir=data_dir)
    state = es_countdown(config_path=config, overrides=["model.dtype=bfloat16"], run_id="bf16", data_dir=data_dir, return_state=True)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    evaluations = [(r.name, r.state.name) for r in runs if r.task_key.rsplit("-", 1)[0] in ("evaluate_population", "evaluate_heldout")]
    assert len(evaluations) == 2 + 2  # two generations, the base model and the final centre
    assert all(state_name == "Completed" for _, state_name in evaluations), evaluations
