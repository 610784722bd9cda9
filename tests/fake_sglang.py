"""A fake SGLang server that speaks the 0.5.23 HTTP API strictly, for tests without a GPU.

Endpoints: /health, /health_generate, /model_info, /server_info, /v1/models,
/load_lora_adapter, /unload_lora_adapter, /generate, with SGLang's error cases: unknown
sampling_params keys ("unknown field"), a never-loaded adapter name, a duplicate load ("already
loaded"), a `lora_path` list of the wrong length, a folder that is not a PEFT LoRA adapter, a rank
or module the LoRA pool cannot hold. Like the real server it silently reloads an adapter that was
loaded once and later unloaded (counted in `silent_reloads`: our backend must never rely on it).

Completions are deterministic in (the adapter's actual weights, the prompt): an adapter is read
from its safetensors and hashed over its nonzero B·A pairs (so an all-zero adapter, or zero
padding, answers like the base model, as on the real server), and the text is drawn from
sha256(weights, prompt): sometimes `...</think>\\n<answer>expr</answer>` with a correct expression
for the Countdown numbers in the prompt, sometimes malformed, sometimes long enough to hit
max_new_tokens, so rewards vary between adapters.

Faults, from the test: `fake.fault("/generate", "status", status=500, times=2)`, "drop" (close
the connection without an answer), "slow" (answer after `seconds`), "hang" (wait until
`release()` or `seconds`), "die" (the server closes its socket and every connection; a
subprocess exits). In a subprocess the same is POST /_fake/fault.

Run as a process: `python -m tests.fake_sglang --model-path P --port N ...` takes
sglang.launch_server's flags, and `write_launch_shim(folder)` makes `python -m
sglang.launch_server` run this fake (put the folder first on PYTHONPATH), so launch, stop and
restart are tested with real subprocesses.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parent.parent

SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark",
}
GENERATE_KEYS = {"text", "input_ids", "sampling_params", "lora_path", "rid", "stream", "return_logprob", "lora_id"}
LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj", "all"}
THINK_WORDS = "let me try adding the numbers then subtract and multiply to reach target check again maybe divide first".split()
_KEY_RE = re.compile(r"^(?P<stem>.+)\.lora_(?P<f>[AB])\.weight$")


class Reject(Exception):
    def __init__(self, status: int, message: str, payload: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.payload = status, message, payload


@dataclass
class Fault:
    endpoint: str
    kind: str  # status | drop | slow | hang | die
    times: int = 1
    after: int = 0  # let this many matching calls through first
    status: int = 500
    seconds: float | None = None
    seen: int = 0


@dataclass
class Adapter:
    path: str
    digest: str | None  # None: every B·A is zero, the adapter answers like the base model
    rank: int


def adapter_digest(folder: Path) -> tuple[str | None, int]:
    """Hash of the adapter's nonzero (A, B) pairs, and its rank."""
    from safetensors.numpy import load_file
    import numpy as np

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    h = hashlib.sha256()
    used = 0
    rank = 0
    for key in sorted(tensors):
        m = _KEY_RE.match(key)
        if not m:
            raise Reject(400, f"Unexpected weight name {key} in LoRA adapter {folder}")
        if m.group("f") != "A":
            continue
        a = tensors[key].astype(np.float32)
        b = tensors.get(key.replace("lora_A", "lora_B"))
        rank = max(rank, a.shape[0])
        if b is None or not np.any(a) or not np.any(b):
            continue
        used += 1
        h.update(key.encode())
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(np.ascontiguousarray(b.astype(np.float32)).tobytes())
    return (h.hexdigest() if used else None), rank


@lru_cache(maxsize=4096)
def solve(numbers: tuple[int, ...], target: float) -> str | None:
    """Some left-to-right expression over all numbers that hits the target, or None."""
    for perm in itertools.permutations(numbers):
        for ops in itertools.product("+-*", repeat=len(perm) - 1):
            value, expr = perm[0], str(perm[0])
            for op, n in zip(ops, perm[1:]):
                value = value + n if op == "+" else value - n if op == "-" else value * n
                expr = f"({expr} {op} {n})"
            if abs(value - target) < 1e-9:
                return expr
    return None


def fake_completion(digest: str | None, prompt: str, max_new_tokens: int) -> tuple[str, int, str]:
    """(text, completion_tokens, finish type) from sha256(weights, prompt)."""
    h = hashlib.sha256(f"{digest or 'base'}\x00{prompt}".encode()).digest()
    numbers_m = re.search(r"numbers \[([\d\s]+)\]", prompt)
    target_m = re.search(r"equals (-?\d+(?:\.\d+)?)", prompt)
    numbers = tuple(int(x) for x in numbers_m.group(1).split()) if numbers_m else (h[5] % 50 + 1, h[6] % 50 + 1, h[7] % 50 + 1)
    target = float(target_m.group(1)) if target_m else 0.0
    think = " ".join(THINK_WORDS[b % len(THINK_WORDS)] for b in h[8 : 8 + 3 + h[1] % 8])
    kind = h[0] % 4
    if kind == 0:
        expr = solve(numbers, target) if len(numbers) <= 4 else None
        text = f" {think}</think>\n<answer>{expr or ' + '.join(map(str, numbers))}</answer>"
    elif kind == 1:
        text = f" {think}</think>\n<answer>{' * '.join(map(str, numbers[:2]))}</answer>"
    elif kind == 2:
        text = f" {think}</think> the answer is {numbers[0]}"
    else:
        text = " " + " ".join(THINK_WORDS[b % len(THINK_WORDS)] for b in (h * 4)[: 40 + h[2] % 40])
    pieces = re.findall(r"\s*\S+", text)
    if len(pieces) > max_new_tokens:
        return "".join(pieces[:max_new_tokens]), max_new_tokens, "length"
    return text, len(pieces), "stop"


class FakeState:
    """Everything the fake knows; HTTP-free so handlers stay small."""

    def __init__(self, *, model_path: str = "fake-base", lora_enabled: bool = True, max_lora_rank: int | None = 8, target_modules: list[str] | None = None,
                 max_loras_per_batch: int = 8, max_loaded_loras: int | None = None, decode: Callable[[list[int]], str] | None = None, startup_s: float = 0.0):
        self.model_path = model_path
        self.lora_enabled = lora_enabled
        self.max_lora_rank = max_lora_rank
        self.target_modules = set(target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        self.max_loras_per_batch = max_loras_per_batch
        self.max_loaded_loras = max_loaded_loras
        self.decode = decode
        self.ready_at = time.monotonic() + startup_s
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()
        self.ever: dict[str, str] = {}
        self.calls: list[tuple[str, Any]] = []
        self.silent_reloads = 0
        self.hits: dict[str, int] = {}  # every request, faulted or not
        self.faults: list[Fault] = []
        self.release_event = threading.Event()
        self.lock = threading.RLock()

    # --- faults ---------------------------------------------------------------------------

    def add_fault(self, endpoint: str, kind: str, **kw: Any) -> None:
        if kind not in ("status", "drop", "slow", "hang", "die"):
            raise ValueError(kind)
        with self.lock:
            self.faults.append(Fault(endpoint, kind, **kw))

    def take_fault(self, endpoint: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.endpoint == endpoint and f.times > 0:
                    f.seen += 1
                    if f.seen <= f.after:
                        return None
                    f.times -= 1
                    return f
        return None

    # --- API --------------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        with self.lock:
            self.calls.append((path, body))
        try:
            route = {
                ("GET", "/health"): self.health, ("GET", "/health_generate"): self.health,
                ("GET", "/model_info"): self.model_info, ("GET", "/get_model_info"): self.model_info,
                ("GET", "/server_info"): self.server_info, ("GET", "/v1/models"): self.models,
                ("POST", "/load_lora_adapter"): self.load, ("POST", "/unload_lora_adapter"): self.unload,
                ("POST", "/generate"): self.generate,
            }.get((method, path))
            if route is None:
                return 404, {"detail": "Not Found"}
            return 200, route(body)
        except Reject as r:
            return r.status, (r.payload if r.payload is not None else {"error": {"message": r.message}})

    def health(self, body: Any) -> str:
        if time.monotonic() < self.ready_at:
            raise Reject(503, "starting")
        return ""

    def model_info(self, body: Any) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True, "served_model_name": self.model_path, "weight_version": "default"}

    def server_info(self, body: Any) -> dict:
        return {"model_path": self.model_path, "enable_lora": self.lora_enabled, "max_lora_rank": self.max_lora_rank, "lora_target_modules": sorted(self.target_modules),
                "max_loras_per_batch": self.max_loras_per_batch, "max_loaded_loras": self.max_loaded_loras, "dp_size": 1}

    def models(self, body: Any) -> dict:
        with self.lock:
            data = [{"id": self.model_path, "object": "model", "root": self.model_path, "parent": None, "owned_by": "sglang"}]
            data += [{"id": n, "object": "model", "root": a.path, "parent": self.model_path, "owned_by": "sglang"} for n, a in self.loaded.items()]
        return {"object": "list", "data": data}

    def _lora_reply(self, ok: bool, message: str | None = None) -> dict:
        return {"success": ok, "error_message": message, "loaded_adapters": {n: a.path for n, a in self.loaded.items()}}

    def _fail_lora(self, message: str) -> Reject:
        return Reject(400, message, self._lora_reply(False, message))

    def _read_adapter(self, name: str, path: str) -> Adapter:
        folder = Path(path)
        config_path = folder / "adapter_config.json"
        if not folder.is_dir() or not config_path.is_file():
            raise self._fail_lora(f"Failed to load LoRA adapter {name}: {path} is not a local directory with adapter_config.json")
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise self._fail_lora(f"Failed to load LoRA adapter {name}: bad adapter_config.json ({exc})")
        if str(config.get("peft_type", "")).lower() != "lora":
            raise self._fail_lora(f"Failed to load LoRA adapter {name}: peft_type must be LORA, got {config.get('peft_type')}")
        if config.get("use_dora"):
            raise self._fail_lora(f"Failed to load LoRA adapter {name}: DoRA is not supported")
        if not (folder / "adapter_model.safetensors").is_file():
            raise self._fail_lora(f"Failed to load LoRA adapter {name}: no adapter_model.safetensors in {path}")
        modules = config.get("target_modules") or []
        modules = set([modules] if isinstance(modules, str) else modules)
        rank = int(config.get("r", 0))
        too_big = self.max_lora_rank is not None and rank > self.max_lora_rank
        if too_big or ("all" not in self.target_modules and modules != {"all-linear"} and not modules <= self.target_modules):
            raise self._fail_lora(f"LoRA adapter {name} with rank {rank} and modules {sorted(modules)} is incompatible with the current LoRA memory pool configuration")
        digest, _ = adapter_digest(folder)
        return Adapter(path, digest, rank)

    def _add(self, name: str, adapter: Adapter) -> None:
        self.loaded[name] = adapter
        self.ever[name] = adapter.path
        if self.max_loaded_loras is not None:
            while len(self.loaded) > self.max_loaded_loras:  # LRU auto-unload, like --max-loaded-loras
                self.loaded.popitem(last=False)

    def load(self, body: Any) -> dict:
        _expect_keys(body, {"lora_name", "lora_path"}, {"pinned"})
        if not self.lora_enabled:
            raise self._fail_lora("LoRA is not enabled. Please set `--enable-lora` when launching the server.")
        name, path = body["lora_name"], body["lora_path"]
        with self.lock:
            if name in self.loaded:
                raise self._fail_lora(f"Failed to load LoRA adapter {name} because it is already loaded")
            adapter = self._read_adapter(name, path)
            self._add(name, adapter)
            return self._lora_reply(True)

    def unload(self, body: Any) -> dict:
        _expect_keys(body, {"lora_name"}, set())
        if not self.lora_enabled:
            raise self._fail_lora("LoRA is not enabled. Please set `--enable-lora` when launching the server.")
        name = body["lora_name"]
        with self.lock:
            if name not in self.loaded:
                raise self._fail_lora(f"LoRA with name {name} does not exist. Loaded LoRAs: {list(self.loaded)}")
            del self.loaded[name]
            return self._lora_reply(True)

    def generate(self, body: Any) -> list:
        if not isinstance(body, dict):
            raise Reject(400, "request body must be a JSON object")
        unknown = set(body) - GENERATE_KEYS
        if unknown:
            raise Reject(400, f"unknown field: {sorted(unknown)[0]}")
        if ("text" in body) == ("input_ids" in body):
            raise Reject(400, "Either text or input_ids should be provided.")
        prompts = body.get("text", body.get("input_ids"))
        if not isinstance(prompts, list) or not prompts:
            raise Reject(400, "this fake only takes batched (list) prompts")
        if "input_ids" in body:
            if not all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts):
                raise Reject(400, "input_ids must be lists of ints")
            keys = [self.decode(p) if self.decode else ",".join(map(str, p)) for p in prompts]
        else:
            if not all(isinstance(p, str) for p in prompts):
                raise Reject(400, "text must be strings")
            keys = list(prompts)
        n = len(prompts)
        sampling = body.get("sampling_params", {})
        for params in sampling if isinstance(sampling, list) else [sampling]:
            if not isinstance(params, dict):
                raise Reject(400, "sampling_params must be an object")
            bad = set(params) - SAMPLING_KEYS
            if bad:
                raise Reject(400, f"unknown field: {sorted(bad)[0]}")
        if isinstance(sampling, list) and len(sampling) != n:
            raise Reject(400, f"sampling_params list length ({len(sampling)}) must match batch size ({n})")
        max_new_tokens = int((sampling[0] if isinstance(sampling, list) else sampling).get("max_new_tokens", 128))
        loras = body.get("lora_path")
        if loras is not None and not self.lora_enabled:
            raise Reject(400, "LoRA is not enabled. Please set `--enable-lora` when launching the server.")
        if isinstance(loras, list):
            if len(loras) != n:
                raise Reject(400, f"lora_path list length ({len(loras)}) must match batch size ({n})")
        else:
            loras = [loras] * n
        digests = []
        with self.lock:
            for name in loras:
                if name is None:
                    digests.append(None)
                    continue
                if name not in self.loaded:
                    if name not in self.ever:
                        raise Reject(400, f"Got LoRA adapter that has never been loaded: {name}")
                    self.silent_reloads += 1  # "Reloading evicted adapter": the real server does this too
                    self._add(name, self._read_adapter(name, self.ever[name]))
                self.loaded.move_to_end(name)
                digests.append(self.loaded[name].digest)
        out = []
        for key, digest, prompt in zip(keys, digests, prompts):
            text, tokens, finish = fake_completion(digest, key, max_new_tokens)
            reason = {"type": "length", "length": max_new_tokens} if finish == "length" else {"type": "stop", "matched": 2}
            meta = {"id": uuid.uuid4().hex, "finish_reason": reason, "prompt_tokens": len(prompt), "completion_tokens": tokens, "cached_tokens": 0, "e2e_latency": 0.0}
            out.append({"text": text, "output_ids": list(range(tokens)), "meta_info": meta})
        return out

    def add_startup_adapters(self, lora_paths: list[str]) -> None:
        for item in lora_paths:
            name, _, path = item.partition("=")
            if not path:
                name, path = Path(item).name, item
            self._add(name, self._read_adapter(name, path))


def _expect_keys(body: Any, required: set[str], optional: set[str]) -> None:
    if not isinstance(body, dict):
        raise Reject(400, "request body must be a JSON object")
    missing = required - set(body)
    if missing:
        raise Reject(400, f"missing field: {sorted(missing)[0]}")
    unknown = set(body) - required - optional
    if unknown:
        raise Reject(400, f"unknown field: {sorted(unknown)[0]}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet, unless running as a process
        if self.server.fake.verbose:
            sys.stderr.write("fake-sglang: " + (fmt % args) + "\n")

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        if path.startswith("/_fake/"):
            return self._control(path, raw)
        with fake.state.lock:
            fake.state.hits[path] = fake.state.hits.get(path, 0) + 1
        fault = fake.state.take_fault(path)
        if fault is not None:
            if fault.kind == "status":
                return self._send(fault.status, {"error": {"message": f"injected HTTP {fault.status}"}})
            if fault.kind == "drop":
                return self._drop()
            if fault.kind == "die":
                self._drop()
                fake.die()
                return
            if fault.kind == "slow":
                time.sleep(fault.seconds or 1.0)
            if fault.kind == "hang":
                released = fake.state.release_event.wait(fault.seconds)
                if fake.dead or (fault.seconds is None and not released):
                    return self._drop()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return self._send(400, {"error": {"message": "body is not JSON"}})
        status, payload = fake.state.handle(method, path, body)
        self._send(status, payload)

    def _control(self, path: str, raw: bytes) -> None:
        fake = self.server.fake
        body = json.loads(raw) if raw else {}
        if path == "/_fake/fault":
            fake.state.add_fault(body.pop("endpoint"), body.pop("kind"), **body)
            return self._send(200, {"ok": True})
        if path == "/_fake/release":
            fake.state.release_event.set()
            return self._send(200, {"ok": True})
        if path == "/_fake/state":
            return self._send(200, fake.snapshot())
        if path == "/_fake/die":
            self._drop()
            fake.die()
            return
        self._send(404, {"detail": "Not Found"})

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: "FakeSGLang"):
        self.fake = fake
        super().__init__(address, _Handler)


class FakeSGLang:
    """The fake on 127.0.0.1 (random port by default), served from a thread of this process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False, on_die: Callable[[], None] | None = None, **state: Any):
        self.host = host
        self.port = port
        self.verbose = verbose
        self.on_die = on_die
        self._state_kw = state
        self.state = FakeState(**state)
        self.dead = False
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "FakeSGLang":
        self._server = _HTTPServer((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self.dead = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.release_event.set()
        self._shutdown()

    def die(self) -> None:
        """Close the listening socket and every open connection (a crashed server)."""
        self._shutdown()
        if self.on_die is not None:
            self.on_die()

    def _shutdown(self) -> None:
        self.dead = True
        server, self._server = self._server, None
        if server is not None:
            threading.Thread(target=lambda: (server.shutdown(), server.server_close()), daemon=True).start()
            if threading.current_thread() is not self._thread:
                deadline = time.monotonic() + 5
                while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.01)
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def revive(self, *, keep_adapters: bool = False) -> "FakeSGLang":
        """Start again on the same port; a restarted server has lost its adapters."""
        if not keep_adapters:
            self.state = FakeState(**self._state_kw)
        self.state.release_event.clear()
        return self.start()

    def fault(self, endpoint: str, kind: str, **kw: Any) -> None:
        self.state.add_fault(endpoint, kind, **kw)

    def release(self) -> None:
        self.state.release_event.set()

    def calls(self, endpoint: str | None = None) -> list:
        with self.state.lock:
            return [b for p, b in self.state.calls if endpoint is None or p == endpoint]

    def snapshot(self) -> dict:
        with self.state.lock:
            counts: dict[str, int] = {}
            for p, _ in self.state.calls:
                counts[p] = counts.get(p, 0) + 1
            return {"pid": os.getpid(), "loaded": {n: a.path for n, a in self.state.loaded.items()}, "calls": counts, "hits": dict(self.state.hits),
                    "silent_reloads": self.state.silent_reloads, "ever": dict(self.state.ever)}

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)
        if add and self.dead:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeSGLang":
        return self.start() if self._server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --- as a process: sglang.launch_server's command line ----------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fake sglang.launch_server")
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--lora-target-modules", nargs="+", choices=sorted(LORA_MODULES))
    p.add_argument("--max-loras-per-batch", type=int, default=8)
    p.add_argument("--max-loaded-loras", type=int)
    p.add_argument("--lora-backend", choices=["triton", "csgmv", "ascend", "torch_native", "triton_v2"], default="csgmv")
    p.add_argument("--lora-paths", nargs="*")
    p.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"], default="auto")
    p.add_argument("--skip-server-warmup", action="store_true")
    # fake-only switches, for the lifecycle tests
    p.add_argument("--fake-startup-s", type=float, default=0.0, help="answer 503 on /health this long")
    p.add_argument("--fake-crash-on-start", action="store_true", help="print an error and exit 3")
    p.add_argument("--fake-children", type=int, default=0, help="child processes in our group, like the scheduler")
    p.add_argument("--fake-ignore-sigterm", action="store_true")
    p.add_argument("--fake-no-lora-endpoints", action="store_true", help="dynamic loading unavailable (404)")
    args = p.parse_args(argv)
    enable_lora = args.enable_lora or bool(args.lora_paths)
    if enable_lora and not args.lora_paths and (args.max_lora_rank is None or not args.lora_target_modules):
        p.error("When no initial --lora-paths is provided, you need to specify both --max-lora-rank and --lora-target-modules for LoRA initialization.")
    if args.max_loaded_loras is not None and args.max_loaded_loras < args.max_loras_per_batch:
        p.error("--max-loaded-loras must be >= --max-loras-per-batch")
    args.enable_lora = enable_lora
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(f"fake sglang pid {os.getpid()} starting on {args.host}:{args.port} (model {args.model_path})", flush=True)
    if args.fake_crash_on_start:
        print("RuntimeError: fake crash during startup (CUDA out of memory)", flush=True)
        return 3
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]) for _ in range(args.fake_children)]
    print(f"fake children {[c.pid for c in children]}", flush=True)
    stop = threading.Event()
    fake = FakeSGLang(args.host, args.port, verbose=True, on_die=lambda: os._exit(1), model_path=args.model_path, lora_enabled=args.enable_lora,
                      max_lora_rank=args.max_lora_rank, target_modules=args.lora_target_modules, max_loras_per_batch=args.max_loras_per_batch,
                      max_loaded_loras=args.max_loaded_loras, startup_s=args.fake_startup_s)
    if args.fake_no_lora_endpoints:
        original = fake.state.handle

        def no_lora(method: str, path: str, body: Any) -> tuple[int, Any]:
            if path in ("/load_lora_adapter", "/unload_lora_adapter"):
                return 404, {"detail": "Not Found"}
            return original(method, path, body)

        fake.state.handle = no_lora  # type: ignore[method-assign]
    if args.lora_paths:
        try:
            fake.state.add_startup_adapters(args.lora_paths)
        except Reject as r:
            print(f"ValueError: {r.message}", flush=True)
            return 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.fake_ignore_sigterm else (lambda *_: stop.set()))
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fake.start()
    print(f"fake sglang ready at {fake.url} with adapters {list(fake.state.loaded)}", flush=True)
    stop.wait()
    print("fake sglang: SIGTERM, shutting down", flush=True)
    for c in children:
        c.terminate()
    fake.stop()
    return 0


def write_launch_shim(folder: str | Path) -> dict[str, str]:
    """Make `python -m sglang.launch_server` run this fake; returns the env to launch it with."""
    pkg = Path(folder) / "sglang"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("# fake sglang for es-countdown's tests\n")
    (pkg / "launch_server.py").write_text("import sys\n\nfrom tests.fake_sglang import main\n\nsys.exit(main())\n")
    paths = [str(folder), str(PROJECT_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {"PYTHONPATH": os.pathsep.join(paths)}


if __name__ == "__main__":
    sys.exit(main())
