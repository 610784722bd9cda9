"""The Ray runner: embedded engines on every GPU of a Ray cluster, behind the InferenceBackend interface.

Each engine is an `EngineActor`: a Ray actor holding one `EmbeddedBackend` (the population engine
on its GPU, or on CPU for tests), which loads the base model once and keeps it across generations.
A call is split into `sharding.plan_shards` rectangles of members x prompts, one per engine; the
members travel as stacked LoRA tensors (`generate_tensors`, each shard only its own rows) or as
adapter folders by path (`generate`: the content-addressed artifacts, which every node must see at
the same path), prompts as text; completions come back and are put together by
`sharding.merge`. Scoring and the ES update stay in the flow.

Faults: an engine that dies mid-call (its process killed, its node lost) is restarted by Ray
(max_restarts; it loads the model again) and its shard sent to the next engine not lost in this
call, or, when every engine was, to the lost one once it answers again; a shard that has not
answered after `runner.shard_timeout_s` has its engine killed (and so restarted) and is redone the
same way. Results are kept per shard and merged once every shard has answered exactly once, so a
redone shard replaces nothing and loses nothing; after `runner.shard_attempts` failures of one
shard, or an engine that does not come back in `runner.startup_timeout_s`, the call fails with one
line: it never waits without a bound. An error raised by the engine itself (a bad adapter, say) is
the same on any engine: it is raised as the local engine raises it, not redone.

Ray is started here when `runner.address` is empty (a new local cluster of this machine, from the
calling thread), attached to when it names a cluster (this machine must be a node of it, or the
address a Ray Client `ray://` one), and used as it is when the process already runs it (a test, a
Prefect worker with its own `ray.init`); only a cluster started or attached here is let go by
`close`.

Where this sits: es_core/backends, beside the SGLang backend that launches and restarts its own
servers: infrastructure behind the one InferenceBackend interface, with no Prefect in it; the flow
and tasks see only that interface.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

from es_core.backends.base import Adapter, AdapterRef, BackendError
from es_core.backends.sglang_client import one_line
from es_core.backends.sharding import Shard, merge, plan_shards
from es_core.evaluation import Completion
from es_core.lora import LoRATensors, StackedLoRA
from es_core.settings import Settings

log = logging.getLogger(__name__)


# --- connecting -------------------------------------------------------------------------------------


# A gRPC client's opening (HTTP/2 preface, then an empty SETTINGS frame): Ray's GCS and its Ray
# Client server are gRPC servers and answer with a SETTINGS frame of their own.
GRPC_OPENING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4  # the frame type, a frame header's fourth byte


def address_problem(address: str, timeout_s: float) -> str | None:
    """Why no Ray cluster can answer at `address` (`host:port`, `ray://host:port`), or None when its
    port answers as a gRPC server does. Checked here, in at most timeout_s, before ray.init ever
    sees the address: ray.init retries an address where nothing listens for minutes, and on one
    that accepts and stays silent it hangs in C++, where an abandoned attempt took the process down
    at exit (std::bad_alloc, seen in CI). `auto` (the cluster `ray start` left on this machine) is
    not checked here: ray.init says at once when there is none. With RAY_USE_TLS set, only the TCP
    connect is checked (the server then expects a TLS hello first)."""
    if address == "auto":
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        return f"not host:port ({exc})"
    if not host or port is None:
        return "not host:port or ray://host:port"
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return None
            conn.sendall(GRPC_OPENING)
            header = b""
            while len(header) < 9:
                conn.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    return f"{host}:{port} closed the connection without answering as a gRPC server: not a Ray head's port (6379)"
                header += chunk
    except socket.timeout:
        return (f"{host}:{port} did not answer as a gRPC server in {timeout_s:g} s (runner.connect_timeout_s): "
                "not a Ray head's port (6379), or a busy or stopped process holds it")
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    if header[3] != HTTP2_SETTINGS:
        return f"{host}:{port} answered, but not as a gRPC server (first bytes {header!r}): not a Ray head's port (6379)"
    return None


def unreachable_address(address: str, timeout_s: float) -> str | None:
    """The one line to stop with when no Ray cluster answers at `address`, or None."""
    problem = address_problem(address, timeout_s)
    if problem is None:
        return None
    return f"runner.address {address}: no Ray cluster answers ({problem}); start one with `ray start --head` or leave runner.address empty for a local one"


def connect(address: str | None, timeout_s: float) -> bool:
    """Ray in this process: a new local cluster (address None), attached to, or already running
    (then left as it is). Returns whether this call started or attached it (and so `close` shuts it
    down). One-line BackendError, in about timeout_s, when no cluster answers at `address` (checked
    even when Ray already runs here: a wrong address is a wrong setting either way)."""
    import ray

    unreachable = unreachable_address(address, timeout_s) if address else None
    if unreachable:
        raise BackendError(unreachable)
    if ray.is_initialized():
        return False
    if not address:
        # In this thread, never a helper one: Ray starts its GCS and raylet with a parent-death
        # signal, which Linux sends when the *thread* that started them ends (a local cluster started
        # from a short-lived thread died a few seconds later). A local start has its own timeouts.
        try:
            ray.init(address="local", log_to_driver=False)  # the actors' logs go to Ray's session folder
        except Exception as exc:  # noqa: BLE001 - reported in one line
            raise BackendError(f"a local Ray cluster did not start: {type(exc).__name__}: {one_line(exc)}") from exc
        return True
    problem = attach_problem(address, timeout_s)
    if problem:
        raise BackendError(f"runner.address {address}: {problem}")
    try:  # shown to attach a moment ago, in a child process
        ray.init(address=address, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - reported in one line
        raise BackendError(f"runner.address {address}: {type(exc).__name__}: {one_line(exc)}") from exc
    return True


# Run as a child process: attach, let go, and say why not in one line (exit 3), or give up after
# the timeout, counted once Ray is imported (exit 4; os._exit: nothing of a hung ray.init runs).
ATTACH_CHECK = """
import os, sys, threading
try:
    import ray
    give_up = threading.Timer(float(sys.argv[2]), os._exit, [4])
    give_up.daemon = True
    give_up.start()
    ray.init(address=sys.argv[1], log_to_driver=False)
    give_up.cancel()
    ray.shutdown()
except Exception as exc:
    print(type(exc).__name__ + ": " + " ".join(str(exc).split())[:500])
    sys.exit(3)
"""
RAY_IMPORT_S = 30.0  # what the child may take to import Ray, on top of the connect timeout


def attach_problem(address: str, timeout_s: float) -> str | None:
    """Why this process could not attach to the cluster at `address`, found by a child process
    that tries (a few seconds: Ray's import and one connect), or None. ray.init has no timeout: a
    gRPC server that is no Ray head, or a head that wants a token, holds it for minutes in C++,
    and an attempt abandoned in a helper thread aborted the process at exit (std::bad_alloc, half
    of the time, seen here); a child is killed instead. Its attach shows in the cluster as one
    more short-lived driver."""
    try:
        out = subprocess.run([sys.executable, "-c", ATTACH_CHECK, address, str(timeout_s)], capture_output=True, text=True,
                             timeout=timeout_s + RAY_IMPORT_S)
    except subprocess.TimeoutExpired:
        out = None
    if out is None or out.returncode == 4:
        return (f"Ray did not attach in {timeout_s:g} s (runner.connect_timeout_s): a gRPC server but no Ray head, or a cluster with "
                "token authentication and no RAY_AUTH_MODE=token with its token here (`ray get-auth-token`)")
    if out.returncode == 0:
        return None
    said = out.stdout.strip().splitlines()
    return said[-1] if out.returncode == 3 and said else f"a process attaching to it ended with exit code {out.returncode}: {one_line(out.stderr[-500:])}"


# --- the engines --------------------------------------------------------------------------------------


class EngineActor:
    """One embedded engine in a Ray actor: the base model loaded once, at start."""

    def __init__(self, settings: Settings, model_path: str, name: str, threads: int):
        import ray
        import torch

        from es_core.backends.embedded import EmbeddedBackend

        self.name = f"{name}@{ray.util.get_node_ip_address()}"
        if not Path(model_path).is_dir():
            raise BackendError(f"engine {self.name}: base model folder {model_path} not found on this node (every node must see the data dir at the same path)")
        self.backend = EmbeddedBackend.from_settings(settings, Path(model_path))
        if self.backend.engine.decoder.device.type == "cpu":
            torch.set_num_threads(threads)  # the actor's CPUs, not the whole machine's
        self.last_call: dict = {}  # where the last call's time went (`call_timings`)

    def info(self) -> dict:
        """Name, pid and device, and what decides how this engine decodes (`engine_info`): the
        environment Ray gives an actor (one torch thread, its own CUDA_VISIBLE_DEVICES) is not the
        driver's, so a benchmark can see both."""
        return {"name": self.name, "pid": os.getpid(), "device": str(self.backend.engine.decoder.device), **engine_info(self.backend.engine)}

    def generate(self, adapters: list[AdapterRef], prompts: list[str], max_new_tokens: int, prompt_groups=None) -> list[list[Completion]]:
        return self._timed(lambda: self.backend.generate(adapters, prompts, max_new_tokens, prompt_groups=prompt_groups))

    def generate_tensors(self, members, prompts: list[str], max_new_tokens: int, scaling: float | None, centre=None,
                         prompt_groups=None) -> list[list[Completion]]:
        return self._timed(lambda: self.backend.generate_tensors(members, prompts, max_new_tokens, scaling=scaling, centre=centre,
                                                                 prompt_groups=prompt_groups))

    def timings(self) -> dict:
        return self.last_call

    def _timed(self, call: Callable[[], list[list[Completion]]]) -> list[list[Completion]]:
        # wall clock (time.time), to be set against the driver's on the same host; the arguments
        # were received and unpickled by Ray before `entered`
        entered = time.time()
        result = call()
        stats = dataclasses.asdict(self.backend.engine.stats)
        # the ledger's `server` column says which engine decoded a member
        named = [[dataclasses.replace(c, server=f"ray:{self.name}") for c in row] for row in result]
        self.last_call = {"entered": entered, "left": time.time(), "engine": stats}
        return named


def _shard_prompts(prompts: Sequence[str], prompt_groups: Sequence[Sequence[int]] | None, s: "Shard") -> tuple[list[str], list[list[int]] | None]:
    """A shard's prompts, and with prompt_groups its members' positions in them (a shard's prompt
    range is then over each member's own prompts)."""
    if prompt_groups is None:
        return [prompts[p] for p in s.prompts], None
    needed = sorted({prompt_groups[m][j] for m in s.members for j in s.prompts})
    at = {p: i for i, p in enumerate(needed)}
    return [prompts[p] for p in needed], [[at[prompt_groups[m][j]] for j in s.prompts] for m in s.members]


def engine_info(engine) -> dict:
    """What decides how a PopulationEngine decodes, and the host threads it runs with."""
    import torch

    return {"dtype": str(engine.decoder.dtype).removeprefix("torch."), "compiled": engine.compiled, "cuda_graphs": engine.cuda_graphs,
            "attention": engine.attention, "lora_kernel": engine.lora_kernel, "head": engine.head, "max_batch_rows": engine.max_batch_rows,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}


@dataclasses.dataclass
class Redo:
    """A shard sent again: which, on which engine it failed, and why (for logs and tests)."""

    shard: Shard
    engine: int
    reason: str


class RayBackend:
    """The population over `engines` EngineActors of a Ray cluster (see the module's docstring)."""

    def __init__(self, settings: Settings, model_path: Path, owns_ray: bool):
        runner = settings.runner
        self.settings, self.model_path, self.owns_ray = _engine_settings(settings), str(Path(model_path).resolve()), owns_ray
        self.gpus_per_engine, self.engines_asked = float(runner.gpus_per_engine), runner.engines
        self.shard_timeout_s, self.startup_timeout_s, self.attempts = runner.shard_timeout_s, runner.startup_timeout_s, runner.shard_attempts
        self.actors: list = []
        self.infos: list[dict] = []  # each engine's name, pid and device, once started
        self.redone: list[Redo] = []
        self._down: set[int] = set()  # engines lost (Ray restarts them) and not seen answering since
        self._lock = threading.Lock()  # one call at a time, as the embedded backend
        self._shard_times: list[dict] = []  # the last call's shards, as the driver saw them (`call_timings`)
        # a list of members with one layout travels stacked (generate_tensors); False sends it as it
        # is, one pickled tensor per member and key (bench_ray --old-transfer times that way)
        self.stack_member_lists = True

    @classmethod
    def from_settings(cls, settings: Settings, model_path: Path, log_dir: Path | None = None, name_prefix: str = "") -> "RayBackend":
        """Connect to (or start) the cluster now, so a wrong address fails at once; the engines
        start at the first call (a backend opened for a cached evaluation never starts them, and
        the base model's engines are gone before the run's own take the GPUs). `log_dir`,
        `name_prefix`: as SGLangBackend's (the engines write no log of the run's and name no
        adapter)."""
        runner = settings.runner
        return cls(settings, model_path, connect(runner.address, runner.connect_timeout_s))

    @staticmethod
    def decode_key(settings: Settings) -> dict:
        """What decides how the engines decode, beyond the settings every backend shares: the device
        and dtype as they resolve in an engine (a GPU when gpus_per_engine > 0, the CPU otherwise;
        not the GPU's name, which the driver does not see), the LoRA slots' dtype (as the embedded
        backend's) and the split over engines (a shard's rows are a batch: its shape can change
        bf16 results, as max_batch_rows can). The whole of what this backend adds, so that a
        factory may take it alone in place of the embedded backend's."""
        from es_core.models import resolve_dtype

        import torch

        device = torch.device("cuda" if settings.runner.gpus_per_engine > 0 else "cpu")
        return {"runner": "ray", "device": device.type, "dtype": str(resolve_dtype(settings.model.dtype, device)).removeprefix("torch."),
                "lora_dtype": settings.generation.lora_dtype, "engines": settings.runner.engines, "gpus_per_engine": settings.runner.gpus_per_engine}

    # --- InferenceBackend -------------------------------------------------------------------------

    def generate(self, adapters: Sequence[Adapter], prompts: Sequence[str], max_new_tokens: int,
                 prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """Greedy completion of every prompt under every adapter (path None: the base model):
        result[a][p] (result[a][j]: prompt_groups[a][j]'s). The engines read the adapter folders by
        their path (an adapter in memory has its folder written here, as for SGLang)."""
        adapters, prompts = [AdapterRef(a.name, a.path) for a in adapters], list(prompts)

        def send(actor, s: Shard):
            own_prompts, groups = _shard_prompts(prompts, prompt_groups, s)
            return actor.generate.remote([adapters[m] for m in s.members], own_prompts, max_new_tokens, groups)

        return self._sharded(len(adapters), len(prompts) if prompt_groups is None else len(prompt_groups[0]), send)

    def generate_tensors(self, members: Sequence[LoRATensors | None] | StackedLoRA, prompts: Sequence[str], max_new_tokens: int,
                         scaling: float | None = None, on_decode: Callable[[], None] | None = None,
                         centre: LoRATensors | None = None, prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """As EmbeddedBackend.generate_tensors, each engine sent its own members' tensors only (and
        the centre they share, if any; with `prompt_groups`, only the prompts its members decode).
        A list of members that share their keys, shapes and dtypes travels stacked (one tensor per
        key: pickling one tensor per member and key cost seconds a call, 64 SmolLM2 members being
        26,880 tensors); the engine fills its slots from either with the same values, and checks a
        stacked population's first member only, which with one layout checks them all. Any other
        list travels as it is.
        `on_decode` is called once every shard is sent: the driver then only waits."""
        prompts = list(prompts)
        population = members if isinstance(members, StackedLoRA) else list(members)
        stacked = isinstance(population, StackedLoRA) or (self.stack_member_lists and _one_layout(population))

        def part(s: Shard):
            if not stacked:
                return [population[m] for m in s.members]
            if isinstance(population, StackedLoRA):
                if s.members == range(len(population)) and all(_owns_storage(v) for v in population.tensors.values()):
                    return population  # one engine takes them all: pickled as they are, no copy first
                # take(): a copy of these rows only (a view would pickle the whole population's storage)
                return population.take(s.members)
            return _stack([population[m] for m in s.members])

        def send(actor, s: Shard):
            own_prompts, groups = _shard_prompts(prompts, prompt_groups, s)
            return actor.generate_tensors.remote(part(s), own_prompts, max_new_tokens, scaling, centre, groups)

        per = len(prompts) if prompt_groups is None else len(prompt_groups[0])
        return self._sharded(len(population), per, send, on_decode)

    def generate_population(self, members, prompts: Sequence[str], max_new_tokens: int,
                            on_decode: Callable[[], None] | None = None,
                            prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """A generation's members (`Members`: `.stacked()`, `.scaling`) as stacked tensors, sharded
        over the engines: result[m][p] (result[m][j]: prompt_groups[m][j]'s)."""
        return self.generate_tensors(members.stacked(), prompts, max_new_tokens, scaling=members.scaling, on_decode=on_decode,
                                     centre=members.centre(), prompt_groups=prompt_groups)

    def close(self) -> None:
        import ray

        actors, self.actors = self.actors, []
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - closing must not fail a run that is ending
                log.warning("close: %s", one_line(exc))
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
            self.owns_ray = False

    # --- engines ----------------------------------------------------------------------------------

    def start_engines(self) -> list[dict]:
        """The engine actors, started and loaded (once; later calls return at once): their name,
        pid and device. One-line BackendError when the cluster cannot hold them or they do not load
        in runner.startup_timeout_s."""
        import ray

        if self.actors:
            return self.infos
        count, cpus = self._engine_count()
        engine_cls = ray.remote(EngineActor)
        # max_restarts: a dead engine comes back (loading the model again); how often it may cost a
        # shard is bounded by shard_attempts. max_task_retries 0: the redo is ours, never twice.
        options = dict(num_cpus=cpus, num_gpus=self.gpus_per_engine, max_restarts=-1, max_task_retries=0)
        actors = [engine_cls.options(**options).remote(self.settings, self.model_path, f"engine-{i}", max(1, int(cpus))) for i in range(count)]
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=self.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise BackendError(f"Ray: {count} engines (gpus_per_engine={self.gpus_per_engine:g}) not started in {self.startup_timeout_s:g} s "
                               f"(runner.startup_timeout_s); free resources: {_resources(ray.available_resources())}") from None
        except ray.exceptions.RayActorError as exc:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise BackendError(f"Ray: an engine failed to start: {one_line(exc)}") from exc
        self.actors, self.infos = actors, infos
        log.info("Ray: %d engines: %s", count, ", ".join(f"{i['name']} ({i['device']})" for i in infos))
        return infos

    def _engine_count(self) -> tuple[int, float]:
        """(engines, CPUs each) for this cluster; one line when it cannot hold what is asked."""
        import ray

        total = ray.cluster_resources()
        cpus = 1.0
        if self.gpus_per_engine > 0:
            fits = int(total.get("GPU", 0) / self.gpus_per_engine + 1e-9)
            count = self.engines_asked or fits
            if count < 1 or count > fits:
                raise BackendError(f"Ray: the cluster has {total.get('GPU', 0):g} GPUs, room for {fits} engines at runner.gpus_per_engine="
                                   f"{self.gpus_per_engine:g}, {count} asked (CPU engines: runner.gpus_per_engine=0 and runner.engines=N)")
            return count, cpus
        if not self.engines_asked:
            raise BackendError("Ray: runner.gpus_per_engine=0 (CPU engines) needs runner.engines, the number of engines")
        if self.engines_asked * cpus > total.get("CPU", 0):
            raise BackendError(f"Ray: {self.engines_asked} CPU engines asked, the cluster has {total.get('CPU', 0):g} CPUs")
        return self.engines_asked, cpus

    # --- one call, sharded, faults redone ------------------------------------------------------------

    def wait_ready(self, engine: int) -> bool:
        """Whether engine `engine` answers, waiting while Ray restarts it (the model loads again)
        for at most runner.startup_timeout_s; its info (a new pid) is kept."""
        import ray

        deadline = time.monotonic() + self.startup_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.infos[engine] = ray.get(self.actors[engine].info.remote(), timeout=left)
                self._down.discard(engine)
                return True
            except ray.exceptions.ActorUnavailableError:  # restarting: a call now fails at once
                time.sleep(min(1.0, left))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
        self._down.add(engine)
        return False

    def _sharded(self, members: int, prompts: int, send: Callable, on_decode: Callable[[], None] | None = None) -> list[list[Completion]]:
        """One call: a shard per engine that answers, sent at once; each answer kept in its shard's
        slot. A shard whose engine is lost (or silent past its deadline, then killed and restarted)
        goes to the next engine not lost in this call, or, when every one was, to the lost one once
        Ray has restarted it; merged once every shard has answered exactly once."""
        import ray

        with self._lock:
            self.start_engines()
            for engine in sorted(self._down):  # restarted during an earlier call
                self.wait_ready(engine)
            up = [e for e in range(len(self.actors)) if e not in self._down]
            if not up:
                raise BackendError(f"Ray: none of the {len(self.actors)} engines answers in {self.startup_timeout_s:g} s (runner.startup_timeout_s)")
            engine_lost = _engine_lost()
            shards = plan_shards(members, prompts, len(up))
            results: list = [None] * len(shards)
            pending: dict = {}  # ObjectRef -> (shard index, attempt, engine, seconds allowed, deadline)

            self._shard_times = [{} for _ in shards]

            def submit(i: int, attempt: int, engine: int) -> None:
                # an engine runs its calls one after another: a redo queued behind its own shard
                # has both shards' time
                queued = sum(1 for (_, _, e, _, _) in pending.values() if e == engine)
                allowed = self.shard_timeout_s * (1 + queued)
                sending = time.time()  # the arguments are pickled (and put in the object store) by .remote()
                ref = send(self.actors[engine], shards[i])
                self._shard_times[i] = {"engine": engine, "sending": sending, "sent": time.time()}
                pending[ref] = (i, attempt, engine, allowed, time.monotonic() + allowed)

            def redo_on(lost: int) -> int:
                self._down.add(lost)
                for k in range(1, len(self.actors) + 1):
                    if (lost + k) % len(self.actors) not in self._down:
                        return (lost + k) % len(self.actors)
                if self.wait_ready(lost):  # every engine lost in this call: wait for this one's restart
                    return lost
                raise BackendError(f"Ray: every engine was lost and engine {self.infos[lost]['name']} did not come back in {self.startup_timeout_s:g} s (runner.startup_timeout_s)")

            def failed(i: int, attempt: int, engine: int, reason: str) -> None:
                self.redone.append(Redo(shards[i], engine, reason))
                s = shards[i]
                where = f"shard {i} (members {s.members.start}-{s.members.stop - 1}, prompts {s.prompts.start}-{s.prompts.stop - 1}) on engine {self.infos[engine]['name']}"
                if attempt + 1 >= self.attempts:
                    raise BackendError(f"Ray: {where} failed {attempt + 1} times (runner.shard_attempts); last: {reason}")
                target = redo_on(engine)
                log.warning("Ray: %s: %s; sending it to engine %s", where, reason, self.infos[target]["name"])
                submit(i, attempt + 1, target)

            try:
                for i in range(len(shards)):
                    submit(i, 0, up[i])
                if on_decode is not None:
                    on_decode()
                while pending:
                    wait_s = max(0.0, min(d for *_, d in pending.values()) - time.monotonic())
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(wait_s, 5.0))
                    for ref in ready:
                        i, attempt, engine, _, _ = pending.pop(ref)
                        try:
                            results[i] = ray.get(ref)
                            self._shard_times[i]["got"] = time.time()
                        except engine_lost as exc:
                            failed(i, attempt, engine, f"{type(exc).__name__}: {one_line(exc, 200)}")
                        except ray.exceptions.RayTaskError as exc:
                            # the engine's own error (a bad adapter, say): the same on any engine, so
                            # not redone, and raised as the local engine raises it
                            raise exc.cause from None
                    now = time.monotonic()
                    for ref, (i, attempt, engine, allowed, deadline) in list(pending.items()):
                        if now >= deadline and ref in pending:
                            del pending[ref]
                            ray.kill(self.actors[engine], no_restart=False)  # Ray restarts it; its other calls fail and are redone
                            failed(i, attempt, engine, f"no answer in {allowed:g} s (runner.shard_timeout_s), engine restarted")
            except BaseException:
                for ref in pending:
                    try:
                        ray.cancel(ref)
                    except Exception:  # noqa: BLE001 - the error being raised is the one to report
                        pass
                raise
            return merge(shards, results, members, prompts)

    def call_timings(self) -> list[dict]:
        """Where the last call's time went, per shard (seconds; for benchmarks: one more round trip
        to each engine): `send` (the driver pickles the arguments and puts them in the object
        store), `to_engine` (until the engine's method starts: scheduled, the arguments fetched and
        unpickled), `in_engine` (the method: the engine's `phases`, EngineStats, and the rest,
        `outside_engine`: tokenize, detokenize), `back` (the completions pickled, returned,
        unpickled). Wall clocks of the driver and the engine: across hosts, `to_engine` and `back`
        carry their clocks' offset."""
        import ray

        out = []
        for i, times in enumerate(self._shard_times):
            if "got" not in times:
                continue
            engine = ray.get(self.actors[times["engine"]].timings.remote())
            stats = engine.get("engine", {})
            in_engine = engine["left"] - engine["entered"]
            out.append({"shard": i, "engine": self.infos[times["engine"]]["name"], "send_s": times["sent"] - times["sending"],
                        "to_engine_s": engine["entered"] - times["sent"], "in_engine_s": in_engine, "back_s": times["got"] - engine["left"],
                        "total_s": times["got"] - times["sending"], "phases": stats,
                        "outside_engine_s": in_engine - sum(stats.get(k, 0.0) for k in ENGINE_PHASES)})
        return out


ENGINE_PHASES = ("setup_s", "load_s", "prefill_s", "decode_s")  # EngineStats' timed phases of a call


def _one_layout(members: list) -> bool:
    """Whether every member is a LoRA (no None) with the first's keys, shapes and dtypes: then they
    stack into one tensor per key with the values the engine would stack itself."""
    if not members or any(m is None for m in members):
        return False
    layout = {k: (tuple(v.shape), v.dtype) for k, v in members[0].items()}
    return all(len(m) == len(layout) and all(k in layout and layout[k] == (tuple(v.shape), v.dtype) for k, v in m.items())
               for m in members[1:])


def _owns_storage(t) -> bool:
    """Whether pickling `t` sends its bytes only (no larger storage it views)."""
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _stack(members: list) -> StackedLoRA:
    import torch

    return StackedLoRA({k: torch.stack([m[k].detach() for m in members]) for k in members[0]}, len(members))


def _engine_lost() -> tuple[type[BaseException], ...]:
    """What says an engine went away (killed, its worker or node lost): its shard is redone."""
    import ray.exceptions as e

    return (e.RayActorError, e.WorkerCrashedError, e.ObjectLostError, e.OwnerDiedError, e.NodeDiedError)


def _engine_settings(settings: Settings) -> Settings:
    """The settings an engine is built with: its device is the one Ray gives it (a GPU when
    gpus_per_engine > 0: the only one it sees, cuda; the CPU otherwise)."""
    device = "cuda" if settings.runner.gpus_per_engine > 0 else "cpu"
    return settings.model_copy(update={"model": settings.model.model_copy(update={"device": device})})


def _resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) or "none"


