"""The final report: its reward curve is inlined in the Prefect artifact (a browser on the UI's http
page cannot load a file:// link), linked by file name in report.md, and counts whole generations."""

import asyncio
import base64
import re
from pathlib import Path

import pytest
from prefect import flow

from artifacts.ledger import Ledger
from flows.progress import artifact_key
from flows.report import CURVE_FILE, report_markdown, reward_curve_figure, write_report
from tests.test_ledger import fake_generation, record_fake_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE = re.compile(r"!\[reward curve\]\(([^)]*)\)")


def recorded_run(root: Path, run_id: str = "report-run", generations: int = 3) -> Ledger:
    """A ledger with `generations` generations, the base model's and two centres' held-out rows."""
    ledger = Ledger(root)
    record_fake_run(ledger, run_id)
    for g in range(generations):
        ledger.commit_generation(*fake_generation(run_id, g))
    for model, g, reward in (("base", 0, 0.01), ("centre", 2, 0.03), ("centre", generations, 0.05)):
        ledger.record_eval({
            "run_id": run_id, "generation": g, "split": "heldout", "model": model, "adapter_sha256": None, "n": 8, "reward_mean": reward,
            "reward_ci_low": reward - 0.01, "reward_ci_high": reward + 0.01, "accuracy": 0.0, "accuracy_ci_low": 0.0,
            "accuracy_ci_high": 0.0, "format_rate": 0.5, "samples_sha256": None,
        })
    return ledger


def read_report_artifact(key: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    artifacts = asyncio.run(read())
    assert len(artifacts) == 1, artifacts
    return {"markdown": artifacts[0].data, "id": str(artifacts[0].id)}


@pytest.mark.parametrize("generations", [1, 2, 3, 7])
def test_the_reward_curve_ticks_whole_generations(generations):
    rows = [(g, 0.01 * g, 0.02 * g) for g in range(generations)]
    evals = [(generations, 0.05, "centre", 0, 0, 0, 0, 0, 0, 8, "heldout")]
    ax = reward_curve_figure(rows, evals).axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_report_markdown_takes_the_image_source_it_is_given():
    markdown = report_markdown("r", [(0, 0.1, 0.2)], [], Path("/data/ledger.duckdb"), "data:image/png;base64,AAAA")
    assert IMAGE.findall(markdown) == ["data:image/png;base64,AAAA"]


def test_the_report_artifact_inlines_the_curve_and_report_md_links_it_by_name(tmp_path, prefect_harness):
    ledger = recorded_run(tmp_path / "data")
    run_dir = tmp_path / "data" / "reports" / "report-run"
    run_dir.mkdir(parents=True)
    path = flow(write_report, name="report")(ledger, "report-run", run_dir, tmp_path / "data" / "ledger.duckdb")  # as the flow calls it

    png = (run_dir / CURVE_FILE).read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    # report.md: the PNG by its file name, so it shows wherever the folder goes
    assert IMAGE.findall(path.read_text()) == [CURVE_FILE]
    assert (path.parent / CURVE_FILE).is_file()
    # the UI's artifact: the same PNG, inlined, and no file:// link anywhere
    markdown = read_report_artifact(artifact_key("report-run", "report"))["markdown"]
    (source,) = IMAGE.findall(markdown)
    prefix = "data:image/png;base64,"
    assert source.startswith(prefix), source[:80]
    assert base64.b64decode(source[len(prefix):], validate=True) == png
    assert "file://" not in markdown
