"""The final report: reward curve (PNG), held-out table (base vs final), where the ledger is.

Two copies of one markdown: `report.md` beside `reward_curve.png` in the run's report folder
(the image linked by its file name, so the folder can be moved or copied), and the Prefect UI's
report artifact, whose image is the same PNG inlined as a `data:image/png;base64` URI: a browser
showing the UI over http cannot load a `file://` link (nor reach the worker's disk), and both
Prefect UIs render an inlined image (tests/test_report_browser.py checks it in Chromium).
"""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from flows.progress import artifact_key  # noqa: E402

CURVE_FILE = "reward_curve.png"
REPORT_FILE = "report.md"


def reward_curve_figure(generations: list[tuple], evals: list[tuple]) -> Figure:
    """Mean and best member reward per generation, held-out evaluations of the centre, and the base
    model's (and warm start's) held-out reward as lines. The x axis counts generations done."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if generations:
        g = [r[0] + 1 for r in generations]
        ax.plot(g, [r[1] for r in generations], label="population mean reward (train batch)")
        ax.plot(g, [r[2] for r in generations], label="best member reward", alpha=0.6)
    heldout = [r for r in evals if r[-1] == "heldout"]
    centre = [(r[0], r[1]) for r in heldout if r[2] == "centre"]
    base = [(r[0], r[1]) for r in heldout if r[2] == "base"]
    warm = [(r[0], r[1]) for r in heldout if r[2] == "warm_start"]
    if centre:
        ax.plot([c[0] for c in centre], [c[1] for c in centre], "o-", label="centre, held-out mean reward")
    if base:
        ax.axhline(base[0][1], color="grey", linestyle="--", label="base model, held-out")
    if warm:
        ax.axhline(warm[0][1], color="tab:green", linestyle=":", label="warm start, held-out")
    done = [r[0] + 1 for r in generations] + [c[0] for c in centre]
    ax.set_xlim(0, max(done + [1]))  # from the base model (0 generations) to the last generation done
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # generations are whole: no tick at 1.2
    ax.set_xlabel("generations done")
    ax.set_ylabel("reward (0.1 x format + answer)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_reward_curve(generations: list[tuple], evals: list[tuple], path: Path) -> Path:
    fig = reward_curve_figure(generations, evals)
    try:
        fig.savefig(path)
    except OSError as exc:  # a full disk named no path
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return path


def png_data_uri(path: Path) -> str:
    """The PNG at `path` as a data URI, which any browser shows without a second request."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def report_markdown(run_id: str, generations: list[tuple], evals: list[tuple], ledger_path: Path, curve_src: str) -> str:
    """The report, its reward curve image taken from `curve_src` (a file name or a data URI)."""
    rows = "\n".join(
        f"| {split} | {model} | {g} | {n} | {rm:.4f} [{rl:.4f}, {rh:.4f}] | {100 * acc:.1f}% [{100 * al:.1f}, {100 * ah:.1f}] | {100 * fr:.1f}% |"
        for g, rm, model, rl, rh, acc, al, ah, fr, n, split in evals
    )
    return f"""# es-countdown run `{run_id}`

Generations: {len(generations)}. Ledger: `{ledger_path}` (query it: `es-countdown sql "SELECT * FROM generations WHERE run_id = '{run_id}'"`).

## Held-out sets (the paper's reward; 95% bootstrap intervals)
| set | model | after generation | n | mean reward | exact accuracy | format rate |
|---|---|---|---|---|---|---|
{rows}

## Reward curve
![reward curve]({curve_src})
"""


def write_report(ledger, run_id: str, run_dir: Path, ledger_path: Path) -> Path:
    _, generations = ledger.query("SELECT generation, reward_mean, reward_max FROM generations WHERE run_id = ? ORDER BY generation", [run_id])
    _, evals = ledger.query(
        "SELECT generation, reward_mean, model, reward_ci_low, reward_ci_high, accuracy, accuracy_ci_low, accuracy_ci_high, format_rate, n, split "
        "FROM evals WHERE run_id = ? ORDER BY split = 'heldout' DESC, split, generation, "
        "CASE model WHEN 'base' THEN 0 WHEN 'warm_start' THEN 1 ELSE 2 END",
        [run_id],
    )
    png = plot_reward_curve(generations, evals, run_dir / CURVE_FILE)
    path = run_dir / REPORT_FILE
    try:
        path.write_text(report_markdown(run_id, generations, evals, ledger_path, CURVE_FILE) + f"\nFile: `{png}`\n")
    except OSError as exc:  # a full disk named no path
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    create_markdown_artifact(
        markdown=report_markdown(run_id, generations, evals, ledger_path, png_data_uri(png)) + f"\nReport folder: `{run_dir}`\n",
        key=artifact_key(run_id, "report"), description=f"es-countdown report for {run_id}",
    )
    return path
