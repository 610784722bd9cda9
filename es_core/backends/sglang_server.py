"""Launch, watch, stop and restart one SGLang server process that we own.

`python -m sglang.launch_server ... --enable-lora --max-lora-rank R --lora-target-modules ...`
is started in its own process group (start_new_session), its output appended to a log file in the
data dir, and it is ready when `/health_generate` answers 200 (a 1-token generation). Stop is
SIGTERM to the whole group (the server forks scheduler and detokenizer processes), then SIGKILL
after a grace period. Restart mode relaunches with `--lora-paths name=path ...` for a set of
adapters: the first prototype's workaround when dynamic loading is unavailable.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from es_core.backends.base import BackendError
from es_core.backends.sglang_client import SGLangClient, ServerUnavailable, one_line
from es_core.settings import Settings

log = logging.getLogger(__name__)


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Something accepts connections on host:port (a TIME_WAIT leftover does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LaunchSpec:
    """Everything on the sglang.launch_server command line (flags verified against 0.5.23)."""

    model_path: str
    port: int
    max_lora_rank: int
    lora_target_modules: tuple[str, ...]
    max_loras_per_batch: int
    max_loaded_loras: int
    python: str = "python"
    host: str = "127.0.0.1"
    lora_backend: str = "csgmv"
    dtype: str = "auto"
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, lora_paths: Mapping[str, str] | None = None) -> list[str]:
        # --max-lora-rank and --lora-target-modules are required when no --lora-paths are given,
        # and keep the GPU pool's shape fixed when they are.
        lora_paths = dict(lora_paths or {})
        cmd = [
            *shlex.split(self.python), "-m", "sglang.launch_server",
            "--model-path", str(self.model_path),
            "--host", self.host, "--port", str(self.port),
            "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank),
            "--lora-target-modules", *self.lora_target_modules,
            # GPU slots: distinct adapters in one running batch, base-model requests count as one.
            "--max-loras-per-batch", str(self.max_loras_per_batch),
            # CPU-held adapters; must be >= --max-loras-per-batch and hold every --lora-paths entry.
            "--max-loaded-loras", str(max(self.max_loaded_loras, self.max_loras_per_batch, len(lora_paths))),
            "--lora-backend", self.lora_backend,
        ]
        if self.dtype != "auto":
            cmd += ["--dtype", self.dtype]
        if lora_paths:
            cmd += ["--lora-paths", *(f"{name}={path}" for name, path in lora_paths.items())]
        return cmd + list(self.extra_args)

    @classmethod
    def from_settings(cls, settings: Settings, base_model_path: str | Path, port: int | None = None) -> "LaunchSpec":
        sg = settings.backend.sglang
        population = settings.es.population
        return cls(
            model_path=str(base_model_path),
            port=port if port is not None else sg.port,
            max_lora_rank=settings.adapter_rank,
            lora_target_modules=tuple(settings.lora.modules),
            max_loras_per_batch=sg.max_loras_per_batch or population + 1,
            max_loaded_loras=sg.max_loaded_loras or 2 * population,
            python=sg.python,
            host=sg.host,
            lora_backend=sg.lora_backend,
            dtype=settings.model.dtype,
            extra_args=tuple(sg.extra_args),
        )


class SGLangServer:
    """One server process we launched. Not thread-safe by itself: SGLangBackend serializes
    start/stop/restart per server."""

    def __init__(self, spec: LaunchSpec, log_path: str | Path, *, startup_timeout_s: float = 900.0, stop_grace_s: float = 30.0, env: Mapping[str, str] | None = None, pick_free_port: bool = True):
        self.spec = spec
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.env = dict(env) if env is not None else None
        self.pick_free_port = pick_free_port
        self.lora_paths: dict[str, str] = {}
        self.starts = 0
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._lock = threading.RLock()

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, lora_paths: Mapping[str, str] | None = None) -> None:
        """Launch and wait until /health_generate is 200; a process that dies first fails at once
        with the log's tail. The port is kept across restarts (clients hold the URL)."""
        with self._lock:
            if self.alive():
                raise BackendError(f"SGLang {self.url}: start: already running (pid {self.pid})")
            if port_open(self.spec.host, self.spec.port):
                if self.starts == 0 and self.pick_free_port:
                    old = self.spec.port
                    self.spec = replace(self.spec, port=free_port(self.spec.host))
                    log.warning("port %d is taken by another process; launching SGLang on %d", old, self.spec.port)
                else:
                    raise BackendError(f"SGLang {self.url}: start: port {self.spec.port} is taken by another process")
            self.lora_paths = dict(lora_paths or {})
            cmd = self.spec.command(self.lora_paths)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab", buffering=0)
            self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch #{self.starts + 1}: {shlex.join(cmd)}\n".encode())
            env = None if self.env is None else {**os.environ, **self.env}
            try:
                self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
            except OSError as exc:
                self._close_log()
                raise BackendError(f"SGLang {self.url}: start: cannot run {cmd[0]!r} ({exc})") from None
            self.starts += 1
            log.info("SGLang launched (pid %d, log %s): %s", self._proc.pid, self.log_path, shlex.join(cmd))
            client = SGLangClient(self.url)
            try:
                waited = client.wait_healthy(self.startup_timeout_s, dead=self._death)
            except ServerUnavailable as exc:
                tail = self.log_tail()
                self.stop()
                raise BackendError(f"{exc}; log {self.log_path}: {one_line(tail, 800)}") from None
            finally:
                client.close()
            log.info("SGLang %s healthy after %.1f s", self.url, waited)

    def _death(self) -> str | None:
        if self._proc is not None and self._proc.poll() is not None:
            return f"the server process exited with code {self._proc.returncode} before it was healthy; log tail: {self.log_tail()}"
        return None

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period; idempotent."""
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("SGLang %s (pid %d) ignored SIGTERM for %.0f s; SIGKILL", self.url, proc.pid, grace_s)
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                # Children that outlived the leader (scheduler, detokenizer) go with the group.
                _signal_group(proc.pid, signal.SIGKILL)
            self._close_log()

    def restart(self, lora_paths: Mapping[str, str] | None = None, reason: str = "") -> None:
        with self._lock:
            log.warning("restarting SGLang %s%s", self.url, f": {reason}" if reason else "")
            self.stop()
            self.start(lora_paths)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "SGLangServer":
        if not self.alive():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
