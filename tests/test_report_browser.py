"""The report's reward curve as a user sees it: a real `prefect server start` (UI on), the report
artifact written to it, and headless Chromium opening the artifact's page in both Prefect UIs (V1 at
/, V2 at /v2): the image must load (naturalWidth is the PNG's width; a file:// link gives 0).

Needs Chromium (Debian: `apt-get install chromium`; scripts/install.sh installs it when it runs as
root on Debian, as CI does); skipped, saying so, where there is none.
"""

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prefect import flow

from flows.progress import artifact_key
from flows.report import CURVE_FILE, write_report
from tests.headless_chromium import Chromium, chromium_path
from tests.test_report import recorded_run

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="no Chromium on PATH (Debian: apt-get install chromium; scripts/install.sh does it as root): "
                       "the report's image is checked in a real browser only where one is installed"),
]

# the <img> of the curve once the browser has finished with it: its source and decoded width
CURVE_IMAGE = ("(() => { const i = [...document.images].find(i => i.alt === 'reward curve');"
               " return i && i.complete ? {src: i.getAttribute('src') || '', width: i.naturalWidth} : null })()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` with its UI, PREFECT_API_URL exported first (the UI's API address)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = tmp_path / "server.log"
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not _healthy(url):
            if time.time() > deadline or server.poll() is not None:
                pytest.fail("prefect server did not become healthy: " + log.read_text()[-2000:])
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.ConnectionError:
        return False


def png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]  # the IHDR chunk's width


def test_the_report_curve_loads_in_both_prefect_uis_and_printed_links_follow_prefect_ui_url(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
    from prefect.utilities.urls import url_for

    data = tmp_path / "data"
    run_dir = data / "reports" / "report-run"
    run_dir.mkdir(parents=True)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        flow(write_report, name="report")(recorded_run(data), "report-run", run_dir, data / "ledger.duckdb")
    r = requests.post(f"{prefect_server}/artifacts/filter", json={"artifacts": {"key": {"any_": [artifact_key("report-run", "report")]}}}, timeout=10)
    r.raise_for_status()
    (artifact,) = r.json()
    ui = prefect_server.removesuffix("/api")
    width = png_width(run_dir / CURVE_FILE)

    with Chromium() as browser:
        for page in (f"{ui}/artifacts/artifact/{artifact['id']}", f"{ui}/v2/artifacts/artifact/{artifact['id']}"):
            browser.open(page)
            image = browser.wait_for(CURVE_IMAGE, timeout=90)
            assert image["width"] == width, f"{page}: the reward curve did not load (src {image['src'][:40]!r})"

        # The links Prefect prints ("View at ...") open V1, the other UI than `/` does; the README's
        # `export PREFECT_UI_URL=<server>/v2` makes them open V2. Each UI offers to switch to the other.
        for ui_url, shown in ((None, "Switch to V2 UI"), (f"{ui}/v2", "Switch to V1 UI")):
            with temporary_settings(updates={PREFECT_API_URL: prefect_server, PREFECT_UI_URL: ui_url}):
                link = url_for("flow-run", artifact["flow_run_id"])
            browser.open(link)
            browser.wait_for(f"(document.body?.innerText ?? '').includes({shown!r})", timeout=90)
