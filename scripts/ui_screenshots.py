"""Screenshots of a run in the Prefect UI (V2, the default) for the README: the flow run page, its
artifacts, the report artifact and one generation's table, taken by headless Chromium
(tests/headless_chromium.py) and saved as small PNGs.

    export PREFECT_API_URL=http://127.0.0.1:4200/api            # before the server (README: The Prefect UI)
    prefect server start --host 127.0.0.1 --port 4200 &
    es-countdown run --config configs/experiments/smoke.yaml --run-id smoke-ui
    python scripts/ui_screenshots.py smoke-ui               # -> docs/screenshots/*.png
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ and flows/ from a checkout

from flows.progress import artifact_key  # noqa: E402
from tests.headless_chromium import Chromium  # noqa: E402


def artifact(api: str, key: str) -> dict:
    """The newest artifact of `key` on the server at `api`."""
    try:
        r = requests.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}, timeout=10)
    except requests.ConnectionError:
        raise SystemExit(f"no Prefect server answers at {api} (--api or PREFECT_API_URL)") from None
    r.raise_for_status()
    if not r.json():
        raise SystemExit(f"no artifact {key} at {api}: was the run made against this server?")
    return r.json()[0]


def small_png(png: bytes, colors: int = 128) -> bytes:
    """The screenshot in a palette of `colors` (UI pages are flat colours: a quarter of the bytes)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def shoot(browser: Chromium, url: str, ready: str, path: Path, settle: float, size: tuple[int, int]) -> None:
    """A PNG of `url` in a viewport of `size` (width, height), once `ready` holds and `settle` s later."""
    width, height = size
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    browser.open(url)
    browser.wait_for(ready, timeout=90)
    time.sleep(settle)  # charts and fonts finish drawing after the data arrived
    browser.screenshot(path)
    path.write_bytes(small_png(path.read_bytes()))
    print(f"{path} ({path.stat().st_size // 1024} KiB) <- {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--api", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
    parser.add_argument("--out", default="docs/screenshots", type=Path)
    parser.add_argument("--generation", type=int, default=1, help="whose member table to show")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after a page shows its data")
    args = parser.parse_args(argv)
    api, ui = args.api.rstrip("/"), args.api.rstrip("/").removesuffix("/api")
    report = artifact(api, artifact_key(args.run_id, "report"))
    table = artifact(api, artifact_key(args.run_id, "gen", args.generation))
    flow_run = report["flow_run_id"]
    args.out.mkdir(parents=True, exist_ok=True)
    text = "(document.body?.innerText ?? '').includes({!r})".format  # no body while a page loads
    with Chromium() as browser:
        # the task runs' timeline is a canvas (no text to wait for): its element and the run's task count
        timeline = "document.querySelector('canvas') !== null && " + text("Task runs")
        shoot(browser, f"{ui}/v2/runs/flow-run/{flow_run}", timeline, args.out / "prefect-flow-run.png", args.settle, (1280, 800))
        # tall enough for the timeline and, under it, the cards of the run's artifacts
        shoot(browser, f"{ui}/v2/runs/flow-run/{flow_run}?tab=Artifacts", text(artifact_key(args.run_id, "report")),
              args.out / "prefect-artifacts.png", args.settle, (1280, 1100))
        # tall enough for the held-out table and the reward curve under it
        curve = "[...document.images].some(i => i.alt === 'reward curve' && i.complete && i.naturalWidth > 0)"
        shoot(browser, f"{ui}/v2/artifacts/artifact/{report['id']}", curve, args.out / "prefect-report.png", args.settle, (1280, 1400))
        shoot(browser, f"{ui}/v2/artifacts/artifact/{table['id']}", text("mean of"), args.out / "prefect-generation-table.png", args.settle,
              (1440, 720))
    return 0


if __name__ == "__main__":
    sys.exit(main())
