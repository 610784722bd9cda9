"""The README's learning results from a data dir that `benchmarks.learning_runs` filled: a markdown
table (held-out accuracy with 95% intervals on both held-out sets, GPU minutes, the command of each
row), a PNG of held-out accuracy against ES generations and against GPU minutes, and what the
ledger says of the ES signal (how much the members and the prompts tell apart).

    python -m benchmarks.learning_report DATA_DIR [--png docs/results/learning.png]
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from artifacts.ledger import Ledger  # noqa: E402
from artifacts.slim import slim_copy  # noqa: E402
from benchmarks.learning_runs import CONFIG, RECIPE_SETS, RECIPES, Start  # noqa: E402

SETS = ("heldout", "paper-test")


def evals(ledger: Ledger, run_id: str, model: str) -> dict[int, dict[str, tuple]]:
    """generation -> set -> (accuracy, low, high, format rate, n)."""
    _, rows = ledger.query(
        "SELECT generation, split, accuracy, accuracy_ci_low, accuracy_ci_high, format_rate, n FROM evals WHERE run_id = ? AND model = ? ORDER BY generation",
        [run_id, model],
    )
    out: dict[int, dict[str, tuple]] = {}
    for g, split, *values in rows:
        out.setdefault(g, {})[split] = tuple(values)
    return out


def warm_start_of(ledger: Ledger, run_id: str) -> dict:
    _, rows = ledger.query("SELECT w.steps, w.seconds FROM warm_starts w JOIN runs r USING (warm_start_sha256) WHERE r.run_id = ?", [run_id])
    return {"steps": rows[0][0], "seconds": rows[0][1]} if rows else {"steps": 0, "seconds": 0.0}


def cell(values: dict[str, tuple] | None, split: str) -> str:
    if not values or split not in values:
        return ""
    acc, lo, hi, _, n = values[split]
    return f"{100 * acc:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def fmt(values: dict[str, tuple] | None) -> str:
    return f"{100 * values['heldout'][3]:.0f}%" if values and "heldout" in values else ""


def es_seconds(ledger: Ledger, run_id: str, generations: int) -> float:
    """Wall seconds of a run's first `generations` generations (its GPU time when it ran alone)."""
    _, rows = ledger.query("SELECT coalesce(sum(wall_seconds), 0) FROM generations WHERE run_id = ? AND generation < ?", [run_id, generations])
    return rows[0][0]


def table(ledger: Ledger, final: dict | None, recipes: dict[str, list[str]] = RECIPES, alone: bool = False,
          baseline: Ledger | None = None, start: Start = Start()) -> tuple[str, list]:
    """The markdown table and the points of the GPU-minutes plot. `alone`: every recipe ran alone,
    its generations' wall seconds are its GPU time; `baseline`: the ledger of the supervised runs;
    `start`: the warm start the recipes began from."""
    rows, points = [], []
    warm = warm_start_of(ledger, start.run_id)
    base = evals(ledger, start.run_id, "base").get(0)
    run_cmd = f"es-countdown run --config {CONFIG}"
    warm_cmd = f"{run_cmd} --run-id {start.run_id} --set es.generations=0{''.join(' ' + a for a in start.sets())}"
    rows.append(("base model (SmolLM2-135M-Instruct)", "", "", "0", base, f"`{warm_cmd}` (its base row)"))
    warm_eval = evals(ledger, start.run_id, "warm_start").get(0)
    rows.append((f"warm start ({warm['steps']} steps)", warm["steps"], 0, f"{warm['seconds'] / 60:.1f}", warm_eval, f"`{warm_cmd}`"))
    points.append(("supervised", warm["seconds"] / 60, warm_eval))
    s_gen = final["solo_seconds_per_generation"] if final else None
    for recipe, overrides in recipes.items():
        run_id = start.name(recipe)
        centre = evals(ledger, run_id, "centre")
        if not centre:
            continue
        g = max(centre)
        timed = alone or (final is not None and run_id == final["es_run"])  # side by side: no GPU time of their own

        def gpu_minutes(gen: int) -> float:
            return (warm["seconds"] + (es_seconds(ledger, run_id, gen) if alone else gen * s_gen)) / 60

        minutes = f"{gpu_minutes(g):.1f}" if timed else "(side by side)"
        sets = "".join(f" --set {kv}" for kv in overrides) + "".join(" " + a for a in start.sets())
        where = "`python -m benchmarks.learning_runs sweep DATA_DIR`" if not final or run_id != final["es_run"] else "`... learning_runs final DATA_DIR`"
        rows.append((f"ES `{run_id}`", warm["steps"], g, minutes, centre[g], f"`{run_cmd} --run-id {run_id} --set es.generations={g}{sets}` ({where})"))
        if timed:  # from the warm start it continues
            points += [(f"ES `{run_id}`", warm["seconds"] / 60, warm_eval)] + [(f"ES `{run_id}`", gpu_minutes(gen), values) for gen, values in sorted(centre.items())]
    supervised = baseline or ledger
    for run_id in (start.name("sft-half"), start.name("sft-matched")):
        w = warm_start_of(supervised, run_id)
        values = evals(supervised, run_id, "warm_start").get(0)
        if values:
            rows.append((f"warm start continued (`{run_id}`)", w["steps"], 0, f"{w['seconds'] / 60:.1f}", values,
                         f"`{run_cmd} --run-id {run_id} --set es.generations=0 --set warm_start.steps={w['steps']}`"))
            points.append(("supervised", w["seconds"] / 60, values))
    lines = ["| model | warm-start steps | ES generations | GPU minutes | held-out accuracy (2,000 generated) | paper test accuracy (2,000) | exact format | command |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {steps} | {g} | {minutes} | {cell(v, 'heldout')} | {cell(v, 'paper-test')} | {fmt(v)} | {cmd} |" for name, steps, g, minutes, v, cmd in rows]
    return "\n".join(lines), points


def signal(ledger: Ledger, run_id: str) -> str:
    """How much an ES generation tells the members apart: spread of member rewards, prompts where
    the members disagree (some right, some wrong), distinct completions per prompt."""
    _, rows = ledger.query(
        """WITH per_prompt AS (
               SELECT generation, problem_id, sum(correct::INTEGER) AS n_right, count(*) AS n, count(DISTINCT completion) AS distinct_texts
               FROM samples WHERE run_id = ? GROUP BY generation, problem_id),
           per_generation AS (
               SELECT generation, avg(CASE WHEN n_right > 0 AND n_right < n THEN 1.0 ELSE 0.0 END) AS split_prompts,
                      avg(CASE WHEN n_right = n THEN 1.0 ELSE 0.0 END) AS all_right, avg(distinct_texts) AS distinct_texts, avg(n_right / n) AS accuracy
               FROM per_prompt GROUP BY generation)
           SELECT avg(split_prompts), avg(all_right), avg(distinct_texts), avg(accuracy), (SELECT avg(reward_std) FROM generations WHERE run_id = ?),
                  (SELECT avg(acc_range) FROM (SELECT max(accuracy) - min(accuracy) AS acc_range FROM members WHERE run_id = ? GROUP BY generation)),
                  count(*)
           FROM per_generation""",
        [run_id, run_id, run_id],
    )
    split, all_right, distinct, accuracy, reward_std, acc_range, gens = rows[0]
    if not gens:
        return f"{run_id}: no generations"
    return (f"{run_id} over {gens} generations: training accuracy {100 * accuracy:.1f}%; prompts on which the members disagree (some right, "
            f"some wrong) {100 * split:.1f}%, all right {100 * all_right:.1f}%; {distinct:.1f} distinct completions per prompt; "
            f"member reward std {reward_std:.4f}; best minus worst member accuracy {100 * acc_range:.1f} points")


def plot(ledger: Ledger, points: list, path: Path, recipes: dict[str, list[str]] = RECIPES, start: Start = Start()) -> Path:
    fig, (by_gen, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    warm_eval = evals(ledger, start.run_id, "warm_start").get(0, {})
    run_ids = [start.name(recipe) for recipe in recipes]
    colour = {f"ES `{run_id}`": f"C{i + 1}" for i, run_id in enumerate(run_ids)} | {"supervised": "C0"}  # one per run, both panels
    for run_id in run_ids:
        centre = evals(ledger, run_id, "centre")
        if centre:
            gens = [0, *sorted(centre)]
            accs = [warm_eval.get("heldout", (float("nan"),))[0], *(centre[g]["heldout"][0] for g in sorted(centre) if "heldout" in centre[g])]
            by_gen.plot(gens[: len(accs)], [100 * a for a in accs], "o-", ms=3, label=run_id, color=colour[f"ES `{run_id}`"])
    by_gen.set_xlabel("ES generation (0: the warm start)")
    by_gen.set_ylabel("held-out accuracy, 2,000 generated (%)")
    by_gen.set_title("ES recipes from the same warm start")
    by_gen.grid(alpha=0.3)
    by_gen.legend(fontsize=8)
    for label in dict.fromkeys(kind for kind, _, _ in points):
        style = "s--" if label == "supervised" else "o-"
        pts = sorted(((m, v) for kind, m, v in points if kind == label and v and "heldout" in v), key=lambda p: p[0])
        if pts:
            x = [m for m, _ in pts]
            y = [100 * v["heldout"][0] for _, v in pts]
            lo = [100 * (v["heldout"][0] - v["heldout"][1]) for _, v in pts]
            hi = [100 * (v["heldout"][2] - v["heldout"][0]) for _, v in pts]
            by_time.errorbar(x, y, yerr=[lo, hi], fmt=style, ms=4, capsize=2, color=colour.get(label), label="warm start continued" if label == "supervised" else label.replace("`", ""))
    by_time.set_xlabel("GPU minutes (warm start included)")
    by_time.set_ylabel("held-out accuracy, 2,000 generated (%)")
    by_time.set_title("ES vs more fine-tuning at equal GPU time (95% CI)")
    by_time.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def private_copy(data_dir: Path) -> Ledger:
    """The data dir's ledger as a copy of its own to read: opening a ledger of an older schema
    migrates it in place, and the ledgers this reads are often the committed results under
    docs/results, which a report must leave as they were recorded."""
    copy = Path(tempfile.mkdtemp(prefix="es-learning-report-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    shutil.copy2(Path(data_dir) / "ledger.duckdb", copy / "ledger.duckdb")
    return Ledger(copy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--png", type=Path, default=Path("docs/results/learning.png"))
    parser.add_argument("--slim", type=Path, default=None, help="also write a copy of the ledger without the samples' text (but the last generation's) here")
    parser.add_argument("--recipes", choices=sorted(RECIPE_SETS), default="first", help="which set of ES recipes (benchmarks.learning_runs)")
    parser.add_argument("--alone", action="store_true", help="the recipes ran one at a time (learning_runs sweep --one-at-a-time)")
    parser.add_argument("--warm-steps", type=int, default=None, help="the recipes ran from this longer warm start (learning_runs --warm-steps)")
    parser.add_argument("--baseline", type=Path, default=None, help="the data dir (or slim ledger's folder) of the supervised runs, if not DATA_DIR")
    args = parser.parse_args(argv)
    recipes = RECIPE_SETS[args.recipes]
    ledger = private_copy(args.data_dir)
    baseline = private_copy(args.baseline) if args.baseline else None
    start = Start(args.warm_steps)
    final_file = args.data_dir / start.final_file
    final = json.loads(final_file.read_text()) if final_file.is_file() else None
    markdown, points = table(ledger, final, recipes, args.alone, baseline, start)
    print(markdown)
    if final:
        print(f"\nGPU minutes of ES: {final['solo_seconds_per_generation']:.2f} s a generation alone (median of {final['es_run']}'s generations "
              f"{final['first_solo_generation'] + 1}+), warm start {final['warm_start_seconds_per_step']:.3f} s a step.")
    print()
    for recipe in recipes:
        print("- " + signal(ledger, start.name(recipe)))
    print(f"\n{plot(ledger, points, args.png, recipes, start)}")
    if args.slim:
        print(slim_copy(args.data_dir, args.slim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
