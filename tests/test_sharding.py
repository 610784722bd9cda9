"""How a generation's rows are split over engines and put back: every (member, prompt) cell from
exactly one shard, in member order; a lost or doubled cell is an error, never a hole."""

import pytest

from es_core.backends.sharding import Shard, merge, plan_shards, split


@pytest.mark.parametrize("members, prompts, engines", [(30, 32, 4), (4, 3, 2), (5, 3, 2), (1, 2000, 4), (2, 7, 5), (3, 1, 8), (64, 32, 1)])
def test_shards_cover_every_cell_once_with_no_more_shards_than_engines(members, prompts, engines):
    shards = plan_shards(members, prompts, engines)
    cells = [(m, p) for s in shards for m in s.members for p in s.prompts]
    assert sorted(cells) == [(m, p) for m in range(members) for p in range(prompts)]
    assert len(shards) == min(engines, members * prompts)
    if members >= engines:  # each engine a few whole members, within one of each other
        assert max(len(s.members) for s in shards) - min(len(s.members) for s in shards) <= 1


def test_a_population_is_split_by_members_and_one_adapter_by_prompts():
    assert plan_shards(5, 3, 2) == [Shard(range(0, 3), range(3)), Shard(range(3, 5), range(3))]
    assert plan_shards(1, 10, 4) == [Shard(range(0, 1), p) for p in (range(0, 3), range(3, 6), range(6, 8), range(8, 10))]
    assert plan_shards(2, 4, 3) == [Shard(range(0, 1), range(0, 2)), Shard(range(0, 1), range(2, 4)), Shard(range(1, 2), range(0, 4))]
    assert plan_shards(0, 4, 3) == [] and split(2, 4) == [range(0, 1), range(1, 2)]


def test_merge_puts_each_shard_back_in_member_and_prompt_order():
    members, prompts, engines = 3, 4, 5
    shards = plan_shards(members, prompts, engines)
    answers = [[[(m, p) for p in s.prompts] for m in s.members] for s in shards]
    assert merge(shards, answers, members, prompts) == [[(m, p) for p in range(prompts)] for m in range(members)]


def test_a_lost_doubled_or_misshapen_shard_is_an_error():
    shards = plan_shards(4, 2, 2)
    good = [[[(m, p) for p in s.prompts] for m in s.members] for s in shards]
    with pytest.raises(ValueError, match="1 shard results for 2 shards"):
        merge(shards, good[:1], 4, 2)
    with pytest.raises(ValueError, match="answered by two shards"):
        merge([shards[0], shards[0]], [good[0], good[0]], 4, 2)
    with pytest.raises(ValueError, match="answered 1 x"):
        merge(shards, [good[0][:1], good[1]], 4, 2)
    with pytest.raises(ValueError, match="4 of 8 rows were answered by no shard"):
        merge(shards[:1], good[:1], 4, 2)
    with pytest.raises(ValueError, match="engines must be >= 1"):
        plan_shards(4, 2, 0)
