"""The es-countdown flow under Prefect's test harness: records, caching, resume, replay, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from artifacts.ledger import Ledger
from flows.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent

TINY = """
run_name: tiny
model: {{name: tiny-llama}}
lora: {{rank: 2, layers: [0, 1]}}
es: {{population: 4, sigma: 0.05, learning_rate: 0.05, generations: {generations}, seed: 3}}
data: {{train_size: 6, heldout_size: 4, prompts_per_generation: 3}}
prompt: {{style: raw}}
generation: {{max_new_tokens: 6, compile: false}}
eval: {{every: 2, base_model: true}}
"""


def tiny_config(tmp_path: Path, generations: int = 2) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(generations=generations))
    return path


def counts(data_dir: Path, run_id: str) -> dict:
    _, rows = Ledger(data_dir).query(
        "SELECT (SELECT count(*) FROM generations WHERE run_id = $1), (SELECT count(*) FROM members WHERE run_id = $1),"
        " (SELECT count(*) FROM samples WHERE run_id = $1), (SELECT count(*) FROM evals WHERE run_id = $1)",
        [run_id],
    )
    return dict(zip(["generations", "members", "samples", "evals"], rows[0]))


def test_bad_config_fails_before_any_work_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("es:\n  sigmaa: 0.1\n")
    data_dir = tmp_path / "data"
    assert cli_main(["run", "--config", str(bad), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "es.sigmaa" in err and str(bad) in err
    assert not data_dir.exists()


def test_flow_records_every_generation_member_sample_and_eval(tmp_path, prefect_harness, model_cache, monkeypatch):
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    data_dir = tmp_path / "data"
    result = es_countdown(config_path=str(tiny_config(tmp_path)), run_id="tiny-1", data_dir=str(data_dir))
    assert counts(data_dir, "tiny-1") == {"generations": 2, "members": 8, "samples": 24, "evals": 2}
    ledger = Ledger(data_dir)
    assert ledger.run_row("tiny-1")["status"] == "completed"
    assert ledger.generation_row("tiny-1", 1)["center_sha256"] == result["center_sha256"]
    assert ledger.generation_row("tiny-1", 1)["parent_center_sha256"] == ledger.generation_row("tiny-1", 0)["center_sha256"]
    _, prompts = ledger.query("SELECT DISTINCT prompt FROM samples WHERE run_id = 'tiny-1'")
    assert all(p[0].endswith("<think>") for p in prompts)
    assert Path(result["report"]).is_file() and (Path(result["report"]).parent / "reward_curve.png").is_file()


SGLANG = TINY.replace("generation: {{max_new_tokens: 6, compile: false}}", "generation: {{max_new_tokens: 24, compile: false}}\nbackend: {{kind: sglang}}")


def cli(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def generation_hashes(data_dir: Path, run_id: str) -> list[tuple]:
    _, rows = Ledger(data_dir).query("SELECT generation, parent_center_sha256, center_sha256 FROM generations WHERE run_id = ? ORDER BY generation", [run_id])
    return rows


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical_to_an_uninterrupted_run(tmp_path, model_cache, smollm2_tokenizer):
    """A run killed (SIGKILL) mid-way and resumed ends with the same centre, rows and hashes as a
    clean run; against the strict fake SGLang server, whose completions depend on the adapters'
    weights, so rewards vary and the centre really moves."""
    from tests.fake_sglang import FakeSGLang

    config = tmp_path / "sglang.yaml"
    config.write_text(SGLANG.format(generations=6))
    with FakeSGLang(max_lora_rank=8, decode=smollm2_tokenizer.decode) as fake:
        env = {**os.environ, "ES_SGLANG_URL": fake.url, "PREFECT_HOME": str(tmp_path / "prefect"), "ES_MODEL__CACHE_DIR": str(model_cache),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        clean = cli(["run", "--config", str(config), "--data-dir", str(tmp_path / "clean"), "--run-id", "r"], env, timeout=600)
        assert clean.returncode == 0, clean.stderr[-3000:]

        killed_dir = tmp_path / "killed"
        # its own process group, killed whole: Prefect's ephemeral API server is a child process that
        # a SIGKILL of the run alone leaves running (each one left slowed the next runs' server start)
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--data-dir", str(killed_dir), "--run-id", "r"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (killed_dir / "ledger.duckdb").exists() and (Ledger(killed_dir).last_generation("r") or -1) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert Ledger(killed_dir).last_generation("r") < 5

        resumed = cli(["resume", "r", "--data-dir", str(killed_dir)], env, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]

    clean_rows, resumed_rows = generation_hashes(tmp_path / "clean", "r"), generation_hashes(killed_dir, "r")
    assert len(clean_rows) == 6 and resumed_rows == clean_rows
    assert len({row[2] for row in clean_rows}) == 6  # the centre moved every generation
    assert counts(killed_dir, "r") == counts(tmp_path / "clean", "r")
    _, dupes = Ledger(killed_dir).query("SELECT count(*) - count(DISTINCT (generation, member, problem_id)) FROM samples WHERE run_id = 'r'")
    assert dupes[0][0] == 0
    assert Ledger(killed_dir).run_row("r")["status"] == "completed"


def test_replay_rebuilds_members_and_centre_from_the_ledger(tmp_path, prefect_harness, model_cache, monkeypatch, smollm2_tokenizer):
    from flows.es_countdown import es_countdown
    from flows.replay import replay
    from tests.fake_sglang import FakeSGLang

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config = tmp_path / "sglang.yaml"
    config.write_text(SGLANG.format(generations=2))
    data_dir = tmp_path / "data"
    with FakeSGLang(max_lora_rank=8, decode=smollm2_tokenizer.decode) as fake:
        monkeypatch.setenv("ES_SGLANG_URL", fake.url)
        es_countdown(config_path=str(config), run_id="rp", data_dir=str(data_dir))
        result = replay("rp", 1, str(data_dir), reevaluate=True)
        assert result["ok"], result["lines"]
        # tamper with the ledger: a recorded reward that did not produce this centre
        with duckdb.connect(str(data_dir / "ledger.duckdb")) as con:
            con.execute("UPDATE members SET reward_mean = reward_mean + 0.5 WHERE run_id = 'rp' AND generation = 1 AND member = 0")
        result = replay("rp", 1, str(data_dir))
        assert not result["ok"] and any("rebuilt new centre: NOT the hash the ledger records" in line for line in result["lines"])
        # a recorded seed the run's plan does not give
        with duckdb.connect(str(data_dir / "ledger.duckdb")) as con:
            con.execute("UPDATE members SET seed = seed + 1 WHERE run_id = 'rp' AND generation = 0 AND member = 1")
        result = replay("rp", 0, str(data_dir))
        assert not result["ok"] and any("not generation 0's plan" in line for line in result["lines"]), result["lines"]


def test_rerun_with_the_same_content_executes_no_task_body_twice(tmp_path, prefect_harness, model_cache, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config, data_dir = str(tiny_config(tmp_path)), str(tmp_path / "data")
    first = es_countdown(config_path=config, run_id="first", data_dir=data_dir)
    state = es_countdown(config_path=config, run_id="second", data_dir=data_dir, return_state=True)
    second = state.result()
    assert second["center_sha256"] == first["center_sha256"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    content_tasks = [r for r in runs if r.task_key.rsplit("-", 1)[0] in ("init_population", "write_members", "evaluate_population", "evaluate_heldout", "aggregate")]
    assert len(content_tasks) >= 2 * 3 + 1
    assert all(r.state.name == "Cached" for r in content_tasks), [(r.name, r.state.name) for r in content_tasks]
    assert counts(Path(data_dir), "second") == counts(Path(data_dir), "first")
    # the timings are this run's: the first decoded, the second decoded nothing (no negative 'other')
    _, timings = Ledger(Path(data_dir)).query("SELECT run_id, generate_seconds, wall_seconds FROM generations ORDER BY run_id, generation")
    assert all(0 < gen <= wall for run, gen, wall in timings if run == "first"), timings
    assert all(gen == 0 < wall for run, gen, wall in timings if run == "second"), timings


def test_task_runs_are_named_by_generation(tmp_path, prefect_harness, model_cache, monkeypatch):
    """The UI's task list and timeline read like the run: which generation, which held-out set."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    state = es_countdown(config_path=str(tiny_config(tmp_path)), run_id="named", data_dir=str(tmp_path / "data"), return_state=True)
    with get_client(sync_client=True) as client:
        names = {r.name for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))}
    for g in (0, 1):
        assert {f"members-g{g}", f"evaluate-g{g}", f"aggregate-g{g}", f"commit-g{g}", f"publish-g{g}"} <= names, sorted(names)
    assert {"eval-base-on-heldout", "eval-centre_g2-on-heldout", "record-eval-centre-g2-on-heldout", "record-run-named", "run-completed"} <= names, sorted(names)


def test_population_built_from_seeds_decodes_exactly_like_its_member_artifacts(tmp_path, model_cache):
    """The embedded path decodes members built in memory while `write_members` writes their files: both
    must be the same members, or the ledger's adapter hashes would name models never scored."""
    from es_core.backends.base import AdapterRef
    from es_core.backends.embedded import EmbeddedBackend
    from es_core.countdown.problems import load_problems
    from es_core.countdown.prompt import render_prompts
    from es_core.es import ask
    from es_core.evaluation import score_member
    from es_core.models import load_tokenizer, resolve_base_model
    from es_core.settings import load_settings
    from tasks.evaluate import evaluate_population
    from tasks.population import init_population, write_members

    settings = load_settings(str(tiny_config(tmp_path)), [f"data_dir={tmp_path / 'data'}", "es.sigma=0.5", "generation.max_batch_rows=6"])
    base = resolve_base_model(settings.model, model_cache)
    artifacts = str(tmp_path / "artifacts")
    center = init_population.fn(artifacts, str(base.path), base.sha256, settings.lora.layers, settings.lora.modules,
                                settings.lora.rank, settings.lora.lora_alpha, settings.lora.init_std, 3)
    plan = ask(3, 0, 4, 0.5)
    problems, _ = load_problems(settings.data)
    prompts = render_prompts(problems[:3], "raw", load_tokenizer(base.path))
    backend = EmbeddedBackend.from_settings(settings, base.path)
    try:
        from_seeds = evaluate_population.fn(backend, artifacts, center, plan, problems[:3], prompts, 6, "paper", "k")["scores"]
        files = write_members.fn(artifacts, center, plan)
        completions = backend.generate([AdapterRef(f"m{i}", Path(path)) for i, (_, path) in enumerate(files)], prompts, 6)
    finally:
        backend.close()
    from_files = [score_member(problems[:3], prompts, c) for c in completions]
    texts = [[s.completion for s in score.samples] for score in from_seeds]
    assert texts == [[s.completion for s in score.samples] for score in from_files]
    assert len({tuple(t) for t in texts}) > 1, "sigma 0.5 should make members decode differently"


def member_hashes(data_dir: Path, run_id: str) -> list[tuple]:
    _, rows = Ledger(data_dir).query("SELECT generation, member, seed, sign, adapter_sha256 FROM members WHERE run_id = ? ORDER BY 1, 2", [run_id])
    return rows


def test_a_data_dir_copied_elsewhere_resumes_to_the_hashes_of_an_uninterrupted_run(tmp_path, prefect_harness, monkeypatch):
    """Content addresses do not depend on where the data dir lives: its base model folder (under
    the data dir here, as by default) and its artifacts move with it, and the resumed run's centres
    and member adapters are those of a run that never moved."""
    import shutil

    from flows.es_countdown import es_countdown

    monkeypatch.delenv("ES_MODEL__CACHE_DIR", raising=False)  # the base model is converted under each data dir
    es_countdown(config_path=str(tiny_config(tmp_path, generations=3)), run_id="r", data_dir=str(tmp_path / "whole"))

    (tmp_path / "short").mkdir()
    es_countdown(config_path=str(tiny_config(tmp_path / "short", generations=1)), run_id="r", data_dir=str(tmp_path / "here"))
    shutil.copytree(tmp_path / "here", tmp_path / "elsewhere" / "data")
    shutil.rmtree(tmp_path / "here")  # nothing can be read from the old place
    es_countdown(run_id="r", overrides=["es.generations=3"], data_dir=str(tmp_path / "elsewhere" / "data"))

    whole, moved = generation_hashes(tmp_path / "whole", "r"), generation_hashes(tmp_path / "elsewhere" / "data", "r")
    assert len(whole) == 3 and moved == whole
    assert member_hashes(tmp_path / "elsewhere" / "data", "r") == member_hashes(tmp_path / "whole", "r")
