"""Bytes of the slim ledger a GPU command carries off (artifacts/slim.py `slim_copy`:
every table, every sample's reward, the prompts and completions of each run's last generation
only) for a run of a given size, against the 64 MiB a transfer from the lent machine carries.

The ledger is made by the project's Ledger (its schema, primary keys and all); its samples are
synthetic: every member on its group's problems (es.members_per_prompt), rewards drawn from the
values the paper's reward takes most (1.1 right, 0.1 formatted, 0.05 half-formatted), completions of
about 200 characters. Bytes are the files' (os.path.getsize).

    python -m benchmarks.bench_slim_ledger                     # 120 generations, 512 members on 64 problems each
    python -m benchmarks.bench_slim_ledger --generations 24 --problems 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from artifacts.ledger import Ledger
from artifacts.slim import slim_copy

MiB = 2**20


def measure(generations: int, members: int, problems: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="es-bench-slim-") as tmp:
        data = Path(tmp) / "data"
        ledger = Ledger(data)
        ledger.record_run("bench", "bench", "{}", "f" * 64, "/models/base", "b" * 64, 1)
        with ledger._connection(read_only=False) as con:  # bulk rows in one statement: the schema is the point, not commit_generation
            con.execute("""INSERT INTO generations (run_id, generation, center_sha256, parent_center_sha256)
                           SELECT 'bench', g, sha256(g::VARCHAR), sha256((g - 1)::VARCHAR) FROM range(?) t(g)""", [generations])
            con.execute("""INSERT INTO samples (run_id, generation, member, problem_id, prompt, completion, reward, format_ok, correct,
                                                completion_tokens, format_reward)
                           SELECT 'bench', g, m, 'train-' || lpad((g * 100003 + (m // 8) * ? + p)::VARCHAR, 9, '0'),
                                  'Using the numbers [3, 7, 25, 50], create an equation that equals 98. <think>',
                                  repeat('x', 180 + (hash(g, m, p) % 40)::INT),
                                  CASE WHEN random() < 0.55 THEN 1.1 WHEN random() < 0.9 THEN 0.1 ELSE 0.05 END,
                                  true, random() < 0.55, (20 + random() * 30)::INT, 1.0
                           FROM range(?) t(g), range(?) u(m), range(?) v(p)""", [problems, generations, members, problems])
        full = os.path.getsize(data / "ledger.duckdb")
        started = time.perf_counter()
        slim = os.path.getsize(slim_copy(data, Path(tmp) / "slim.duckdb"))
        return {"generations": generations, "members": members, "problems_per_member": problems, "samples": generations * members * problems,
                "full_bytes": full, "slim_bytes": slim, "slim_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generations", type=int, default=120)
    p.add_argument("--members", type=int, default=512)
    p.add_argument("--problems", type=int, default=64, help="problems each member decodes (its group's)")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    r = measure(args.generations, args.members, args.problems)
    print(f"{r['samples']:,} samples ({r['generations']} generations x {r['members']} members x {r['problems_per_member']} problems): "
          f"ledger {r['full_bytes'] / MiB:,.1f} MiB, slim copy {r['slim_bytes'] / MiB:,.1f} MiB in {r['slim_seconds']:.1f} s "
          f"(a transfer carries 64 MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return r


if __name__ == "__main__":
    main()
