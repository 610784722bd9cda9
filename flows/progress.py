"""What a user watches: a progress bar and one line per generation on the console, and the same
as Prefect UI artifacts (a progress artifact, a table per generation)."""

from __future__ import annotations

import re

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:200]


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
        table = [
            {"member": m["member"], "seed": str(m["seed"]), "sign": m["sign"], "reward": round(m["reward_mean"], 4),
             "format_rate": round(m["format_rate"], 3), "accuracy": round(m["accuracy"], 3), "adapter": m["adapter_sha256"][:12]}
            for m in members
        ]
        create_table_artifact(table=table, key=artifact_key(self.run_id, "gen", g), description=f"generation {g}: members, seeds, rewards")

    def heldout(self, label: int, model: str, summary: dict) -> None:
        print(
            f"held-out ({model}, after {label} generations): reward {summary['reward_mean']:.4f} "
            f"[{summary['reward_ci_low']:.4f}, {summary['reward_ci_high']:.4f}]  accuracy {100 * summary['accuracy']:.1f}% "
            f"[{100 * summary['accuracy_ci_low']:.1f}, {100 * summary['accuracy_ci_high']:.1f}]  format {100 * summary['format_rate']:.1f}%  n={summary['n']}"
        )

    def finish(self, report) -> None:
        print(f"run {self.run_id} completed; report {report}")
