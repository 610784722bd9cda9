"""The Ray runner: embedded engines in Ray actors give the local engine's completions, survive an
engine killed or frozen mid-generation, and fail in one line when no cluster answers.

Two kinds of cluster, both of 2 CPUs on this machine and on the loopback address only: a head
started with `ray start --head` that tests attach to by `runner.address` (a module fixture), and the
local cluster a run starts itself when `runner.address` is empty (the flow test)."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

# Every Ray process of these tests on 127.0.0.1 (a single-node cluster, as Ray runs on macOS), with
# token authentication (Ray's default for local clusters since 2.59) by a token of their own, never
# the one `ray.init` would write to ~/.ray: read when ray is imported, inherited by `ray start`,
# the workers and child processes.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]' (scripts/install.sh does)")

from artifacts.ledger import Ledger  # noqa: E402
from es_core.backends.base import AdapterRef, BackendError  # noqa: E402
from es_core.backends.embedded import EmbeddedBackend  # noqa: E402
from es_core.backends.ray_engines import RayBackend, _one_layout, connect  # noqa: E402
from es_core.lora import AdapterError, StackedLoRA, save_adapter, spec_from_tensors  # noqa: E402
from es_core.models import resolve_base_model  # noqa: E402
from es_core.settings import ModelSettings, settings_from_dict  # noqa: E402
from flows.cli import main as cli_main  # noqa: E402
from tests.test_pipeline import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Using the numbers [3, 4, 5], create an equation that equals 12. <think>", "hello there", "a b c d e f g h"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` with 2 CPUs on 127.0.0.1, in its own process group (killed whole at the
    end: never `ray stop`, which would stop every Ray cluster of the machine)."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
           "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"ray start exited: {log.read_text()[-2000:]}"
            assert time.time() < deadline, f"ray start not up in 120 s: {log.read_text()[-2000:]}"
            if "Ray runtime started" in log.read_text():
                break
            time.sleep(0.5)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)  # the group of `ray start` (its GCS, raylet and workers)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def tiny_path(model_cache) -> Path:
    return resolve_base_model(ModelSettings(name="tiny-llama"), model_cache).path


def tiny_settings(**runner):
    return settings_from_dict({"model": {"name": "tiny-llama", "device": "cpu"}, "lora": {"rank": 2, "layers": [0, 1]},
                               "generation": {"compile": False}, "runner": {"kind": "ray", "gpus_per_engine": 0, "engines": 2, **runner}})


@pytest.fixture(scope="module")
def local_engine(tiny_path):
    backend = EmbeddedBackend.from_settings(tiny_settings(), tiny_path)
    yield backend
    backend.close()


def population(engine: EmbeddedBackend, members: int, seed: int = 0) -> StackedLoRA:
    """Members large enough (std 0.5) that each decodes its own text on the random tiny model."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in engine.engine.targets:
        tensors[t.key_a] = torch.randn(members, 2, t.in_features, generator=g) * 0.5
        tensors[t.key_b] = torch.randn(members, t.out_features, 2, generator=g) * 0.5
    return StackedLoRA(tensors, members)


def texts(result) -> list[list[tuple]]:
    return [[(c.text, c.completion_tokens, c.finish_reason) for c in row] for row in result]


@pytest.fixture(scope="module")
def ray_backend(ray_head, tiny_path):
    backend = RayBackend.from_settings(tiny_settings(address=ray_head, shard_timeout_s=60), tiny_path)
    backend.start_engines()
    yield backend
    backend.close()


# --- a whole run through the flow: the ledger of a run on Ray is the local run's ------------------


def ledger_record(data_dir: Path) -> dict:
    """Every recorded number and text of run `r` that does not name where it was decoded."""
    ledger = Ledger(data_dir)
    queries = {
        "generations": "SELECT generation, parent_center_sha256, center_sha256, reward_mean, reward_std, reward_max FROM generations ORDER BY ALL",
        "members": "SELECT generation, member, seed, sign, adapter_sha256, reward_mean, format_rate, accuracy, tokens, fitness FROM members ORDER BY ALL",
        "samples": "SELECT generation, member, problem_id, prompt, completion, reward, format_reward, format_ok, correct, completion_tokens FROM samples ORDER BY ALL",
        "evals": "SELECT generation, split, model, adapter_sha256, n, reward_mean, accuracy, format_rate, samples_sha256 FROM evals ORDER BY ALL",
    }
    return {name: ledger.query(sql)[1] for name, sql in queries.items()}


def run_tiny(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    from flows.es_countdown import es_countdown

    data_dir = tmp_path / name
    es_countdown(config_path=str(tiny_config(tmp_path)), overrides=["es.sigma=0.5", "es.population=6", *overrides], run_id="r", data_dir=str(data_dir))
    return data_dir


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, prefect_harness, model_cache) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
        record = ledger_record(run_tiny(tmp_path_factory.mktemp("local"), "local", []))
    assert len(record["samples"]) == 2 * 6 * 3 and len(record["evals"]) == 2
    assert len({row[4] for row in record["samples"]}) > 6  # members decode differently
    assert all(parent != centre for _, parent, centre, *_ in record["generations"])  # rewards differ: the centre moves
    return record


@pytest.mark.slow
def test_a_run_on_a_local_ray_cluster_records_what_the_local_runner_records(local_run, tmp_path, monkeypatch, model_cache):
    """runner.address empty: the run starts a local Ray cluster of this machine's 2 CPUs, two CPU
    engines; the same centre hashes, rewards, completions and held-out numbers as the local run."""
    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    assert not ray.is_initialized()
    data_dir = run_tiny(tmp_path, "ray", ["runner.kind=ray", "runner.gpus_per_engine=0", "runner.engines=2"])
    assert not ray.is_initialized()  # the cluster it started is gone with it
    assert ledger_record(data_dir) == local_run
    _, servers = Ledger(data_dir).query("SELECT DISTINCT server FROM members ORDER BY 1")
    assert [s[0].split("@")[0] for s in servers] == ["ray:engine-0", "ray:engine-1"]


@pytest.mark.slow
def test_an_engine_killed_mid_generation_of_a_run_loses_no_sample_and_records_none_twice(local_run, ray_head, tmp_path, monkeypatch, model_cache):
    """Generation 1's engine 0 is SIGKILLed once every shard is sent (its shard in flight): Ray
    restarts it, the shard is redone, and the ledger is the local run's, row for row."""
    monkeypatch.setenv("ES_MODEL__CACHE_DIR", str(model_cache))
    backends, calls = [], []
    generate_tensors = RayBackend.generate_tensors

    def killing_engine_0_in_generation_1(self, members, prompts, max_new_tokens, scaling=None, on_decode=None, centre=None, prompt_groups=None):
        calls.append(self)
        if self not in backends:
            backends.append(self)
        if len(calls) == 2:
            victim = self.infos[0]["pid"]
            gate = on_decode

            def on_decode():
                os.kill(victim, signal.SIGKILL)
                if gate is not None:
                    gate()

        return generate_tensors(self, members, prompts, max_new_tokens, scaling=scaling, on_decode=on_decode, centre=centre,
                                prompt_groups=prompt_groups)

    monkeypatch.setattr(RayBackend, "generate_tensors", killing_engine_0_in_generation_1)
    data_dir = run_tiny(tmp_path, "ray-killed", ["runner.kind=ray", f"runner.address={ray_head}", "runner.gpus_per_engine=0", "runner.engines=2"])
    assert len(calls) == 2 and len(backends) == 1
    assert [(r.engine, r.shard.members) for r in backends[0].redone] == [(0, range(0, 3))]
    assert ledger_record(data_dir) == local_run


# --- same completions as the local engine ---------------------------------------------------------


@pytest.mark.slow
def test_engines_in_actors_decode_what_the_local_engine_decodes_in_member_order(ray_backend, local_engine):
    members = population(local_engine, 5)
    local = texts(local_engine.generate_tensors(members, PROMPTS, 8))
    assert len({tuple(row) for row in local}) == 5  # every member decodes its own text: an order mix-up would show
    assert texts(ray_backend.generate_tensors(members, PROMPTS, 8)) == local
    names = {c.server for row in ray_backend.generate_tensors(members, PROMPTS, 8) for c in row}
    assert names == {f"ray:{info['name']}" for info in ray_backend.infos} and len(names) == 2  # both engines decoded


@pytest.mark.slow
def test_a_list_of_members_travels_stacked_when_it_can_and_decodes_as_the_local_engine(ray_backend, local_engine):
    stacked = population(local_engine, 4, seed=3)
    members = [{k: v.clone() for k, v in stacked.member(i).items()} for i in range(4)]
    assert _one_layout(members)  # one layout: sent as one tensor per key
    local = texts(local_engine.generate_tensors(members, PROMPTS, 8))
    assert texts(ray_backend.generate_tensors(members, PROMPTS, 8)) == local
    timings = ray_backend.call_timings()  # where the call's time went, per shard
    assert [t["shard"] for t in timings] == [0, 1] and all(t["in_engine_s"] > 0 and t["phases"]["decode_s"] > 0 for t in timings)
    # a base-model member (None), one with fewer keys, one in bf16: sent as the list it is
    some = dict(list(members[2].items())[:4])
    mixed = [members[0], None, some, {k: v.to(torch.bfloat16) for k, v in members[3].items()}]
    assert not any(_one_layout(m) for m in (mixed, [members[0], some], [members[0], mixed[3]]))
    assert texts(ray_backend.generate_tensors(mixed, PROMPTS, 8)) == texts(local_engine.generate_tensors(mixed, PROMPTS, 8))


@pytest.mark.slow
def test_groups_of_members_decode_their_own_prompts_on_the_engines_as_locally(ray_backend, local_engine, tmp_path):
    """es.members_per_prompt: each engine is sent its members' own prompts only, and the results come
    back in each member's order, stacked members and adapter files alike."""
    from es_core.es import problem_groups

    # 6 members in 3 groups over 2 engines: each engine's 3 members span two groups' prompts
    members = population(local_engine, 6, seed=5)
    prompts = [*PROMPTS, "12 + 30 =", "Once upon a time", "def f(x):"]
    groups = problem_groups(6, 6, 2)
    local = texts(local_engine.generate_tensors(members, prompts, 8, prompt_groups=groups))
    assert [len(row) for row in local] == [2] * 6
    assert texts(ray_backend.generate_tensors(members, prompts, 8, prompt_groups=groups)) == local
    refs = [AdapterRef(f"m{i}", save_adapter({k: v.clone() for k, v in members.member(i).items()}, tmp_path / f"m{i}",
                                             spec_from_tensors(members.member(i), 4.0))) for i in range(6)]
    assert texts(ray_backend.generate(refs, prompts, 8, prompt_groups=groups)) == texts(local_engine.generate(refs, prompts, 8, prompt_groups=groups))


@pytest.mark.slow
def test_one_adapter_on_many_prompts_is_split_by_prompts_and_read_from_its_folder(ray_backend, local_engine, tmp_path):
    members = population(local_engine, 1, seed=1)
    tensors = members.member(0)
    refs = [AdapterRef("a", save_adapter({k: v.clone() for k, v in tensors.items()}, tmp_path / "adapter", spec_from_tensors(tensors, 4.0)))]
    local = texts(local_engine.generate(refs, PROMPTS, 8))
    assert texts(ray_backend.generate(refs, PROMPTS, 8)) == local


@pytest.mark.slow
def test_generate_population_takes_the_members_stacked_with_their_scaling(ray_backend, local_engine):
    class Members:  # issue 20's interface: what a generation offers a backend
        scaling = 3.0

        def __init__(self, stacked):
            self._stacked = stacked

        def __len__(self):
            return len(self._stacked)

        def stacked(self):
            return self._stacked

        def centre(self):  # LoRA space: the members share nothing a backend applies once
            return None

    members = population(local_engine, 3, seed=2)
    local = texts(local_engine.generate_tensors(members, PROMPTS, 8, scaling=3.0))
    assert local != texts(local_engine.generate_tensors(members, PROMPTS, 8, scaling=1.0))
    decoding = threading.Event()
    assert texts(ray_backend.generate_population(Members(members), PROMPTS, 8, on_decode=decoding.set)) == local
    assert decoding.is_set()


@pytest.mark.slow
def test_an_engine_error_is_raised_as_the_local_engine_raises_it_and_not_redone(ray_backend, tmp_path):
    redone = len(ray_backend.redone)
    (tmp_path / "broken").mkdir()
    with pytest.raises(AdapterError):
        ray_backend.generate([AdapterRef("broken", tmp_path / "broken")], PROMPTS, 4)
    assert len(ray_backend.redone) == redone


# --- faults -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_engine_killed_mid_generation_is_restarted_and_its_shard_redone(ray_backend, local_engine):
    members = population(local_engine, 4, seed=3)
    local = texts(local_engine.generate_tensors(members, PROMPTS, 24))
    victim = ray_backend.infos[0]["pid"]
    redone = len(ray_backend.redone)

    def kill_engine_0() -> None:  # called once every shard is sent: engine 0 has its shard
        os.kill(victim, signal.SIGKILL)

    result = ray_backend.generate_tensors(members, PROMPTS, 24, on_decode=kill_engine_0)
    assert texts(result) == local  # nothing lost, nothing twice, in member order
    assert len(ray_backend.redone) == redone + 1 and ray_backend.redone[-1].engine == 0
    assert ray_backend.wait_ready(0) and ray_backend.infos[0]["pid"] != victim  # restarted by Ray
    assert texts(ray_backend.generate_tensors(members, PROMPTS, 24)) == local  # and at work again
    assert len(ray_backend.redone) == redone + 1


@pytest.mark.slow
def test_a_frozen_engine_is_restarted_after_shard_timeout_and_the_call_does_not_hang(ray_backend, local_engine, monkeypatch):
    members = population(local_engine, 2, seed=4)
    local = texts(local_engine.generate_tensors(members, PROMPTS, 8))
    monkeypatch.setattr(ray_backend, "shard_timeout_s", 8.0)
    assert ray_backend.wait_ready(1)
    frozen, redone = ray_backend.infos[1]["pid"], len(ray_backend.redone)
    os.kill(frozen, signal.SIGSTOP)  # alive to the OS and to Ray, never answers
    try:
        started = time.monotonic()
        assert texts(ray_backend.generate_tensors(members, PROMPTS, 8)) == local
        assert time.monotonic() - started < 60
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert [r.engine for r in ray_backend.redone[redone:]] == [1] and "runner.shard_timeout_s" in ray_backend.redone[-1].reason
    assert ray_backend.wait_ready(1) and ray_backend.infos[1]["pid"] != frozen


# --- no cluster ---------------------------------------------------------------------------------------


def test_an_unreachable_address_fails_in_one_line_within_seconds():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        connect(f"127.0.0.1:{port}", timeout_s=5)
    message = str(err.value)
    assert time.monotonic() - started < 10
    assert "\n" not in message and f"runner.address 127.0.0.1:{port}" in message and "ray start --head" in message


def connect_in_child(address: str) -> subprocess.CompletedProcess:
    """`connect(address, timeout_s=4)` in a child process, as the CLI meets it, so its exit status
    is seen: exit 3 and the error's one line on stdout when it fails."""
    code = ("import sys\nfrom es_core.backends.ray_engines import connect\n"
            "try:\n    connect(sys.argv[1], timeout_s=4)\nexcept Exception as e:\n    print(type(e).__name__, e)\n    sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code, address], cwd=ROOT, capture_output=True, text=True, timeout=120, env=os.environ)


def test_a_silent_port_fails_in_one_line_after_connect_timeout_and_the_process_exits_cleanly():
    """A port that accepts connections and never speaks (ray.init alone would hang on it in C++ for
    minutes, and an abandoned attempt once aborted the process at exit with std::bad_alloc)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        out = connect_in_child(f"127.0.0.1:{port}")
        seconds = time.monotonic() - started
    assert out.returncode == 3 and "terminate called" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.count("\n") == 1 and out.stdout.startswith(f"BackendError runner.address 127.0.0.1:{port}: no Ray cluster answers"), out.stdout
    assert "did not answer as a gRPC server in 4 s (runner.connect_timeout_s)" in out.stdout, out.stdout
    assert 4 <= seconds < 30


def test_a_grpc_server_that_is_no_ray_head_fails_in_one_line_and_every_process_exits_cleanly():
    """A server that answers the gRPC opening (SETTINGS) and then nothing: it passes the address
    check, and ray.init would hang on it in C++; the attach is tried in a child process that is
    given up on, so the caller's own exit is clean. Three times: a hung ray.init abandoned in a
    thread of the caller aborted it at exit (std::bad_alloc) in two of four tries."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    held = []

    def answer_settings_then_nothing():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            conn.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))

    threading.Thread(target=answer_settings_then_nothing, daemon=True).start()
    try:
        for _ in range(3):
            out = connect_in_child(f"127.0.0.1:{port}")
            assert out.returncode == 3 and "terminate called" not in out.stderr, out.stderr[-2000:]
            assert out.stdout.count("\n") == 1 and f"runner.address 127.0.0.1:{port}: Ray did not attach in 4 s (runner.connect_timeout_s)" in out.stdout, out.stdout
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_a_port_that_speaks_another_protocol_fails_in_one_line_at_once():
    """An HTTP/1 server (a dashboard's or a model server's port given by mistake) answers the gRPC
    opening with its own bytes: refused without waiting for the timeout, before ray.init."""
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(BackendError) as err:
            connect(f"127.0.0.1:{server.server_port}", timeout_s=20)
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()
    message = str(err.value)
    assert "\n" not in message and "answered, but not as a gRPC server (first bytes b'" in message, message


def test_a_ray_head_passes_the_address_check(ray_head):
    """The check before ray.init lets a real head's GCS through (its gRPC SETTINGS frame)."""
    from es_core.backends.ray_engines import address_problem

    assert address_problem(ray_head, 10) is None


def test_the_cli_refuses_an_unreachable_address_before_any_work(tmp_path, capsys):
    data_dir = tmp_path / "data"
    port = free_port()
    started = time.monotonic()
    code = cli_main(["run", "--config", str(tiny_config(tmp_path)), "--data-dir", str(data_dir),
                     "--set", "runner.kind=ray", "--set", f"runner.address=127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"runner.address 127.0.0.1:{port}" in err, err
    assert time.monotonic() - started < 30
    assert not data_dir.exists()
