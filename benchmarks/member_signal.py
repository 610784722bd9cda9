"""Is there a direction in a generation's fitness? From a ledger's samples (every member's reward on
every prompt of a generation), two measures of whether members differ in quality or only in luck:

- split-half reliability: the members' per-prompt normalised fitness on one random half of the
  prompts against the other half (Pearson r across members, averaged over random splits) and its
  Spearman-Brown value for the whole set. Near 0: which member ranks first is a matter of which
  prompts it happened to flip, the update ES takes from that ranking has no direction, and no
  centre (truncated or exact) can make one; near 1: members really differ.
- antithetic partners' correlation: members 2k and 2k+1 perturb by +eps and -eps; a reward that
  changes linearly along eps makes their fitness anti-correlated.

Each is reported beside a null band: the same statistic with every prompt's rewards shuffled across
members (its mean +- 2 sd over shuffles). Reads the ledger read-only (never migrates it).

One generation's statistic is noisy (its sd is about 1/sqrt(members)); the summary after the table
pools each run's generations: the mean of each statistic with its standard error, beside the mean of
its null bands' centres, and how many generations fell above and below their band (chance puts about
2.5% on each side).

    python -m benchmarks.member_signal LEDGER.duckdb [--run RUN ...] [--json OUT]
    python -m benchmarks.member_signal --from-json OUT      # the summary of rows saved before
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np


def reward_matrix(con, run_id: str, generation: int) -> np.ndarray:
    """Rewards [members, prompts] of one generation (members and prompts in the ledger's order)."""
    rows = con.execute("SELECT member, problem_id, reward FROM samples WHERE run_id = ? AND generation = ? ORDER BY member, problem_id",
                       [run_id, generation]).fetchall()
    members = sorted({r[0] for r in rows})
    prompts = sorted({r[1] for r in rows})
    mi, pi = {m: i for i, m in enumerate(members)}, {p: i for i, p in enumerate(prompts)}
    out = np.full((len(members), len(prompts)), np.nan)
    for m, p, r in rows:
        out[mi[m], pi[p]] = r
    return out


def normalised(rewards: np.ndarray) -> np.ndarray:
    """Each prompt's rewards as z-scores across the members that decoded it (the runs'
    prompt_normalized fitness; NaN where a member did not: es.members_per_prompt's groups); a
    prompt where every member scored the same is all zeros."""
    with np.errstate(invalid="ignore"):
        sd = np.nanstd(rewards, 0, keepdims=True)
        return (rewards - np.nanmean(rewards, 0, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    keep = ~(np.isnan(a) | np.isnan(b))  # members with prompts on both sides
    a, b = a[keep], b[keep]
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else None


def split_half(z: np.ndarray, rng: np.random.Generator, splits: int = 200) -> float:
    n = z.shape[1]
    rs = []
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a member with no prompt in a half: NaN, left out
        for _ in range(splits):
            perm = rng.permutation(n)
            r = _correlation(np.nanmean(z[:, perm[: n // 2]], 1), np.nanmean(z[:, perm[n // 2:]], 1))
            if r is not None:
                rs.append(r)
    return float(np.mean(rs)) if rs else float("nan")


def partners(z: np.ndarray) -> float:
    f = np.nanmean(z, 1)
    if len(f) < 4 or len(f) % 2:
        return float("nan")
    r = _correlation(f[0::2], f[1::2])
    return float("nan") if r is None else r


def shuffled(rewards: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each prompt's rewards shuffled across the members that decoded it."""
    if not np.isnan(rewards).any():
        return rng.permuted(rewards, axis=0)
    out = rewards.copy()
    for j in range(out.shape[1]):
        rows = np.flatnonzero(~np.isnan(out[:, j]))
        out[rows, j] = rng.permutation(out[rows, j])
    return out


def signal(rewards: np.ndarray, seed: int = 0, shuffles: int = 50) -> dict:
    rng = np.random.default_rng(seed)
    z = normalised(rewards)
    r_half = split_half(z, rng)
    null_half, null_pair = [], []
    for _ in range(shuffles):
        null = normalised(shuffled(rewards, rng))
        null_half.append(split_half(null, rng, 20))
        null_pair.append(partners(null))
    band = lambda xs: [round(float(np.mean(xs) - 2 * np.std(xs)), 3), round(float(np.mean(xs) + 2 * np.std(xs)), 3)]
    return {"members": rewards.shape[0], "prompts": rewards.shape[1], "split_half_r": round(r_half, 3),
            "reliability": round(2 * r_half / (1 + r_half), 3) if r_half > -1 else None, "split_half_null": band(null_half),
            "partners_r": round(partners(z), 3), "partners_null": band(null_pair)}


def summarise(rows: list[dict]) -> list[dict]:
    """Each run's generations pooled: per statistic its mean, standard error, the mean centre of its
    null bands, and the generations above and below their band."""
    out = []
    for run_id in sorted({r["run_id"] for r in rows}):
        gens = [r for r in rows if r["run_id"] == run_id]
        summary = {"run_id": run_id, "generations": len(gens)}
        for stat, null in (("split_half_r", "split_half_null"), ("partners_r", "partners_null")):
            pairs = [(r[stat], r[null]) for r in gens if r[stat] == r[stat]]  # NaN: no spread to correlate
            values = np.array([v for v, _ in pairs])
            name = stat.removesuffix("_r")
            summary[name] = {
                "mean": round(float(values.mean()), 3) if len(values) else None,
                "se": round(float(values.std(ddof=1) / np.sqrt(len(values))), 3) if len(values) > 1 else None,
                "null_centre": round(float(np.mean([(lo + hi) / 2 for _, (lo, hi) in pairs])), 3) if pairs else None,
                "above": sum(v > hi for v, (_, hi) in pairs), "below": sum(v < lo for v, (lo, _) in pairs),
            }
        out.append(summary)
    return out


def print_summary(rows: list[dict]) -> None:
    print(f"\n{'run':20} {'gens':>4}  {'split-half r: mean (se)':>24} {'null':>6} {'above/below':>11}  {'partners r: mean (se)':>22} {'null':>6} {'above/below':>11}")
    for s in summarise(rows):
        # a run whose members all scored alike in every generation has no statistic: "-"
        h, p = ({k: "-" if v is None else v for k, v in s[stat].items()} for stat in ("split_half", "partners"))
        print(f"{s['run_id']:20} {s['generations']:>4}  {h['mean']:>16} ({h['se']}) {h['null_centre']:>6} {h['above']:>5}/{h['below']:<5}  "
              f"{p['mean']:>14} ({p['se']}) {p['null_centre']:>6} {p['above']:>5}/{p['below']:<5}")


def main(argv: list[str] | None = None) -> int:
    import duckdb

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ledger", type=Path, nargs="?")
    p.add_argument("--run", action="append", help="runs to read (default: every run with samples)")
    p.add_argument("--json", type=Path)
    p.add_argument("--from-json", type=Path, help="summarise rows a --json run saved (no ledger read)")
    args = p.parse_args(argv)
    if args.from_json:
        rows = [r for r in json.loads(args.from_json.read_text()) if not args.run or r["run_id"] in args.run]
        print_summary(rows)
        return 0
    if args.ledger is None:
        p.error("give a ledger, or --from-json")
    con = duckdb.connect(str(args.ledger), read_only=True)
    try:
        where = "" if not args.run else f"WHERE run_id IN ({', '.join('?' * len(args.run))})"
        keys = con.execute(f"SELECT DISTINCT run_id, generation FROM samples {where} ORDER BY 1, 2", args.run or []).fetchall()
        results = []
        for run_id, generation in keys:
            rewards = reward_matrix(con, run_id, generation)
            if rewards.shape[0] < 4 or rewards.shape[1] < 4:
                continue
            results.append({"run_id": run_id, "generation": generation, **signal(rewards)})
    finally:
        con.close()
    print(f"{'run':20} {'gen':>4} {'N':>4} {'prompts':>7} {'split-half r':>12} {'null band':>16} {'reliability':>11} {'partners r':>10} {'null band':>16}")
    for r in results:
        print(f"{r['run_id']:20} {r['generation']:>4} {r['members']:>4} {r['prompts']:>7} {r['split_half_r']:>12} {str(r['split_half_null']):>16} "
              f"{str(r['reliability']):>11} {r['partners_r']:>10} {str(r['partners_null']):>16}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
