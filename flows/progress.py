"""What a user watches: a progress bar and one line per generation on the console, and the same
as Prefect UI artifacts (a progress artifact, a table per generation)."""

from __future__ import annotations

import re
import statistics

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

# A generation's table shows the best and the worst members and one row for the whole population:
# 2 * SHOWN + 1 rows, under the 10 a page of the V2 UI holds (the ledger has every member).
SHOWN = 4


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:200]


def member_table(members: list[dict], shown: int = SHOWN) -> list[dict]:
    """The `shown` best and `shown` worst members by reward (every member if there are no more
    than 2 * shown), best first, then a row of the population's means.

    The seed is text: seeds are 63-bit integers and the UI holds numbers as JavaScript doubles
    (53 bits), so a numeric seed would show rounded, as a seed that rebuilds another member."""
    ranked = sorted(members, key=lambda m: (-m["reward_mean"], m["member"]))
    picked = list(enumerate(ranked, 1))
    if len(ranked) > 2 * shown:
        picked = picked[:shown] + picked[-shown:]
    rows = [
        {"rank": f"{rank} of {len(ranked)}", "member": m["member"], "seed": str(m["seed"]), "sign": m["sign"], "reward": round(m["reward_mean"], 4),
         "format_rate": round(m["format_rate"], 3), "accuracy": round(m["accuracy"], 3), "adapter": m["adapter_sha256"][:12]}
        for rank, m in picked
    ]
    mean = lambda key: round(statistics.fmean(m[key] for m in members), 4) if members else None  # noqa: E731
    rows.append({"rank": f"mean of {len(members)}", "member": None, "seed": None, "sign": None, "reward": mean("reward_mean"),
                 "format_rate": mean("format_rate"), "accuracy": mean("accuracy"), "adapter": None})
    return rows


def table_description(generation: int, row: dict, population: int, shown: int = SHOWN) -> str:
    """What the table of a generation shows, and its numbers that are not in the table."""
    which = "every member" if population <= 2 * shown else f"the {shown} best and {shown} worst of {population} members"
    return (f"generation {generation}: reward mean {row['reward_mean']:.4f}, std {row['reward_std']:.4f}, max {row['reward_max']:.4f}; "
            f"update norm {row['update_norm']:.4g}. Rows: {which} by reward, then the population's means; seeds as text "
            f"(63-bit: a number would be rounded). All members: es-countdown sql \"SELECT * FROM members WHERE run_id = "
            f"'{row['run_id']}' AND generation = {generation}\"")


class RunProgress:
    def __init__(self, run_id: str, total: int, done: int):
        self.run_id, self.total, self.done = run_id, total, done
        self._artifact_id = create_progress_artifact(
            progress=self._percent(), key=artifact_key(run_id, "progress"), description=f"es-countdown run {run_id}: generations done"
        )

    def _percent(self) -> float:
        return 100.0 * self.done / max(self.total, 1)

    def _bar(self, width: int = 24) -> str:
        filled = int(width * self.done / max(self.total, 1))
        return "[" + "#" * filled + "-" * (width - filled) + "]"

    def generation(self, g: int, row: dict, members: list[dict]) -> None:
        self.done = g + 1
        other = row["wall_seconds"] - row["generate_seconds"]
        accuracy = sum(m["accuracy"] for m in members) / max(len(members), 1)
        print(
            f"{self._bar()} gen {g + 1}/{self.total}  reward mean {row['reward_mean']:.4f} max {row['reward_max']:.4f} "
            f"std {row['reward_std']:.4f}  acc {100 * accuracy:.1f}%  |  generate {row['generate_seconds']:.1f}s "
            f"other {other:.1f}s ({100 * other / max(row['wall_seconds'], 1e-9):.1f}%)"
        )
        if self._artifact_id is not None:
            update_progress_artifact(self._artifact_id, self._percent())
        create_table_artifact(table=member_table(members), key=artifact_key(self.run_id, "gen", g),
                              description=table_description(g, row, len(members)))

    def heldout(self, label: int, model: str, summary: dict) -> None:
        print(
            f"held-out ({model}, after {label} generations): reward {summary['reward_mean']:.4f} "
            f"[{summary['reward_ci_low']:.4f}, {summary['reward_ci_high']:.4f}]  accuracy {100 * summary['accuracy']:.1f}% "
            f"[{100 * summary['accuracy_ci_low']:.1f}, {100 * summary['accuracy_ci_high']:.1f}]  format {100 * summary['format_rate']:.1f}%  n={summary['n']}"
        )

    def finish(self, report) -> None:
        print(f"run {self.run_id} completed; report {report}")
