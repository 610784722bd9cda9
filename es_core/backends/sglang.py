"""SGLang backend: greedy completions of a population of LoRA adapters on one or more servers.

Attach to running servers (`ES_SGLANG_URL` / `backend.sglang.urls`; never launched, never
stopped) or launch one (`sglang_server.SGLangServer`). Per call:

1. shard the adapters over the servers: member i -> server i mod S (i from a `..._m<i>` name,
   else the position in the call), one thread per server;
2. on each server, load the shard's adapters under their unique names (`g12_m007`) after a
   client-side check of the folder, then send batched `/generate` calls (a `lora_path` name per
   prompt, `input_ids` from our tokenizer with add_special_tokens=False, greedy), at most
   `requests_per_server` in flight per server;
3. unload each adapter as soon as its last user is done (reference counted).

Why unload after use rather than "the previous call's adapters": a generation's members are one
call (`generate_population`), but held-out evaluations and replays call in between, from other
threads, so "previous call" is not defined; counting users per name keeps the loaded set bounded
by what is in flight, never unloads an adapter under a running request (SGLang's unload would wait
for it), and leaves no state behind a failed call. It costs no more loads or unloads than the
alternative.

Fallback (`reload_mode` auto/restart): when dynamic loading is unavailable on a server we
launched, it is relaunched with `--lora-paths name=path ...` for every adapter in use; restarts
wait for running requests to finish, and a short pause gathers concurrent callers into one
restart. Faults: the client retries transient errors with backoff; after that a launched server
that is dead or unhealthy is restarted (at most `max_restarts` in 10 minutes) and the request
is sent again, an attached server is waited for and its adapters re-synced; an unload that hangs
(sglang#36894) restarts a launched server. Every failure that stops the run is a BackendError of
one line naming the server, adapter and step.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from es_core.backends.base import Adapter, AdapterRef, BackendError, Members
from es_core.backends.sglang_client import (
    AdapterChecker,
    AdapterNotLoaded,
    LoRAUnavailable,
    ServerUnavailable,
    SGLangClient,
    UnloadTimeout,
    describe,
    one_line,
)
from es_core.backends.sglang_server import LaunchSpec, SGLangServer
from es_core.evaluation import Completion
from es_core.lora import AdapterSpec, LoRATensors
from es_core.lora import save_adapter as _save_adapter
from es_core.settings import Settings

log = logging.getLogger(__name__)

_MEMBER_RE = re.compile(r"_m(\d+)$")


# --- adapter files ---------------------------------------------------------------------------


def save_adapter(tensors: LoRATensors, folder: str | Path, spec: AdapterSpec, *, pad_layers: Sequence[int] | None = None) -> Path:
    """es_core.lora.save_adapter, optionally with explicit zero A and B for every layer in
    `pad_layers` that the adapter does not cover (shapes taken from a covered layer's module).

    Not needed for SGLang 0.5.x: it ignores `layers_to_transform` but zero-fills the GPU slot of
    every (layer, module) whose weights the adapter file lacks (`mem_pool.py`,
    `load_lora_weight_to_buffer`: "If the particular weight is not present in the adapter, we
    initialize the buffer to zero"), so an uncovered layer is exactly the base model. Padding
    makes the file say so explicitly, for servers that might not; both files give the same
    model (the integration test compares them on a real server)."""
    if not pad_layers:
        return _save_adapter(tensors, folder, spec)
    padded = dict(tensors)
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    templates: dict[str, tuple[str, torch.Tensor]] = {}  # key with layer placeholder -> example
    for key, value in tensors.items():
        m = layer_re.search(key)
        if m:
            templates.setdefault(layer_re.sub(".layers.{}.", key, count=1), (key, value))
    for template, (_, example) in templates.items():
        for layer in pad_layers:
            key = template.format(int(layer))
            if key not in padded:
                padded[key] = torch.zeros_like(example, dtype=torch.float32)
    layers = tuple(sorted(set(spec.layers) | {int(x) for x in pad_layers}))
    return _save_adapter(padded, folder, AdapterSpec(spec.rank, spec.lora_alpha, spec.target_modules, layers))


# --- one server --------------------------------------------------------------------------------


class _Gate:
    """Shared/exclusive gate for one server: requests and loads are shared, a restart is
    exclusive. Writers go first (new requests wait while a restart is pending); a planned restart
    drains running requests, a fault restart does not (they fail and are retried)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def enter(self) -> None:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1

    def leave(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @contextmanager
    def exclusive(self, drain: bool = True) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or (drain and self._readers):
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(eq=False)
class _Slot:
    index: int
    client: SGLangClient
    process: SGLangServer | None
    mode: str  # "dynamic" (load/unload over HTTP) or "restart" (relaunch with --lora-paths)
    pool: ThreadPoolExecutor
    gate: _Gate = field(default_factory=_Gate)
    lock: threading.Lock = field(default_factory=threading.Lock)  # bookkeeping below
    load_lock: threading.Lock = field(default_factory=threading.Lock)  # our loads/unloads, one at a time
    recover_lock: threading.Lock = field(default_factory=threading.Lock)
    epoch: int = 0  # +1 whenever the server's adapter state may have been lost
    loaded: dict[str, str] = field(default_factory=dict)  # name -> path believed loaded this epoch
    refs: collections.Counter = field(default_factory=collections.Counter)  # name -> users now
    paths: dict[str, str] = field(default_factory=dict)  # name -> path of every name in use
    restarts: collections.deque = field(default_factory=collections.deque)  # times of fault restarts

    @property
    def url(self) -> str:
        return self.client.url

    def live(self) -> dict[str, str]:
        return {n: self.paths[n] for n, c in self.refs.items() if c > 0}


class SGLangBackend:
    """InferenceBackend over SGLang servers; see the module docstring. Thread-safe: Prefect tasks
    may call generate concurrently."""

    def __init__(
        self,
        clients: Sequence[SGLangClient],
        processes: Sequence[SGLangServer | None] | None = None,
        *,
        tokenizer: Any = None,
        checker: AdapterChecker | None = None,
        reload_mode: str = "auto",
        requests_per_server: int = 4,
        max_rows_per_request: int = 1024,
        name_prefix: str = "",
        recover_attempts: int = 3,
        max_restarts: int = 5,
        reconnect_timeout_s: float = 120.0,
        restart_coalesce_s: float = 1.0,
    ):
        if not clients:
            raise BackendError("SGLang: no server to use")
        if reload_mode not in ("auto", "dynamic", "restart"):
            raise ValueError(f"reload_mode {reload_mode!r}")
        processes = list(processes) if processes is not None else [None] * len(clients)
        if reload_mode == "restart" and any(p is None for p in processes):
            raise BackendError("SGLang: reload_mode restart needs servers we launch (an attached server cannot be relaunched with --lora-paths)")
        self.tokenizer, self.checker, self.name_prefix = tokenizer, checker, name_prefix
        self.reload_mode, self.max_rows_per_request = reload_mode, max_rows_per_request
        # how faults are recovered from: attempts per request, restarts of a launched server, waits
        self.recover_attempts, self.max_restarts = recover_attempts, max_restarts
        self.reconnect_timeout_s, self.restart_coalesce_s = reconnect_timeout_s, restart_coalesce_s
        mode = "restart" if reload_mode == "restart" else "dynamic"
        self._slots = [
            _Slot(i, c, p, mode, ThreadPoolExecutor(max_workers=requests_per_server, thread_name_prefix=f"sglang{i}"))
            for i, (c, p) in enumerate(zip(clients, processes))
        ]
        self._token_cache: dict[str, list[int]] = {}
        self._token_lock = threading.Lock()
        self._closed = False

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings, base_model_path: str | Path, log_dir: str | Path | None = None, *, tokenizer: Any = "auto", env: dict[str, str] | None = None, client_options: dict | None = None, **options: Any) -> "SGLangBackend":
        """Attach to `settings.sglang_urls` if any, else launch one server on the base model
        folder (its log goes to `<log_dir>/sglang-<port>.log`). `tokenizer="auto"` loads the base
        model's (None: send text); `env` is added to the launched server's environment;
        `client_options` go to every SGLangClient (retries, backoff_s, ...), `options` to the
        backend (recover_attempts, max_restarts, ...)."""
        sg = settings.backend.sglang
        if tokenizer == "auto":
            tokenizer = _load_tokenizer(base_model_path)
        checker = AdapterChecker(base_model_path, max_rank=settings.adapter_rank, target_modules=settings.lora.modules)
        options = dict(
            tokenizer=tokenizer, checker=checker, reload_mode=sg.reload_mode, requests_per_server=sg.requests_per_server,
            max_rows_per_request=settings.generation.max_batch_rows, **options,
        )
        timeouts = dict(request_timeout_s=sg.request_timeout_s, unload_timeout_s=sg.unload_timeout_s, pool_size=sg.requests_per_server + 4, **(client_options or {}))
        urls = settings.sglang_urls
        if urls:
            backend = cls([SGLangClient(u, **timeouts) for u in urls], **options)
            backend.wait_healthy(sg.startup_timeout_s)
            return backend
        spec = LaunchSpec.from_settings(settings, base_model_path)
        log_dir = Path(log_dir) if log_dir is not None else Path(settings.data_dir or "runs")
        server = SGLangServer(spec, log_dir / f"sglang-{spec.port}.log", startup_timeout_s=sg.startup_timeout_s, env=env)
        server.start()
        return cls([SGLangClient(server.url, **timeouts)], [server], **options)

    @staticmethod
    def decode_key(settings: Settings) -> dict:
        """What, beyond the settings every backend shares, decides how the servers decode: the
        dtype asked of them, their LoRA kernels and extra arguments."""
        sglang = settings.backend.sglang
        return {"dtype": settings.model.dtype, "lora_backend": sglang.lora_backend, "extra_args": list(sglang.extra_args)}

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._slots]

    def wait_healthy(self, timeout_s: float) -> None:
        for slot in self._slots:
            slot.client.wait_healthy(timeout_s)
            try:
                info = slot.client.model_info()
                log.info("attached to SGLang %s serving %s", slot.url, info.get("model_path"))
            except BackendError:
                pass

    # --- sharding ---------------------------------------------------------------------------

    def server_for(self, adapter: AdapterRef, position: int = 0) -> int:
        """Member i -> server i mod S; i from a `..._m<i>` name, else the position in the call."""
        m = _MEMBER_RE.search(adapter.name)
        return (int(m.group(1)) if m else position) % len(self._slots)

    def assign(self, adapters: Sequence[AdapterRef]) -> dict[int, list[int]]:
        """server index -> positions of `adapters` it evaluates."""
        shards: dict[int, list[int]] = collections.defaultdict(list)
        for i, a in enumerate(adapters):
            shards[self.server_for(a, i)].append(i)
        return dict(shards)

    # --- the InferenceBackend call -------------------------------------------------------------

    def generate(self, adapters: Sequence[Adapter], prompts: Sequence[str], max_new_tokens: int,
                 prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """Greedy completion of every prompt under every adapter: result[a][p], each Completion
        naming the server that produced it; with `prompt_groups`, of adapter a's own prompts only
        (indices into `prompts`): result[a][j] is prompt prompt_groups[a][j]'s."""
        adapters, prompts = list(adapters), list(prompts)
        if not adapters or not prompts:
            return [[] for _ in adapters]
        if prompt_groups is not None and len(prompt_groups) != len(adapters):
            raise ValueError(f"{len(prompt_groups)} prompt groups for {len(adapters)} adapters")
        shards = self.assign(adapters)
        results: list[list[Completion] | None] = [None] * len(adapters)

        def run(server: int, positions: list[int]) -> None:
            groups = None if prompt_groups is None else [prompt_groups[i] for i in positions]
            out = self._generate_on(self._slots[server], [adapters[i] for i in positions], prompts, max_new_tokens, groups)
            for i, completions in zip(positions, out):
                results[i] = completions

        if len(shards) == 1:
            (server, positions), = shards.items()
            run(server, positions)
        else:
            with ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="sglang-shard") as pool:
                futures = [pool.submit(run, s, p) for s, p in shards.items()]
                for f in futures:
                    f.result()
        return results  # type: ignore[return-value]

    def generate_population(self, members: Members, prompts: Sequence[str], max_new_tokens: int, on_decode=None,
                            prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """A generation's members from their adapter folders (the servers load files), sharded as
        `generate` does. `on_decode` is called before the requests go out: the host has nothing to
        do while the servers decode."""
        adapters = members.adapters()
        if on_decode is not None:
            on_decode()
        return self.generate(adapters, prompts, max_new_tokens, prompt_groups)

    def close(self) -> None:
        """Unload what we still hold on attached servers (best effort), stop launched servers."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            if slot.process is None and slot.mode == "dynamic":
                with slot.lock:
                    names = list(slot.loaded)
                    slot.loaded.clear()
                for name in names:
                    try:
                        slot.client.unload_adapter(name, timeout_s=min(10.0, slot.client.unload_timeout_s))
                    except BackendError as exc:
                        log.warning("close: %s", exc)
            slot.pool.shutdown(wait=False, cancel_futures=True)
            if slot.process is not None:
                slot.process.stop()
            slot.client.close()

    def __enter__(self) -> "SGLangBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals: names and references -----------------------------------------------------

    def _name(self, ref: AdapterRef) -> str | None:
        return None if ref.path is None else self.name_prefix + ref.name

    def _acquire(self, slot: _Slot, adapters: Sequence[AdapterRef]) -> list[str]:
        names = []
        with slot.lock:
            for ref in adapters:
                name = self._name(ref)
                if name is None:
                    continue
                path = str(ref.path)
                if slot.refs[name] > 0 and slot.paths.get(name) != path:
                    raise BackendError(f"SGLang {slot.url}: load {name}: the name is in use for {slot.paths[name]}, not {path} (names must be unique)")
                slot.refs[name] += 1
                slot.paths[name] = path
                names.append(name)
        return list(dict.fromkeys(names))

    def _release(self, slot: _Slot, adapters: Sequence[AdapterRef]) -> None:
        to_unload = []
        with slot.lock:
            for ref in adapters:
                name = self._name(ref)
                if name is None or slot.refs[name] <= 0:
                    continue
                slot.refs[name] -= 1
                if slot.refs[name] == 0:
                    del slot.refs[name]
                    slot.paths.pop(name, None)
                    # Forget it before the HTTP unload: a new user of the name then reloads it
                    # (waiting on load_lock) instead of racing the unload.
                    if slot.mode == "dynamic" and slot.loaded.pop(name, None) is not None:
                        to_unload.append(name)
        for name in to_unload:
            self._unload(slot, name)

    def _unload(self, slot: _Slot, name: str) -> None:
        epoch = slot.epoch
        try:
            with slot.gate.shared(), slot.load_lock:
                if slot.epoch != epoch:
                    return  # the server was restarted: nothing to unload
                slot.client.unload_adapter(name)
        except UnloadTimeout as exc:
            if slot.process is None:
                log.warning("%s; the attached server keeps it (it is never used again)", exc)
                return
            self._recover(slot, epoch, exc)
        except ServerUnavailable as exc:
            log.warning("unload skipped, the server is unreachable: %s", exc)

    # --- internals: making names available ----------------------------------------------------

    def _ensure(self, slot: _Slot, names: Sequence[str]) -> None:
        """Load whatever of `names` the server lacks (dynamic) or relaunch with them (restart)."""
        for _ in range(4):
            with slot.lock:
                missing = [n for n in names if n not in slot.loaded]
            if not missing:
                return
            if slot.mode == "dynamic":
                try:
                    self._load(slot, missing)
                    continue
                except LoRAUnavailable as exc:
                    if self.reload_mode != "auto" or slot.process is None:
                        raise
                    log.warning("%s; falling back to restarts with --lora-paths on this server", exc)
                    slot.mode = "restart"
                except ServerUnavailable as exc:
                    # A load that keeps failing on a server that is otherwise healthy: dynamic
                    # loading is broken there; a dead server is left to the caller's recovery.
                    if self.reload_mode != "auto" or slot.process is None or not (slot.process.alive() and slot.client.healthy()):
                        raise
                    log.warning("%s; the server is healthy, falling back to restarts with --lora-paths on it", exc)
                    slot.mode = "restart"
            self._restart_with(slot, missing)
        with slot.lock:
            missing = [n for n in names if n not in slot.loaded]
        if missing:
            raise BackendError(f"SGLang {slot.url}: load {describe(missing)}: still not loaded after 4 tries")

    def _load(self, slot: _Slot, names: Sequence[str]) -> None:
        with slot.gate.shared(), slot.load_lock:
            epoch = slot.epoch
            for name in names:
                with slot.lock:
                    if name in slot.loaded or name not in slot.paths:
                        continue
                    path = slot.paths[name]
                slot.client.load_adapter(name, path, checker=self.checker)
                with slot.lock:
                    if slot.epoch == epoch:
                        slot.loaded[name] = path

    def _restart_with(self, slot: _Slot, names: Sequence[str]) -> None:
        """Restart mode: relaunch with --lora-paths for every adapter in use on this server."""
        if self.restart_coalesce_s > 0:
            time.sleep(self.restart_coalesce_s)  # let concurrent callers register their adapters
        if self.checker is not None:
            with slot.lock:
                paths = [slot.paths[n] for n in names if n in slot.paths]
            for path in paths:
                try:
                    self.checker.check(path)
                except ValueError as exc:
                    raise BackendError(f"SGLang {slot.url}: check before restart {path}: {one_line(exc)}") from None
        with slot.gate.exclusive(drain=True):
            with slot.lock:
                if all(n in slot.loaded for n in names):
                    return
                wanted = slot.live()
            assert slot.process is not None
            slot.process.restart(wanted, reason=f"restart mode: {len(wanted)} adapters via --lora-paths")
            with slot.lock:
                slot.epoch += 1
                slot.loaded = dict(wanted)

    # --- internals: generation and recovery ----------------------------------------------------

    def _generate_on(self, slot: _Slot, adapters: Sequence[AdapterRef], prompts: Sequence[str], max_new_tokens: int,
                     prompt_groups: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        names = [self._name(a) for a in adapters]
        encoded = self._encode(prompts)
        own = [range(len(prompts))] * len(adapters) if prompt_groups is None else [list(g) for g in prompt_groups]
        self._acquire(slot, adapters)
        try:
            rows = [(a, j, p) for a in range(len(adapters)) for j, p in enumerate(own[a])]  # adapter, its j-th prompt, which
            n_chunks = max(1, math.ceil(len(rows) / self.max_rows_per_request))
            size = math.ceil(len(rows) / n_chunks)
            chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
            futures = [
                slot.pool.submit(self._request, slot, [encoded[p] for _, _, p in chunk], [names[a] for a, _, _ in chunk], max_new_tokens)
                for chunk in chunks
            ]
            out: list[list[Completion | None]] = [[None] * len(own[a]) for a in range(len(adapters))]
            try:
                for chunk, future in zip(chunks, futures):
                    for (a, j, _), completion in zip(chunk, future.result()):
                        out[a][j] = completion
            except BaseException:
                # Let running requests end before the adapters are unloaded under them (an
                # unload waits for them on the server and would time out into a restart).
                for future in futures:
                    future.cancel()
                wait(futures)
                raise
            return out  # type: ignore[return-value]
        finally:
            self._release(slot, adapters)

    def _request(self, slot: _Slot, prompts: list, loras: list[str | None], max_new_tokens: int) -> list[Completion]:
        needed = list(dict.fromkeys(n for n in loras if n))
        failures = 0
        for _ in range(50):
            epoch = slot.epoch
            try:
                self._ensure(slot, needed)
                with slot.gate.shared():
                    with slot.lock:
                        ready = all(n in slot.loaded for n in needed)
                    if ready:
                        return slot.client.generate(prompts, loras, max_new_tokens)
                # else: a restart took them between _ensure and here; load again
            except (ServerUnavailable, AdapterNotLoaded) as exc:
                failures += 1
                if failures > self.recover_attempts:
                    raise BackendError(f"SGLang {slot.url}: generate {describe(loras)}: gave up after {self.recover_attempts} recoveries: {one_line(exc)}") from None
                self._recover(slot, epoch, exc)
        raise BackendError(f"SGLang {slot.url}: generate {describe(loras)}: its adapters kept being lost to restarts")

    def _ensure_recovering(self, slot: _Slot, names: Sequence[str]) -> None:
        failures = 0
        while True:
            epoch = slot.epoch
            try:
                return self._ensure(slot, names)
            except (ServerUnavailable, AdapterNotLoaded) as exc:
                failures += 1
                if failures > self.recover_attempts:
                    raise BackendError(f"SGLang {slot.url}: load {describe(names)}: gave up after {self.recover_attempts} recoveries: {one_line(exc)}") from None
                self._recover(slot, epoch, exc)

    def _recover(self, slot: _Slot, epoch: int, exc: BackendError) -> None:
        """After a failure: resync an attached server's adapters (waiting for it if it is down);
        restart a launched one that is dead, unhealthy or hung on an unload."""
        with slot.recover_lock:
            if slot.epoch != epoch:
                return  # someone else recovered already
            if slot.process is None:
                if isinstance(exc, ServerUnavailable):
                    log.warning("%s; waiting up to %.0f s for it to come back", exc, self.reconnect_timeout_s)
                    try:
                        slot.client.wait_healthy(self.reconnect_timeout_s)
                    except ServerUnavailable:
                        raise BackendError(f"{one_line(exc)}; not back within {self.reconnect_timeout_s:g} s") from None
                self._resync(slot)
                return
            if isinstance(exc, AdapterNotLoaded) and slot.mode == "dynamic" and slot.process.alive():
                self._resync(slot)
                return
            if isinstance(exc, ServerUnavailable) and slot.process.alive() and slot.client.healthy(timeout_s=30):
                log.warning("%s; the server is healthy, sending again", exc)
                return
            self._fault_restart(slot, one_line(exc, 300))

    def _resync(self, slot: _Slot) -> None:
        """Keep only what the server really holds (it may have been restarted under us)."""
        try:
            held = slot.client.loaded_adapters()
        except BackendError:
            held = {}
        with slot.lock:
            slot.epoch += 1
            slot.loaded = {n: p for n, p in slot.loaded.items() if held.get(n) == p}

    def _fault_restart(self, slot: _Slot, reason: str) -> None:
        now = time.monotonic()
        while slot.restarts and now - slot.restarts[0] > 600:
            slot.restarts.popleft()
        if len(slot.restarts) >= self.max_restarts:
            raise BackendError(f"SGLang {slot.url}: restarted {len(slot.restarts)} times in 10 min, giving up; last failure: {reason}; log {slot.process.log_path}")
        slot.restarts.append(now)
        with slot.gate.exclusive(drain=False):
            wanted = slot.live() if slot.mode == "restart" else {}
            slot.process.restart(wanted, reason=reason)
            with slot.lock:
                slot.epoch += 1
                slot.loaded = dict(wanted)

    def _encode(self, prompts: Sequence[str]) -> list:
        """Token ids (add_special_tokens=False, the same ids the embedded engine sees) when we
        have the tokenizer, else the text itself."""
        if self.tokenizer is None:
            return list(prompts)
        out = []
        with self._token_lock:  # HF fast tokenizers are not safe to call from several threads
            for p in prompts:
                ids = self._token_cache.get(p)
                if ids is None:
                    ids = list(self.tokenizer(p, add_special_tokens=False)["input_ids"])
                    if len(self._token_cache) > 20000:
                        self._token_cache.clear()
                    self._token_cache[p] = ids
                out.append(ids)
        return out


def _load_tokenizer(base_model_path: str | Path) -> Any:
    """The tokenizer the flow renders prompts with; None (send text) if it cannot be loaded."""
    try:
        from es_core.models import load_tokenizer  # the flow's own loader, when present

        return load_tokenizer(Path(base_model_path))
    except ImportError:
        pass
    except Exception as exc:  # pragma: no cover - depends on the model folder
        log.warning("tokenizer of %s not loaded (%s); sending text to SGLang", base_model_path, one_line(exc, 200))
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(base_model_path))
    except Exception as exc:
        log.warning("tokenizer of %s not loaded (%s); sending text to SGLang", base_model_path, one_line(exc, 200))
        return None
