"""HTTP client for one SGLang server: health, LoRA load/unload, batched greedy /generate.

Follows SGLang 0.5.23's native API as written up in shared/research/sglang.md (from the source):
`/health_generate`, `/v1/models`, `/load_lora_adapter`, `/unload_lora_adapter`, `/generate`.
Transient faults (connection refused or reset, 5xx, timeouts) are retried with exponential
backoff; a 4xx is the server refusing the request and is raised at once. Every error is a
`BackendError` of one line naming the server URL, the step and the adapter.

Where we depart from SGLang's own client code: we never send the OpenAI routes (a bare adapter
name as `model` silently runs the base model there), we check adapter folders on the client
before loading (the server only warns when weight names match no module), and an unload has its
own short timeout (sgl-project/sglang#36894: unload can hang forever).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import requests

from es_core.backends.base import BackendError
from es_core.evaluation import Completion
from es_core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, AdapterSpec, check_adapter_matches, load_adapter

log = logging.getLogger(__name__)

# The only sampling keys we send: unknown keys are rejected by the server ("unknown field").
GREEDY = {"temperature": 0}


class ServerUnavailable(BackendError):
    """The server did not answer usefully (connection refused/reset, 5xx, timeout) after retries."""


class RequestRejected(BackendError):
    """The server answered 4xx: the request itself is wrong (or the adapter is)."""

    def __init__(self, message: str, status: int = 400, detail: str = ""):
        super().__init__(message)
        self.status = status
        self.detail = detail


class AdapterNotLoaded(RequestRejected):
    """/generate named an adapter the server does not hold (e.g. the server was restarted)."""


class LoRAUnavailable(RequestRejected):
    """Dynamic LoRA loading is not available on this server (no --enable-lora, old version, dp>1)."""


class UnloadTimeout(BackendError):
    """/unload_lora_adapter did not answer within its timeout (sgl-project/sglang#36894)."""


def one_line(text: Any, limit: int = 400) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def describe(names: Sequence[str | None]) -> str:
    """`g12_m000` or `g12_m000..g12_m014 (15 adapters)` for error lines."""
    named = [n for n in names if n]
    if not named:
        return "base model"
    uniq = list(dict.fromkeys(named))
    return uniq[0] if len(uniq) == 1 else f"{uniq[0]}..{uniq[-1]} ({len(uniq)} adapters)"


class SGLangClient:
    """One server URL. Thread-safe: one pooled requests.Session shared by all callers."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 1800.0,
        unload_timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        pool_size: int = 16,
    ):
        self.url = url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.unload_timeout_s = unload_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    # --- plumbing ----------------------------------------------------------------------------

    def _where(self, step: str, adapter: str = "") -> str:
        return f"SGLang {self.url}: {step}" + (f" {adapter}" if adapter else "")

    def _request(self, method: str, path: str, *, step: str, adapter: str = "", body: Any = None, read_timeout_s: float | None = None, retries: int | None = None, retry_timeouts: bool = True) -> requests.Response:
        """One call with retries on transient faults; 4xx raises RequestRejected at once."""
        attempts = 1 + (self.retries if retries is None else retries)
        timeout = (self.connect_timeout_s, read_timeout_s or self.request_timeout_s)
        cause = ""
        for attempt in range(attempts):
            try:
                response = self._session.request(method, self.url + path, json=body, timeout=timeout)
            except requests.exceptions.ReadTimeout as exc:
                cause = f"no answer within {timeout[1]:g} s"
                if not retry_timeouts:
                    raise ServerUnavailable(f"{self._where(step, adapter)}: {cause}") from exc
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.exceptions.Timeout) as exc:
                cause = f"connection failed ({one_line(type(exc).__name__ + ': ' + str(exc), 160)})"
            else:
                if response.status_code < 400:
                    return response
                detail = _error_detail(response)
                if response.status_code < 500:
                    raise _rejection(self._where(step, adapter), response.status_code, detail)
                cause = f"HTTP {response.status_code} {detail}"
            if attempt + 1 < attempts:
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                log.warning("%s: %s; retry %d/%d in %.1f s", self._where(step, adapter), one_line(cause, 200), attempt + 1, attempts - 1, delay)
                time.sleep(delay)
        raise ServerUnavailable(f"{self._where(step, adapter)}: {one_line(cause)} (after {attempts} attempts)")

    # --- health and info --------------------------------------------------------------------

    def healthy(self, timeout_s: float = 30.0) -> bool:
        """One GET /health_generate (a 1-token generation on the server): 200 or not."""
        try:
            r = self._session.get(self.url + "/health_generate", timeout=(min(self.connect_timeout_s, 2.0), timeout_s))
        except requests.exceptions.RequestException:
            return False
        return r.status_code == 200

    def wait_healthy(self, timeout_s: float, *, poll_s: float = 1.0, dead: Callable[[], str | None] | None = None) -> float:
        """Poll /health_generate until 200; `dead()` returns a reason when the process died
        (then fail at once). Returns the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            if dead is not None and (reason := dead()):
                raise ServerUnavailable(f"{self._where('startup')}: {one_line(reason, 1200)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(f"{self._where('startup')}: /health_generate not 200 within {timeout_s:g} s")
            if self.healthy(timeout_s=max(1.0, min(30.0, remaining))):
                return time.monotonic() - start
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def model_info(self) -> dict:
        return self._request("GET", "/model_info", step="model_info", read_timeout_s=30).json()

    def server_info(self) -> dict:
        return self._request("GET", "/server_info", step="server_info", read_timeout_s=30).json()

    def loaded_adapters(self) -> dict[str, str]:
        """name -> path of every adapter the server holds (GET /v1/models, the base excluded)."""
        data = self._request("GET", "/v1/models", step="list adapters", read_timeout_s=30).json()
        return {m["id"]: m.get("root", "") for m in data.get("data", []) if m.get("parent")}

    # --- adapters ---------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path, *, replace: bool = True, checker: "AdapterChecker | None" = None) -> dict[str, str]:
        """POST /load_lora_adapter. A name the server already holds (a leftover of a crashed run,
        or a retried load whose answer was lost) is unloaded and loaded again when `replace`, so
        the server's weights are always the folder's. Returns the server's loaded name -> path."""
        path = str(path)
        adapter = f"{name} ({path})"
        if checker is not None:
            try:
                checker.check(path)
            except AdapterError as exc:
                raise RequestRejected(f"{self._where('check before load', adapter)}: {one_line(exc)}", 0, str(exc)) from None
        body = {"lora_name": name, "lora_path": path}
        try:
            response = self._request("POST", "/load_lora_adapter", step="load", adapter=adapter, body=body, read_timeout_s=max(self.unload_timeout_s, 120.0))
        except RequestRejected as exc:
            if "already loaded" in exc.detail and replace:
                log.info("%s: already loaded; unloading and loading again", self._where("load", adapter))
                self.unload_adapter(name)
                response = self._request("POST", "/load_lora_adapter", step="load (after unload)", adapter=adapter, body=body, read_timeout_s=max(self.unload_timeout_s, 120.0))
            else:
                raise
        return dict((response.json() or {}).get("loaded_adapters") or {})

    def unload_adapter(self, name: str, *, timeout_s: float | None = None, missing_ok: bool = True) -> None:
        """POST /unload_lora_adapter with its own timeout: a hang raises UnloadTimeout (restart the
        server then). An unknown name is fine when `missing_ok` (the goal is that it is gone)."""
        timeout_s = timeout_s or self.unload_timeout_s
        try:
            self._request("POST", "/unload_lora_adapter", step="unload", adapter=name, body={"lora_name": name}, read_timeout_s=timeout_s, retry_timeouts=False)
        except RequestRejected as exc:
            if missing_ok and "does not exist" in exc.detail:
                return
            raise
        except ServerUnavailable as exc:
            if "no answer within" in str(exc):
                raise UnloadTimeout(f"{self._where('unload', name)}: no answer within {timeout_s:g} s (sglang#36894: unload can hang)") from None
            raise

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], loras: Sequence[str | None] | None, max_new_tokens: int, *, retries: int | None = None) -> list[Completion]:
        """Greedy completions, one per prompt, in order. `prompts` are strings (`text`) or token-id
        lists (`input_ids`, tokenized by the caller with add_special_tokens=False); `loras[i]` is
        the adapter name for prompt i (None: the base model)."""
        prompts = list(prompts)
        if not prompts:
            return []
        if loras is not None and len(loras) != len(prompts):
            raise ValueError(f"{len(loras)} adapter names for {len(prompts)} prompts")
        body: dict[str, Any] = {"sampling_params": {**GREEDY, "max_new_tokens": int(max_new_tokens)}}
        if isinstance(prompts[0], str):
            body["text"] = prompts
        else:
            body["input_ids"] = [[int(t) for t in p] for p in prompts]
        if loras is not None and any(n is not None for n in loras):
            body["lora_path"] = list(loras)
        adapter = describe(loras or [])
        try:
            response = self._request("POST", "/generate", step="generate", adapter=adapter, body=body, retries=retries)
        except RequestRejected as exc:
            if "never been loaded" in exc.detail or "does not exist" in exc.detail or "not loaded" in exc.detail:
                raise AdapterNotLoaded(str(exc), exc.status, exc.detail) from None
            raise
        items = response.json()
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or len(items) != len(prompts):
            raise BackendError(f"{self._where('generate', adapter)}: expected {len(prompts)} results, got {one_line(repr(items)[:200])}")
        return [self._completion(item, adapter) for item in items]

    def _completion(self, item: dict, adapter: str) -> Completion:
        meta = item.get("meta_info") or {}
        reason = meta.get("finish_reason")
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind == "abort":
            message = reason.get("message", "") if isinstance(reason, dict) else ""
            raise ServerUnavailable(f"{self._where('generate', adapter)}: request aborted by the server {one_line(message, 200)}")
        tokens = meta.get("completion_tokens")
        if tokens is None:
            tokens = len(item.get("output_ids") or [])
        return Completion(text=item.get("text", ""), completion_tokens=int(tokens), finish_reason="length" if kind == "length" else "stop", server=self.url)


def _error_detail(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return one_line(response.text or response.reason or "", 300)
    if isinstance(data, dict):
        for key in ("error_message", "error", "message", "detail"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value
            if value:
                return one_line(value, 300)
    return one_line(data, 300)


def _rejection(where: str, status: int, detail: str) -> RequestRejected:
    lowered = detail.lower()
    cls = RequestRejected
    if status == 404 or "lora is not enabled" in lowered or "not supported for dynamic lora" in lowered:
        cls = LoRAUnavailable
    return cls(f"{where}: HTTP {status} {detail}", status, detail)


@dataclass
class _Checked:
    key: tuple
    spec: AdapterSpec


class AdapterChecker:
    """Client-side check of an adapter folder before it is loaded: PEFT LoRA config, every tensor
    key a real Linear of the base model with the right shape, rank and modules within what the
    server was launched with. The server itself only warns when weight names match no module
    (they are then skipped and the adapter silently acts as the base model there)."""

    def __init__(self, base_model_path: str | Path | None = None, *, max_rank: int | None = None, target_modules: Sequence[str] | None = None):
        self.base_model_path = Path(base_model_path) if base_model_path else None
        self.max_rank = max_rank
        self.target_modules = set(target_modules) if target_modules else None
        self._targets: dict[tuple, list] = {}
        self._done: dict[str, _Checked] = {}
        self._lock = threading.Lock()

    def check(self, folder: str | Path) -> AdapterSpec:
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"adapter folder missing: {folder}")
        key = tuple(_stat_key(folder / f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
        real = os.path.realpath(folder)
        with self._lock:
            hit = self._done.get(real)
        if hit is not None and hit.key == key:
            return hit.spec
        tensors, spec = load_adapter(folder)
        if self.max_rank is not None and spec.rank > self.max_rank:
            raise AdapterError(f"{folder}: rank {spec.rank} > the server's --max-lora-rank {self.max_rank}")
        if self.target_modules is not None and not set(spec.target_modules) <= self.target_modules:
            extra = sorted(set(spec.target_modules) - self.target_modules)
            raise AdapterError(f"{folder}: modules {extra} are not in the server's --lora-target-modules {sorted(self.target_modules)}")
        if self.base_model_path is not None:
            check_adapter_matches(tensors, self._targets_for(spec), spec.rank)
        with self._lock:
            self._done[real] = _Checked(key, spec)
        return spec

    def _targets_for(self, spec: AdapterSpec) -> list:
        from es_core.lora import find_targets_in_folder

        key = (spec.layers, spec.target_modules)
        with self._lock:
            if key not in self._targets:
                self._targets[key] = find_targets_in_folder(self.base_model_path, list(spec.layers), list(spec.target_modules))
            return self._targets[key]


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (str(path), None)
    return (str(path), st.st_mtime_ns, st.st_size)
