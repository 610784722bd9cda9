"""The learning experiments of the README ("Learning to solve Countdown"), on one GPU, in two steps
that each fit a 10-minute GPU command (the second on the same machine, its data dir intact, or on a
fresh one whose data dir holds the first's slim ledger, artifacts/slim.py: the runs resume from it,
their centres rebuilt from the ledger; scripts/device/sweep.sh's LEDGER):

    python -m benchmarks.learning_runs sweep DATA_DIR [--paper PATH]
        1. run `sft-500`: the supervised warm start of configs/experiments/smollm2_learning.yaml
           alone (es.generations 0) and its held-out evaluations: the starting point of every ES run;
        2. the ES recipes of RECIPES from that warm start (a cache hit), side by side on the GPU,
           GENERATIONS generations each, the centre evaluated every 10.
    python -m benchmarks.learning_runs final DATA_DIR [--paper PATH]
        3. the recipe with the best held-out accuracy continues alone (`es-countdown resume`), while
           the time left allows a supervised run of equal GPU time after it; its seconds per
           generation alone are measured;
        4. the warm start continued for as many steps as ES's GPU time buys (`sft-half`, then
           `sft-matched`, each continuing the last): the baseline at equal GPU time.
    python -m benchmarks.learning_report DATA_DIR  -> the README table and the PNG.

Where fine-tuning has stopped gaining (the question users ask: they fine-tune first, then reach for ES):
    python -m benchmarks.learning_runs plateau DATA_DIR [--every 500]
        the warm start continued 500 steps at a time (`sft-1000`, `sft-1500`, ...: each continues
        the last exactly) until two held-out evaluations in a row gain nothing over the best before
        them; the same command goes on where a deadline stopped it. Then `sweep` and `final` with
        `--warm-steps P` (P: the plateau's steps) run the recipes and the supervised baseline from
        there (run ids `<recipe>-fromP`), and `learning_report --warm-steps P` reports them.

GPU time of an ES run = its warm start's seconds + generations x the median seconds of a generation
run alone (the sweep's generations ran side by side, so their wall times are not the GPU's).
`ES` names the command (default `es-countdown`; `python3 -m flows.cli` where it is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from artifacts.ledger import Ledger

CONFIG = "configs/experiments/smollm2_learning.yaml"
WARM_START_RUN = "sft-500"
GENERATIONS = 40
# run id -> overrides of CONFIG (the config itself is es-fresh64)
RECIPES: dict[str, list[str]] = {
    "es-paper200": ["es.population=32", "data.train_problems=fixed", "data.prompts_per_generation=200", "es.fitness=mean_reward"],
    "es-fresh64": [],
    "es-fresh64-r8": ["lora.rank=8"],
    "es-fresh16-n256": ["es.population=256", "data.prompts_per_generation=16"],
}
# The second round: the step of the best recipe of the first (es-fresh64-r8: sigma 0.05, SGD at
# learning rate 0.025) moved the centre too little to show (its random walk after 50 generations is
# about alpha / sqrt(N) x sqrt(50) = 0.02 per entry, under sigma). Larger steps, Adam, a larger sigma.
STEP_SIZE: dict[str, list[str]] = {
    "es-r8-lr0.1": ["lora.rank=8", "es.learning_rate=0.1"],
    "es-r8-adam": ["lora.rank=8", "es.optimizer=adam", "es.learning_rate=0.005"],
    "es-r8-sigma0.1": ["lora.rank=8", "es.sigma=0.1", "es.learning_rate=0.1"],
}
# Weights space (issue 27): every projection of every layer perturbed by rank-1 products over a
# rank-64 centre, 64 members x 64 fresh problems, per-prompt fitness; sigma absolute (the paper's
# 0.001 and 3x), or relative to each matrix's RMS; the step alpha = sigma (the paper's alpha/sigma
# is 0.5 over 500 iterations; a sweep of a few dozen generations needs a larger share); and the
# paper's own recipe (configs/experiments/paper_countdown.yaml's ES settings) from the same warm start.
WEIGHTS: dict[str, list[str]] = {
    "ws-s1e-3": ["es.space=weights", "es.sigma=0.001", "es.learning_rate=0.001"],
    "ws-s3e-3": ["es.space=weights", "es.sigma=0.003", "es.learning_rate=0.003"],
    "ws-rms1e-2": ["es.space=weights", "es.sigma_scale=weight_rms", "es.sigma=0.01", "es.learning_rate=0.01"],
    # run alone after the sweep (the sweep's member files of rank R + r filled the disk; fixed since)
    "ws-s2e-3": ["es.space=weights", "es.sigma=0.002", "es.learning_rate=0.004"],
    "ws-paper": ["es.space=weights", "es.population=30", "es.sigma=0.001", "es.learning_rate=0.0005", "data.train_problems=fixed",
                 "data.prompts_per_generation=200", "es.fitness=mean_reward"],
}
# Weights space with an exact centre (R 576 covers every SmolLM2 matrix: no truncation; the rank-64
# centre of ws-s2e-3 kept 0.10-0.20 of each update's norm): ws-s2e-3's recipe, and sigma x3 (at
# sigma 0.002 the members' ranking was no more reproducible across prompt halves than chance:
# benchmarks/member_signal.py). SmolLM2's projections have an RMS of about 0.19 (v_proj 0.05-0.29), so
# sigma 0.002 moves an entry by about 1% of its size; Qiu et al.'s 0.001 on Qwen2.5 is a few per cent
# there: 0.006 is that share here, 0.02 ten per cent.
EXACT: dict[str, list[str]] = {
    "wsx-s2e-3": ["es.space=weights", "es.centre_rank=576", "es.sigma=0.002", "es.learning_rate=0.004"],
    "wsx-s6e-3": ["es.space=weights", "es.centre_rank=576", "es.sigma=0.006", "es.learning_rate=0.012"],
    "wsx-s2e-2": ["es.space=weights", "es.centre_rank=576", "es.sigma=0.02", "es.learning_rate=0.04"],
}
# More members, fewer problems each, the same rows a generation (4,096): the exact centre's 52
# generations at sigma 0.006 (wsx-s6e-3, N 64 x 64 problems) left held-out accuracy flat, and its
# members' ranking was chance in every generation (split-half r -0.005 on average) while antithetic
# partners anti-correlated (-0.10 on average, standard error 0.027, against -0.002 shuffled): a
# first-order signal under noise. The random walk an update adds shrinks as 1/sqrt(N) at equal alpha while its expected
# gain does not, so N 512 (EGGROLL's regime: many members, few prompts each) at the same alpha, and
# at 3x alpha (the same walk as N 64). Those runs perturbed layers 0-10 only (77 matrices: this
# config's lora.layers, which weights space keeps when a config gives them), so these stay there to
# compare, but for one that moves every layer (210 matrices), as the issue asks.
# In the order they run alone (`--one-at-a-time`): EGGROLL's groups first. The exact-centre ledger
# bounds the direction all problems share to under 9% of one problem's own (in norm; README,
# "What it would take"), so an update's problem-specific part averages out only over many problems
# a generation: 512 in groups, against 8 when every member decodes the same 8.
# A final row of ~120 generations at 431 MB each would fill most of a lent machine's 64 GB disk:
# these runs keep every 10th centre (and every evaluated one: eval.every is 10), the others rebuilt
# from the ledger on demand (README, "Keeping centres as keyframes").
KEYFRAMES = "store.keep_centre_every=10"
POPULATION: dict[str, list[str]] = {
    # EGGROLL's layout: 512 members in 64 groups of 8 (4 antithetic pairs), each group on its own 8
    # problems: 512 problems a generation for the same 4,096 rows
    "wsx-n512-g8": ["es.space=weights", "es.centre_rank=576", "es.population=512", "es.members_per_prompt=8",
                    "data.prompts_per_generation=512", "es.sigma=0.006", "es.learning_rate=0.012", KEYFRAMES],
    # the contrast: the same 512 members all on the same 8 problems
    "wsx-n512": ["es.space=weights", "es.centre_rank=576", "es.population=512", "data.prompts_per_generation=8", "es.sigma=0.006",
                 "es.learning_rate=0.012", KEYFRAMES],
    "wsx-all-n512-g8": ["es.space=weights", "lora.layers=all", "es.centre_rank=576", "es.population=512", "es.members_per_prompt=8",
                        "data.prompts_per_generation=512", "es.sigma=0.006", "es.learning_rate=0.012", KEYFRAMES],
    "wsx-n512-g8-lr3x": ["es.space=weights", "es.centre_rank=576", "es.population=512", "es.members_per_prompt=8",
                         "data.prompts_per_generation=512", "es.sigma=0.006", "es.learning_rate=0.036", KEYFRAMES],
}
RECIPE_SETS = {"first": RECIPES, "step-size": STEP_SIZE, "weights": WEIGHTS, "exact": EXACT, "population": POPULATION}
EVAL_EVERY = 10  # the config's eval.every
FINAL_FILE = "learning-final.json"  # what `final` measured, for learning_report
PLATEAU_FILE = "learning-plateau.json"  # what `plateau` measured: held-out accuracy against warm-start steps


@dataclass(frozen=True)
class Start:
    """Where the ES recipes and the supervised baseline begin: the config's 500-step warm start, or
    a longer one (`--warm-steps`, e.g. the plateau's), whose runs carry a `-from<steps>` suffix."""

    steps: int | None = None

    @property
    def run_id(self) -> str:
        return WARM_START_RUN if self.steps is None else f"sft-{self.steps}"

    def name(self, run_id: str) -> str:
        return run_id if self.steps is None else f"{run_id}-from{self.steps}"

    def sets(self) -> list[str]:
        return [] if self.steps is None else ["--set", f"warm_start.steps={self.steps}"]

    @property
    def final_file(self) -> str:
        return FINAL_FILE if self.steps is None else FINAL_FILE.replace(".json", f"-from{self.steps}.json")


def es_command() -> list[str]:
    return shlex.split(os.environ.get("ES", "es-countdown"))


PAPER_TEST_SIZE = 2000  # the paper's test split: the last 2,000 problems


def eval_sets(paper: str, size: int = PAPER_TEST_SIZE) -> str:
    """The override that adds the paper's test problems as a held-out set."""
    return f"eval.sets=[{{name: paper-test, source: paper, path: {paper}, size: {size}}}]"


def run(args: list[str], log: Path, env: dict | None = None, wait: bool = True):
    """An es-countdown command in its own process group (killing it takes Prefect's server along)."""
    print("$", " ".join(shlex.quote(a) for a in args), f"> {log}", flush=True)
    out = open(log, "a")
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
    if wait:
        code = proc.wait()
        if code != 0:
            sys.exit(f"{args[-1] if args else ''}: exit {code}, see {log}: {log.read_text()[-1500:]}")
    return proc


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def sql(data_dir: Path, query: str) -> list[tuple]:
    return Ledger(data_dir).query(query)[1]


def own_prefect_db(data_dir: Path, run_id: str) -> dict:
    """Runs side by side need their own Prefect database (one SQLite file has one writer)."""
    return {"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{data_dir / 'prefect'}/{run_id}.db"}


def sweep(data_dir: Path, paper_set: str, generations: int, deadline_s: float, config: str, extra: list[str],
          recipes: dict[str, list[str]] = RECIPES, one_at_a_time: bool = False, start: Start = Start()) -> None:
    """The warm start, then the recipes side by side until they finish or `deadline_s` after the start
    (or, `one_at_a_time`, each alone for `generations`: their wall times are then the GPU's)."""
    began = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "prefect").mkdir(exist_ok=True)
    supervised = ["--config", config, "--data-dir", str(data_dir), "--set", paper_set]
    if start.steps and not remake_warm_starts(data_dir, start.steps, supervised, extra, began + deadline_s):
        return  # a ledger from another machine, its warm starts trained again up to the deadline: the same command goes on
    common = [*supervised, *start.sets()]
    run([*es_command(), "run", *common, "--run-id", start.run_id, "--set", "es.generations=0", *extra], data_dir / f"{start.run_id}.log")
    procs = {}
    for recipe, overrides in recipes.items():
        run_id = start.name(recipe)
        if one_at_a_time and time.monotonic() - began >= deadline_s:
            print(f"{run_id}: not started, the deadline ({deadline_s:.0f} s) has passed; the next sweep of this data dir starts it")
            continue
        sets = [a for kv in overrides for a in ("--set", kv)]
        procs[run_id] = run([*es_command(), "run", *common, "--run-id", run_id, "--set", f"es.generations={generations}", *sets, *extra],
                            data_dir / f"{run_id}.log", own_prefect_db(data_dir, run_id), wait=False)
        while one_at_a_time and procs[run_id].poll() is None and time.monotonic() - began < deadline_s:
            time.sleep(2)
    while any(p.poll() is None for p in procs.values()) and time.monotonic() - began < deadline_s:
        time.sleep(2)
    for run_id, proc in procs.items():
        if proc.poll() is None:
            print(f"{run_id}: stopped {deadline_s:.0f} s after the sweep began; `es-countdown resume {run_id}` continues it")
            kill(proc)
        elif proc.returncode != 0:
            print(f"{run_id}: exit {proc.returncode}: {(data_dir / f'{run_id}.log').read_text()[-1500:]}")


def best_recipe(data_dir: Path, recipes: dict[str, list[str]] = RECIPES, start: Start = Start()) -> str:
    ids = ", ".join(f"'{start.name(r)}'" for r in recipes)
    rows = sql(data_dir, f"""SELECT run_id, generation, accuracy FROM evals WHERE split = 'heldout' AND model = 'centre' AND run_id IN ({ids})
                             QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY generation DESC) = 1 ORDER BY accuracy DESC, run_id""")
    for run_id, generation, accuracy in rows:
        print(f"{run_id}: held-out accuracy {100 * accuracy:.1f}% after {generation} generations")
    return rows[0][0]


def final(data_dir: Path, paper_set: str, limit_s: float, sft_overhead_s: float, config: str, extra: list[str],
          recipes: dict[str, list[str]] = RECIPES, baseline: bool = True, start: Start = Start()) -> None:
    """The best recipe continues alone; then (`baseline`) the warm start continued for its GPU time."""
    started = time.monotonic()
    best = best_recipe(data_dir, recipes, start)
    supervised = ["--config", config, "--data-dir", str(data_dir), "--set", paper_set]
    if start.steps and not remake_warm_starts(data_dir, start.steps, supervised, extra, started + limit_s):
        return  # a ledger from another machine: its warm starts trained again up to the limit; the same command goes on
    first_solo = sql(data_dir, f"SELECT max(generation) + 1 FROM generations WHERE run_id = '{best}'")[0][0]
    proc = run([*es_command(), "resume", best, "--data-dir", str(data_dir), "--set", "es.generations=1000"], data_dir / f"{best}.log", wait=False)
    s_step, warm_steps = sql(data_dir, f"SELECT w.seconds / w.steps, w.steps FROM warm_starts w JOIN runs r USING (warm_start_sha256) WHERE r.run_id = '{start.run_id}'")[0]
    stop_at, s_gen = None, None
    while proc.poll() is None:
        time.sleep(3)
        walls = [r[0] for r in sql(data_dir, f"SELECT wall_seconds FROM generations WHERE run_id = '{best}' AND generation > {first_solo} ORDER BY generation")]
        evaluated = sql(data_dir, f"SELECT max(generation) FROM evals WHERE run_id = '{best}' AND model = 'centre' AND split = 'paper-test'")[0][0]
        if len(walls) < 3 or not evaluated:
            continue
        s_gen = statistics.median(walls)
        # go on to the next evaluation only if the supervised run of the same GPU time still fits after it
        next_eval = (evaluated // EVAL_EVERY + 1) * EVAL_EVERY
        needed = (next_eval - evaluated) * s_gen * 1.2 + (next_eval * s_gen + sft_overhead_s if baseline else 0)
        if evaluated >= first_solo + EVAL_EVERY and time.monotonic() - started + needed > limit_s:
            stop_at = evaluated
            break
    kill(proc)
    generations = stop_at or sql(data_dir, f"SELECT max(generation) + 1 FROM generations WHERE run_id = '{best}'")[0][0]
    es_seconds = generations * s_gen
    matched = warm_steps + round(es_seconds / s_step)
    half = warm_steps + round(es_seconds / s_step / 2)
    print(f"{best}: {generations} generations, {s_gen:.2f} s each alone = {es_seconds:.0f} s of GPU after the warm start; "
          f"the warm start trains {s_step:.3f} s a step: {matched - warm_steps} more steps")
    (data_dir / start.final_file).write_text(json.dumps({"es_run": best, "generations": generations, "solo_seconds_per_generation": s_gen,
                                                   "first_solo_generation": first_solo, "es_seconds": es_seconds,
                                                   "warm_start_seconds_per_step": s_step, "sft_steps": [half, matched] if baseline else []},
                                                  indent=1) + "\n")
    if not baseline:
        print(f"done in {time.monotonic() - started:.0f} s")
        return
    common = ["--config", config, "--data-dir", str(data_dir), "--set", paper_set, "--set", "es.generations=0", *extra]
    for run_id, steps in ((start.name("sft-half"), half), (start.name("sft-matched"), matched)):
        run([*es_command(), "run", *common, "--run-id", run_id, "--set", f"warm_start.steps={steps}"], data_dir / f"{run_id}.log")
    print(f"done in {time.monotonic() - started:.0f} s")


def warm_start_missing(data_dir: Path, run_id: str) -> bool:
    """Is the supervised run recorded in the ledger while its warm start is not on disk (a ledger
    carried to a fresh machine: scripts/device/sweep.sh's LEDGER)?"""
    from artifacts.store import ArtifactStore

    if not (data_dir / "ledger.duckdb").exists():
        return False
    rows = sql(data_dir, f"SELECT warm_start_sha256 FROM runs WHERE run_id = '{run_id}' AND warm_start_sha256 IS NOT NULL")
    return bool(rows) and not ArtifactStore(data_dir / "artifacts").exists(rows[0][0])


def remake_warm_starts(data_dir: Path, upto: int, common: list[str], extra: list[str], deadline_at: float) -> bool:
    """The recorded supervised runs `sft-<n>` (n <= upto, shortest first) whose warm start is not on
    disk, run again: each trains its warm start continuing the one before (its AdamW moments), so a
    fresh machine reaches a 3,000-step warm start in 500-step commands rather than in one training
    from scratch longer than a command (11 minutes at 0.22 s a step); each run's row checks that its
    bits are the recorded ones (the same kind of GPU gives them). True when none is missing up to
    `upto`; False when the next would end after `deadline_at` (time.monotonic()): the same command
    goes on from there."""
    recorded = sorted(int(r[0].removeprefix("sft-")) for r in sql(data_dir, "SELECT run_id FROM runs WHERE regexp_matches(run_id, '^sft-[0-9]+$')")
                      ) if (data_dir / "ledger.duckdb").exists() else []
    before, s_step = 0, None
    for steps in [n for n in recorded if n <= upto]:
        run_id = f"sft-{steps}"
        if s_step is None:
            rows = sql(data_dir, f"SELECT w.seconds / w.steps FROM runs r JOIN warm_starts w USING (warm_start_sha256) WHERE r.run_id = '{run_id}'")
            s_step = rows[0][0] if rows and rows[0][0] else 0.25
        if warm_start_missing(data_dir, run_id):
            if time.monotonic() + 1.2 * (steps - before) * s_step + 60 > deadline_at:
                print(f"{run_id}: its warm start is not on this machine and would end after the deadline; the same command goes on from here")
                return False
            print(f"{run_id}: recorded, its warm start not on this machine: trained again, continuing the last", flush=True)
            run([*es_command(), "run", *common, "--run-id", run_id, "--set", "es.generations=0", "--set", f"warm_start.steps={steps}", *extra],
                data_dir / f"{run_id}.log")
        before = steps
    return True


def plateaued(accuracies: list[float]) -> bool:
    """Fine-tuning has stopped gaining: neither of the last two evaluations beats the best before them."""
    return len(accuracies) >= 3 and max(accuracies[-2:]) <= max(accuracies[:-2])


def warm_start_point(data_dir: Path, run_id: str) -> dict | None:
    """A supervised run's warm start as `plateau` records it, or None if the ledger has no held-out evaluation of it."""
    if not (data_dir / "ledger.duckdb").exists():
        return None
    rows = sql(data_dir, f"""SELECT w.steps, w.seconds, e.split, e.accuracy, e.accuracy_ci_low, e.accuracy_ci_high
                             FROM runs r JOIN warm_starts w USING (warm_start_sha256)
                             JOIN evals e ON e.run_id = r.run_id AND e.model = 'warm_start' AND e.generation = 0
                             WHERE r.run_id = '{run_id}' ORDER BY e.split""")
    if not any(split == "heldout" for _, _, split, *_ in rows):
        return None
    point = {"run_id": run_id, "steps": rows[0][0], "seconds": rows[0][1]}
    point.update({split: [accuracy, low, high] for _, _, split, accuracy, low, high in rows})
    return point


def plateau(data_dir: Path, paper_set: str, every: int, max_steps: int, deadline_s: float, config: str, extra: list[str]) -> int | None:
    """The warm start continued `every` steps at a time (`sft-<steps>`, each continuing the last
    exactly, its held-out accuracy evaluated) until held-out accuracy stops gaining (`plateaued`),
    `max_steps`, or the next step would end after `deadline_s`. Steps already in the data dir are
    read, not trained again, so the same command goes on where the last one stopped. Writes
    PLATEAU_FILE after every point and at the end; returns the plateau's steps (the last trained: where a user who fine-tunes until
    it stops gaining would stand), or None while it has not been reached."""
    began = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    common = ["--config", config, "--data-dir", str(data_dir), "--set", paper_set, "--set", "es.generations=0"]
    points: list[dict] = []
    reached, wall_per_step = None, None

    def record(plateau_steps: int | None) -> None:
        (data_dir / PLATEAU_FILE).write_text(json.dumps({"every": every, "max_steps": max_steps, "plateau_steps": plateau_steps, "points": points}, indent=1) + "\n")

    for steps in range(every, max_steps + 1, every):
        run_id = f"sft-{steps}"
        point = warm_start_point(data_dir, run_id)
        if point is None:
            elapsed = time.monotonic() - began
            if wall_per_step is not None and elapsed + 1.2 * every * wall_per_step > deadline_s:
                print(f"{run_id}: not started, it would end after the deadline ({deadline_s:.0f} s); the same command goes on from here")
                break
            if not remake_warm_starts(data_dir, steps - every, common, extra, began + deadline_s):  # a ledger from another machine
                break
            t0 = time.monotonic()
            run([*es_command(), "run", *common, "--run-id", run_id, "--set", f"warm_start.steps={steps}", *extra], data_dir / f"{run_id}.log")
            wall_per_step = (time.monotonic() - t0) / every  # training and evaluation: what one more increment costs
            point = warm_start_point(data_dir, run_id)
            if point is None:
                sys.exit(f"{run_id}: the ledger has no held-out evaluation of its warm start (eval.warm_start off?), see {data_dir / f'{run_id}.log'}")
        points.append(point)
        record(None)  # as each point comes: a command killed before the end keeps them (benchmarks/snapshot.py)
        print(f"{run_id}: held-out {100 * point['heldout'][0]:.1f}% [{100 * point['heldout'][1]:.1f}, {100 * point['heldout'][2]:.1f}] "
              f"after {point['seconds'] / 60:.1f} GPU minutes of training", flush=True)
        if plateaued([p["heldout"][0] for p in points]):
            reached = steps
            break
    record(reached)
    print(f"plateau at {reached} steps" if reached else f"no plateau yet after {points[-1]['steps'] if points else 0} steps")
    return reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["sweep", "final", "plateau"])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--paper", default="../shared/data/countdown.json", help="the paper's countdown.json (its last 2,000 problems are held out)")
    parser.add_argument("--generations", type=int, default=GENERATIONS, help="sweep: generations of each recipe")
    parser.add_argument("--deadline", type=float, default=500, help="sweep: seconds after its start by which the recipes are stopped; plateau: by which its last step must end")
    parser.add_argument("--limit", type=float, default=500, help="final: seconds the whole step may take")
    parser.add_argument("--sft-overhead", type=float, default=100, help="final: seconds of the supervised runs beyond training")
    parser.add_argument("--warm-steps", type=int, default=None, help="sweep, final: start from this longer warm start (e.g. the plateau's) "
                        "instead of the config's; run ids get -from<steps>")
    parser.add_argument("--every", type=int, default=500, help="plateau: warm-start steps between held-out evaluations")
    parser.add_argument("--max-steps", type=int, default=20000, help="plateau: no warm start beyond this many steps")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--paper-size", type=int, default=PAPER_TEST_SIZE, help="held-out problems from the paper's file")
    parser.add_argument("--recipes", choices=sorted(RECIPE_SETS), default="first", help="which set of ES recipes")
    parser.add_argument("--one-at-a-time", action="store_true", help="sweep: each recipe alone (its wall time is then the GPU's)")
    parser.add_argument("--no-baseline", action="store_true", help="final: no supervised run of equal GPU time")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of every run, applied last (a CPU rehearsal: model.name=tiny-llama es.population=4 ...)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir.resolve()
    extra = [a for kv in args.extra for a in ("--set", kv)]
    paper_set = eval_sets(args.paper, args.paper_size)
    if args.step == "plateau":
        plateau(data_dir, paper_set, args.every, args.max_steps, args.deadline, args.config, extra)
    elif args.step == "sweep":
        sweep(data_dir, paper_set, args.generations, args.deadline, args.config, extra, RECIPE_SETS[args.recipes], args.one_at_a_time,
              Start(args.warm_steps))
    else:
        final(data_dir, paper_set, args.limit, args.sft_overhead, args.config, extra, RECIPE_SETS[args.recipes], not args.no_baseline,
              Start(args.warm_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
