"""Per-generation wall time of a recorded run, split into generation (the backend decoding) and
everything else (perturb, adapter writes, scoring, update, ledger, Prefect).

    python benchmarks/bench_pipeline.py RUN_ID [--data-dir DIR]

Target (issue 6): everything else < 5% of a generation for N=32 on the GPU. The figures come from
the ledger: a generation's full wall time is from its start to the next generation's start (so the
ledger commit, UI artifacts and Prefect's task overhead count); generations followed by a held-out
evaluation are left out (that is decoding too, not overhead); the last one uses wall_seconds.
"""

import argparse
import os
from pathlib import Path

from artifacts.ledger import Ledger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--data-dir", default=os.environ.get("ES_DATA_DIR", "runs"))
    parser.add_argument("--skip", type=int, default=1, help="leading generations left out (compile and warm-up)")
    args = parser.parse_args()
    ledger = Ledger(Path(args.data_dir))
    _, recorded = ledger.query(
        "SELECT generation, generate_seconds, wall_seconds, epoch(started_at) FROM generations WHERE run_id = ? ORDER BY generation", [args.run_id]
    )
    _, evals = ledger.query("SELECT DISTINCT generation FROM evals WHERE run_id = ?", [args.run_id])
    evaluated = {e[0] for e in evals}
    if not recorded:
        raise SystemExit(f"no generations recorded for {args.run_id} in {args.data_dir}")
    rows = []
    for i, (g, gen_s, wall_s, start) in enumerate(recorded):
        if g + 1 in evaluated and i + 1 < len(recorded):
            continue
        nxt = recorded[i + 1] if i + 1 < len(recorded) and recorded[i + 1][0] == g + 1 else None
        rows.append((g, gen_s, (nxt[3] - start) if nxt else wall_s))
    print(f"{'generation':>10} {'generate s':>11} {'other s':>9} {'other %':>8}")
    for g, gen_s, wall_s in rows:
        print(f"{g:>10} {gen_s:>11.2f} {wall_s - gen_s:>9.2f} {100 * (wall_s - gen_s) / wall_s:>7.1f}%")
    steady = rows[args.skip :] or rows
    gen = sum(r[1] for r in steady)
    wall = sum(r[2] for r in steady)
    print(f"steady state ({len(steady)} generations): generate {gen / len(steady):.2f} s, other {(wall - gen) / len(steady):.2f} s "
          f"= {100 * (wall - gen) / wall:.2f}% of a generation (target < 5%)")


if __name__ == "__main__":
    main()
