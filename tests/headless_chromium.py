"""Headless Chromium driven through its DevTools protocol: open a page, evaluate JavaScript in it,
take a screenshot. The browser is Debian's `chromium` package (or any Chromium-like binary on PATH
or in ES_CHROMIUM); the protocol goes over the `websockets` package Prefect already installs, so no
browser library (Playwright, Selenium) and no browser download is needed.

Used by tests/test_report_browser.py (does the report's image load?) and scripts/ui_screenshots.py
(the README's pictures of the Prefect UI).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from websockets.sync.client import connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """The browser to drive: ES_CHROMIUM if set, else the first of CANDIDATES on PATH."""
    if os.environ.get("ES_CHROMIUM"):
        return shutil.which(os.environ["ES_CHROMIUM"])
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


class Chromium:
    """One headless browser with one tab. `with Chromium() as browser: browser.open(url)`."""

    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 900, start_timeout: float = 60.0):
        binary = binary or chromium_path()
        if binary is None:
            raise FileNotFoundError(f"no Chromium found (tried ES_CHROMIUM, {', '.join(CANDIDATES)})")
        self._profile = tempfile.TemporaryDirectory(prefix="es-chromium-")
        args = [binary, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                "--remote-debugging-port=0", f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root (CI containers)
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._ids = itertools.count(1)
        try:
            self._socket = connect(self._page_socket_url(start_timeout), max_size=None, open_timeout=start_timeout)
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def _page_socket_url(self, timeout: float) -> str:
        # with port 0, Chromium picks a free port and writes it to DevToolsActivePort in the profile
        active = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self._process.returncode} before opening its DevTools port")
            if active.is_file() and active.read_text().strip():
                port = int(active.read_text().split()[0])
                pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json", timeout=5).json() if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise TimeoutError(f"chromium opened no DevTools port within {timeout:.0f} s")

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self._socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, poll: float = 0.25):
        """The first truthy value of `expression`, polled; TimeoutError with the last value if none."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"{expression[:120]} stayed {value!r} for {timeout:.0f} s")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the tab's viewport."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        socket = getattr(self, "_socket", None)
        if socket is not None:
            socket.close()
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(5)
        self._profile.cleanup()

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
