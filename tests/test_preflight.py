"""What a run will meet is checked before Prefect starts (issue 26): integers the ledger stores, the
device, the model's folder and its layers and modules, problem generation that cannot finish, and
the run's peak memory against what the machine has. Each is one line, exit 2, in seconds, with
nothing written. Also: a run that fails in the flow is recorded failed with its reason, and a run
stopped by SIGTERM or Ctrl-C ends in seconds with its committed generations intact."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from artifacts.ledger import Ledger
from artifacts.runs import check_run_id
from es_core.preflight import GiB, ModelShape, estimate_peak_memory, read_gguf_config
from es_core.settings import load_settings
from flows.cli import main as cli_main
from tests.test_bad_input import SMOKE, TINY, one_line_error

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_flow(monkeypatch, request):
    """The flow module replaced by one that stops at once: a check that fails to stop a run must
    not start one (lora.rank=1000000 would take the machine's memory)."""
    if "slow" not in request.keywords and "non_ascii" not in request.node.name:
        monkeypatch.setitem(sys.modules, "flows.es_countdown", types.SimpleNamespace(es_countdown=flow_started))


class FlowStarted(BaseException):
    pass


def flow_started(**kwargs):
    raise FlowStarted(kwargs)


def run_tiny(capsys, tmp_path, *sets: str, config_text: str = TINY) -> str:
    """`es-countdown run` of the tiny config under `sets`: its one-line error, after checking that
    it came in seconds with exit 2 and made nothing."""
    config = tmp_path / "tiny.yaml"
    config.write_text(config_text)
    data_dir = tmp_path / "data"
    argv = ["run", "--config", str(config), "--data-dir", str(data_dir)]
    for item in sets:
        argv += ["--set", item]
    started = time.perf_counter()
    assert cli_main(argv) == 2
    assert time.perf_counter() - started < 30  # seconds (the model check imports torch); was minutes, or never
    assert not data_dir.exists()
    return one_line_error(capsys)


# --- settings the ledger, the device or the model cannot take --------------------------------------


@pytest.mark.parametrize("sets, message", [
    # each was found only after Prefect and the flow had started, the run row left `running`
    (["es.seed=9223372036854775808"], "es.seed 9223372036854775808 is above 9,223,372,036,854,775,807, the largest the ledger stores (runs.seed BIGINT)"),
    (["es.generations=2147483648"], "es.generations 2147483648 is above 2,147,483,647, the largest the ledger stores (generations.generation INTEGER)"),
    (["model.device=tpu"], "model.device 'tpu' is not auto, cpu, cuda or cuda:N"),
    (["model.device=cuda:banana"], "model.device 'cuda:banana' is not auto, cpu, cuda or cuda:N"),
    (["lora.layers=[0, 12]"], "lora.layers [12] are not layers of model tiny-llama: it has 12 (0..11)"),
    (["lora.layers=[-1]"], "lora.layers [-1] are not layers of model tiny-llama: it has 12 (0..11)"),
    (["lora.modules=[q_proj, qkv_proj]"], "lora.modules ['qkv_proj'] are not Linears of model tiny-llama's layers (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
    (["warm_start.steps=1", "warm_start.max_number=1"],
     "warm_start.batch_size 128: 128 distinct problems asked, 7 found before 50,000 draws in a row gave no new one"),
])
def test_settings_the_run_cannot_use_stop_before_prefect(tmp_path, capsys, sets, message):
    assert message in run_tiny(capsys, tmp_path, *sets)


def test_a_gpu_that_is_not_here_is_named(tmp_path, capsys):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    error = run_tiny(capsys, tmp_path, f"model.device=cuda:{count}")
    if count:
        assert f"model.device cuda:{count}: this machine has {count} CUDA device" in error
    else:
        assert f"model.device cuda:{count}: this machine has no CUDA device (use cpu or auto)" in error


def fake_model(folder: Path, config: dict | str, weights: bytes | None) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100}


@pytest.mark.parametrize("config, weights, message", [
    ("{not json", b"", "config.json is not a readable JSON config (JSONDecodeError)"),
    ("[1, 2]", b"", "config.json is not a JSON object"),
    (LLAMA, None, "has a config.json but no weights (*.safetensors or pytorch_model*.bin)"),
    (LLAMA, b"this is not a safetensors file", "model.safetensors is not a safetensors file"),
    ({"model_type": "llama"}, b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "the model's config has no num_attention_heads"),
])
def test_a_fake_model_folder_is_refused_before_prefect(tmp_path, capsys, config, weights, message):
    folder = fake_model(tmp_path / "model", config, weights)
    assert message in run_tiny(capsys, tmp_path, f"model.name={folder}", "lora.layers=[0]")


def test_a_gguf_header_gives_the_model_shape(smollm2_gguf):
    started = time.perf_counter()
    shape = ModelShape.from_config(read_gguf_config(smollm2_gguf), "smollm2")
    assert time.perf_counter() - started < 2  # gguf's own reader took 16 s
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab, shape.tied) == \
        (30, 576, 1536, 9, 3, 64, 49152, True)
    assert shape.parameters() == 134_515_008  # SmolLM2-135M's parameter count


def test_a_non_ascii_run_name_is_kept_and_makes_a_valid_run_id(tmp_path):
    from flows.es_countdown import new_run_id

    # was: the slug kept non-ASCII letters and the run failed at its first ledger write
    for name in ["Versuch über Zählen", "実験", "x" * 1000, "../../etc"]:
        check_run_id(new_run_id(name))
    assert new_run_id("Versuch über Zählen").startswith("versuch-uber-zahlen-")
    ledger = Ledger(tmp_path)
    ledger.record_run("r1", "Versuch über Zählen 実験", "{}", "s" * 64, "/m", "b" * 64, 0)
    assert ledger.run_row("r1")["run_name"] == "Versuch über Zählen 実験"


# --- memory --------------------------------------------------------------------------------------


def test_a_run_that_cannot_fit_in_memory_names_the_setting_to_lower(tmp_path, capsys):
    # was: killed by the kernel (exit 137), no message, the run row left `running`
    error = run_tiny(capsys, tmp_path, "lora.rank=1000000")
    assert "the run needs about " in error and error.endswith("lower es.population (4) or lora.rank (1000000)")
    error = run_tiny(capsys, tmp_path, "generation.max_batch_rows=100000", "es.population=1000", "data.prompts_per_generation=6",
                     "generation.max_new_tokens=100000")
    assert error.endswith("lower generation.max_batch_rows (100000) or generation.max_new_tokens (100000)")
    # was: minutes drawing a hundred million problems (and their memory), before anything else
    assert run_tiny(capsys, tmp_path, "data.heldout_size=100000000").endswith("lower data.train_size (6) or data.heldout_size (100000000)")


def smollm2_shape() -> ModelShape:
    return ModelShape("llama", 30, 576, 1536, 9, 3, 64, 49152, True, False)


def test_the_default_settings_are_estimated_past_the_24_gib_that_killed_them():
    settings = load_settings(None, [])
    estimate = estimate_peak_memory(settings, smollm2_shape(), 4, 10, prefect_server=True, on_cuda=False)
    assert estimate.total > 24 * GiB and estimate.largest() == "KV cache"
    # 1,000 rows (5 members x 200 prompts of 1,024 at most) x 1,216 slots x 30 layers x 2 (k, v) x 3 heads x 64 x 4 bytes
    assert abs(estimate.parts["KV cache"] - 1000 * 1216 * 30 * 2 * 3 * 64 * 4) < 2**24
    smoke = estimate_peak_memory(load_settings(SMOKE, []), smollm2_shape(), 4, 10, prefect_server=True, on_cuda=False)
    assert smoke.total < 8 * GiB  # the smoke run goes on a laptop


def test_a_run_whose_generations_cannot_fit_the_disk_is_refused_naming_what_fills_it(tmp_path, capsys):
    # an exact weights-space centre is the size of the weights it covers, every generation
    error = run_tiny(capsys, tmp_path, "es.space=weights", "es.centre_rank=1024", "es.generations=100000000")
    assert error.startswith("es-countdown: error: the run writes about ") and "100000000 generations of " in error and "data dir " in error
    assert error.endswith("lower es.generations (resume continues a run), es.centre_rank or lora.rank, keep fewer centres (store.keep_centre_every K), "
                          "or free space (es-countdown gc)")


def shape_targets(shape: ModelShape, modules) -> list:
    """Every `modules` Linear of every layer of a model of this shape, as find_targets names them."""
    from es_core.lora import LoRATarget

    return [LoRATarget(f"model.layers.{layer}.{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{m}", layer, m, i, o)
            for layer in range(shape.layers) for m, (i, o) in shape.linears().items() if m in modules]


def on_disk(store, sha: str) -> int:
    """The blocks an artifact takes: its folder, its files and its manifest."""
    folder = store.path(sha)
    paths = [folder, *folder.iterdir(), folder.with_name(sha + ".manifest")]
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def test_the_disk_estimate_is_the_size_of_the_artifacts_a_generation_writes():
    """At SmolLM2's shapes, every layer, R 576, the centre is the change of every matrix in float32
    (425 MB; as exact factors it was 703 MB) and a member a block-sized record."""
    from es_core.preflight import BLOCK, estimate_run_disk

    settings = load_settings(None, ["es.space=weights", "es.centre_rank=576", "es.population=4", "lora.layers=all"])
    shape = smollm2_shape()
    estimate = estimate_run_disk(settings, shape, 10)
    dense = sum(t.in_features * t.out_features * 4 for t in shape_targets(shape, settings.lora.modules))
    assert dense == 424_673_280 and dense < estimate.centre < dense + 2**20
    assert estimate.members == 4 * 3 * BLOCK  # a record, its folder, its manifest
    relative = estimate_run_disk(load_settings(None, ["es.space=weights", "es.centre_rank=576", "es.population=4", "lora.layers=all",
                                                      "es.sigma_scale=weight_rms"]), shape, 10)
    assert relative.members == 4 * 4 * BLOCK  # 210 sigma scales: a record of 4.3 kB, two blocks
    assert estimate.total == estimate.once + 10 * (estimate.centre + estimate.members + estimate.completions) and estimate.served == 0


def test_on_sglang_the_disk_estimate_holds_one_generations_members_joined_to_their_centre():
    """SGLang loads each weights-space member as one adapter of rank R + r, written while its
    generation decodes and deleted after it: at SmolLM2's shapes, every layer, R 576, 705 MB a member,
    361 GB for 512, counted once beside what the generations keep, and the PEFT folder of the centre
    a held-out evaluation loads (703 MB); a run that cannot hold them is refused in one line naming
    them. The embedded engine decodes them and the centre from memory: nothing."""
    from es_core.preflight import check_disk, estimate_run_disk
    from es_core.settings import ConfigError

    every_layer = ["es.space=weights", "es.centre_rank=576", "es.population=512", "lora.layers=all"]
    shape = smollm2_shape()
    embedded = estimate_run_disk(load_settings(None, every_layer), shape, 10)
    sglang = estimate_run_disk(load_settings(None, [*every_layer, "backend.kind=sglang"]), shape, 10)
    joined = 577 * sum((t.in_features + t.out_features) * 4 for t in shape_targets(shape, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    assert joined == 704_586_240 and 512 * joined < sglang.served < 512 * (joined + 2**20)
    centre_folder = 576 * sum((t.in_features + t.out_features) * 4 for t in shape_targets(shape, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    assert embedded.once == shape.parameters() * 2  # the base model; the centre's held-out evaluation writes no folder
    assert centre_folder < sglang.once - embedded.once < centre_folder + 2**20  # SGLang loads it from one (703 MB)
    assert embedded.served == 0 and sglang.total == embedded.total + (sglang.once - embedded.once) + sglang.served
    assert estimate_run_disk(load_settings(None, [*every_layer, "backend.kind=sglang"]), shape, 0).served == 0  # no generation left to decode
    check_disk(embedded, 100 * GiB, "data dir /d")  # 10 generations of 831 MiB fit
    with pytest.raises(ConfigError) as refused:
        check_disk(sglang, 100 * GiB, "data dir /d")
    error = str(refused.value)
    assert "\n" not in error and error.startswith("the run writes about 345.0 GiB (10 generations of 831 MiB: ")
    assert "; and 336.0 GiB while a generation decodes: its members joined to their centre for SGLang, deleted after it), data dir /d has 100.0 GiB free" in error
    assert error.endswith("lower es.generations (resume continues a run), es.centre_rank, lora.rank or es.population, "
                          "keep fewer centres (store.keep_centre_every K), or free space (es-countdown gc)")


@pytest.mark.parametrize("space", ["weights", "weights_rms", "lora_adam"])
def test_the_disk_estimate_bounds_what_a_generation_stores(tmp_path, space):
    """Real artifacts of a generation (its centre and its members' files, written by the run's code)
    at a small shape take at most what the estimate says, and not much less: weights space at R 32
    (k_proj and v_proj exact, the other matrices truncated), with absolute and relative sigma (on
    SGLang, with the scratch stores it loads a generation's members and a held-out centre from);
    LoRA space at rank 4 with Adam's moments beside the centre."""
    from artifacts.checkpoints import adapter_folder, put_checkpoint
    from artifacts.store import ArtifactStore
    from es_core.es import ESState, ask
    from es_core.lora import init_centre, spec_from_tensors
    from es_core.preflight import BLOCK, estimate_run_disk
    from es_core.weights_space import WeightsSpace, tell, zero_centre
    from tasks.members import GenerationMembers

    if os.statvfs(tmp_path).f_frsize > BLOCK:
        pytest.skip(f"{tmp_path} allocates {os.statvfs(tmp_path).f_frsize} bytes a block; the estimate assumes {BLOCK}")
    shape = ModelShape("llama", 2, 64, 128, 4, 2, 16, 1000, True, False)  # tiny-llama's matrices: k_proj, v_proj 64 -> 32
    sets = {"weights": ["es.space=weights", "es.centre_rank=32"], "weights_rms": ["es.space=weights", "es.centre_rank=32", "es.sigma_scale=weight_rms"],
            "lora_adam": ["lora.rank=4", "es.optimizer=adam"]}[space]
    settings = load_settings(None, [*sets, "es.population=4", "lora.layers=all"])
    targets = shape_targets(shape, settings.lora.modules)
    store = ArtifactStore(tmp_path / "artifacts")
    if space == "lora_adam":
        centre = init_centre(targets, 4, seed=0)
        moments = {k: torch.ones_like(v) for k, v in centre.items()}
        state, plan = ESState(centre, 1, moments, moments, 1), ask(0, 1, 4, 0.05)
    else:
        scales = tuple((t.key_a, 0.1 + i / 100) for i, t in enumerate(sorted(targets, key=lambda t: t.key_a))) if space == "weights_rms" else ()
        weights_space = WeightsSpace(1, 32, scales)
        zero = zero_centre(targets, 32)
        drawn = weights_space.draw(ask(0, 0, 4, 0.05, space=weights_space), weights_space.noise_layout(zero))
        centre = tell(zero, weights_space.layout(zero), drawn.noise, drawn.plan.members, [1.0, -1.0, 0.5, -0.5], 0.1).centre
        state, plan = ESState(centre, 1), ask(0, 1, 4, 0.05, space=weights_space)
    sha = put_checkpoint(store, state, spec_from_tensors(centre, 32.0 if space != "lora_adam" else 8.0)).sha256
    generation = GenerationMembers(str(store.root), sha, plan)
    members = sum(on_disk(store, ref.sha256) for ref in generation.adapter_files())
    estimate = estimate_run_disk(settings, shape, 1)
    assert on_disk(store, sha) <= estimate.centre <= on_disk(store, sha) + 4 * BLOCK, (on_disk(store, sha), estimate.centre)
    assert members <= estimate.members <= members + 4 * 2 * BLOCK, (members, estimate.members)
    if space != "lora_adam":  # SGLang decodes the members joined to their centre, from a scratch store of their generation
        with generation.serving():
            scratch = generation.adapters()[0].path.parents[1]
            served = sum(p.lstat().st_blocks * 512 for p in [scratch, *scratch.rglob("*")])
        sglang = estimate_run_disk(load_settings(None, [*sets, "es.population=4", "lora.layers=all", "backend.kind=sglang"]), shape, 1)
        assert served <= sglang.served <= served + 8 * BLOCK, (served, sglang.served)
        with store.scratch() as scratch:  # and a held-out evaluation loads the centre from its PEFT folder (the embedded engine: from memory)
            held_out = on_disk(scratch, adapter_folder(store, sha, scratch).name)
        assert held_out <= sglang.once - estimate.once <= held_out + 4 * BLOCK, (held_out, sglang.once - estimate.once)
        assert (estimate.served, sglang.total - sglang.served - sglang.once) == (0, estimate.total - estimate.once)


# --- the flow: a run that fails is recorded failed, with why ----------------------------------------


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_generation_is_recorded_failed(tmp_path, prefect_harness, model_cache, monkeypatch):
    from flows.es_countdown import es_countdown

    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    data_dir = tmp_path / "data"
    # the flow called without the CLI's checks (a deployment run): the layers fail as the population is built
    with pytest.raises(Exception, match="lora.layers"):
        es_countdown(config_path=str(config), overrides=["lora.layers=[0, 40]"], run_id="bad-layers", data_dir=str(data_dir))
    row = Ledger(data_dir).run_row("bad-layers")
    assert row["status"] == "failed" and "lora.layers [40] do not exist" in row["status_reason"]  # was: `running`, no reason
    # before the run row exists (the warm start's problems): a failed row all the same
    with pytest.raises(Exception, match="warm_start.batch_size"):
        es_countdown(config_path=str(config), overrides=["warm_start.steps=1", "warm_start.max_number=1"], run_id="bad-shape", data_dir=str(data_dir))
    row = Ledger(data_dir).run_row("bad-shape")
    assert row["status"] == "failed" and row["status_reason"].startswith("ShapeExhausted: warm_start.batch_size 128: ")


# --- SIGTERM and Ctrl-C ----------------------------------------------------------------------------


def cli_env(tmp_path: Path, model_cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", ES_MODEL__CACHE_DIR=str(model_cache),
               OMP_NUM_THREADS="1")
    return env


def wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        assert process.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} in {timeout} s: {path.read_text(errors='replace')[-3000:]}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def centres(data_dir: Path, run_id: str) -> list[tuple]:
    return Ledger(data_dir).query(f"SELECT generation, center_sha256 FROM generations WHERE run_id = '{run_id}' ORDER BY generation")[1]


@pytest.mark.slow
@pytest.mark.parametrize("signum, whom", [(signal.SIGTERM, "group"), (signal.SIGINT, "group"), (signal.SIGTERM, "process")])
def test_a_signal_stops_the_run_in_seconds_and_resume_completes_it(tmp_path, model_cache, signum, whom):
    """As `timeout` and a terminal's Ctrl-C do, the signal goes to the whole process group (the
    temporary Prefect server dies with the run); `kill PID` signals the run alone."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("generations: 2", "generations: 40").replace("max_new_tokens: 6", "max_new_tokens: 48"))
    data_dir, log = tmp_path / "data", tmp_path / "run.log"
    env = cli_env(tmp_path, model_cache)
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--data-dir", str(data_dir), "--run-id", "r"],
                               cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_line(log, "gen 2/40", run, timeout=300)  # two generations committed, the third decoding
        sent = time.monotonic()
        os.killpg(run.pid, signum) if whom == "group" else os.kill(run.pid, signum)
        run.wait(timeout=60)
        stopped = time.monotonic() - sent
        deadline = time.monotonic() + 10
        while group_alive(run.pid) and time.monotonic() < deadline:  # the temporary server: stopped, not orphaned
            time.sleep(0.2)
        left = group_alive(run.pid)
    finally:
        if run.poll() is None or group_alive(run.pid):
            os.killpg(run.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    # was: 150 s after `timeout`'s SIGTERM (Prefect's client retrying a dead server), or an orphaned server
    assert stopped < 20, text[-3000:]
    assert run.returncode == 128 + signum, text[-3000:]
    assert not left, "a process of the run outlived it"
    assert f"stopped by {signal.Signals(signum).name}" in text
    row = Ledger(data_dir).run_row("r")
    assert row["status"] == "failed" and row["status_reason"] == f"stopped by {signal.Signals(signum).name}"
    done = centres(data_dir, "r")
    assert len(done) >= 2

    # resume to 4 generations: the same centres as a run never stopped
    resumed = subprocess.run([sys.executable, "-m", "flows.cli", "resume", "r", "--set", "es.generations=4", "--data-dir", str(data_dir)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert centres(data_dir, "r")[: len(done)] == done  # nothing committed was changed
    assert Ledger(data_dir).run_row("r")["status"] == "completed" and Ledger(data_dir).run_row("r")["status_reason"] is None
    straight = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--set", "es.generations=4",
                               "--data-dir", str(tmp_path / "straight"), "--run-id", "s"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert [c for _, c in centres(data_dir, "r")] == [c for _, c in centres(tmp_path / "straight", "s")][: len(centres(data_dir, "r"))]
