"""The per-generation table in the Prefect UI: the best and worst members and the population's means
on one page of the V2 UI (10 rows), seeds exact."""

import asyncio
import json
import statistics

import pytest
from prefect import flow

from flows.progress import RunProgress, artifact_key, member_table
from tests.test_ledger import fake_generation

V2_PAGE_ROWS = 10  # the V2 UI's default page of a table artifact
BIG_SEED = 2**62 + 1  # above 2**53: a JavaScript number would round it


def generation(population: int, g: int = 0) -> tuple[dict, list[dict]]:
    row, members, _ = fake_generation("table-run", g, population=population)
    for m in members:
        m["seed"] = BIG_SEED + m["member"] // 2
    return row, members


def test_a_large_population_shows_its_four_best_and_four_worst_then_the_means():
    _, members = generation(30)
    rows = member_table(members)
    assert len(rows) == 9 <= V2_PAGE_ROWS
    by_reward = sorted(members, key=lambda m: -m["reward_mean"])
    assert [r["member"] for r in rows[:8]] == [m["member"] for m in by_reward[:4] + by_reward[-4:]]
    assert [r["rank"] for r in rows[:8]] == [f"{k} of 30" for k in (1, 2, 3, 4, 27, 28, 29, 30)]
    assert rows[-1]["rank"] == "mean of 30"
    assert rows[-1]["reward"] == round(statistics.fmean(m["reward_mean"] for m in members), 4)
    assert rows[-1]["accuracy"] == round(statistics.fmean(m["accuracy"] for m in members), 4)


def test_a_small_population_shows_every_member_best_first():
    _, members = generation(4)
    rows = member_table(members)
    assert [r["member"] for r in rows[:-1]] == [3, 2, 1, 0]  # fake_generation: reward grows with the member index
    assert rows[-1]["rank"] == "mean of 4"


def test_seeds_are_text_that_gives_back_the_exact_63_bit_seed():
    _, members = generation(10)
    for row in member_table(members)[:-1]:
        assert isinstance(row["seed"], str)
        member = next(m for m in members if m["member"] == row["member"])
        assert int(row["seed"]) == member["seed"]
    # what the UI would do with a number: a double cannot hold it
    assert float(BIG_SEED) != BIG_SEED


def read_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    (artifact,) = asyncio.run(read())
    return artifact


@pytest.mark.usefixtures("prefect_harness")
def test_each_generation_publishes_one_page_of_rows_and_its_numbers():
    row, members = generation(64, g=3)
    row = {**row, "reward_std": 0.0123, "update_norm": 1.5}

    @flow(name="table")
    def publish():
        RunProgress("table-run", 5, 3).generation(3, row, members)

    publish()
    artifact = read_artifact(artifact_key("table-run", "gen", 3))
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert len(table) <= V2_PAGE_ROWS
    assert table[0]["reward"] == round(max(m["reward_mean"] for m in members), 4)
    assert "std 0.0123" in artifact.description and "update norm 1.5" in artifact.description
    assert "the 4 best and 4 worst of 64 members" in artifact.description
