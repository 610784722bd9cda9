"""How a generation's rows (member x prompt) are split over engines, and put back together.

Pure functions of sizes: the Ray runner (ray_engines.py) sends each engine one `Shard`, a rectangle
of members x prompts, and `merge` puts the engines' answers back into result[member][prompt]. A
population of at least as many members as engines is split by members (each engine decodes all
prompts for its members, as the local engine's chunks do); fewer members (a held-out evaluation:
one adapter, thousands of prompts) are split by prompts too, so every engine still gets work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

T = TypeVar("T")
_EMPTY = object()  # a cell no shard has answered yet


@dataclass(frozen=True)
class Shard:
    """One engine's part of a generation: these members on these prompts."""

    members: range
    prompts: range

    @property
    def rows(self) -> int:
        return len(self.members) * len(self.prompts)


def split(n: int, parts: int) -> list[range]:
    """0..n-1 in `parts` contiguous ranges whose sizes differ by at most one, larger first; empty
    ranges left out (parts > n gives n ranges of one)."""
    if n < 0 or parts < 1:
        raise ValueError(f"cannot split {n} items into {parts} parts")
    size, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        if stop > start:
            ranges.append(range(start, stop))
        start = stop
    return ranges


def plan_shards(members: int, prompts: int, engines: int) -> list[Shard]:
    """At most `engines` shards that cover every (member, prompt) cell exactly once, member-major.
    members >= engines: contiguous member ranges (sizes within one of each other), all prompts.
    Fewer members: each member's prompts split over engines // members engines (the first
    engines % members members get one more), so that no engine idles while another decodes a
    whole member."""
    if engines < 1:
        raise ValueError(f"engines must be >= 1 (got {engines})")
    if members == 0 or prompts == 0:
        return []
    if members >= engines:
        return [Shard(m, range(prompts)) for m in split(members, engines)]
    shards = []
    for m, count in zip(range(members), (len(r) for r in split(engines, members))):
        shards += [Shard(range(m, m + 1), p) for p in split(prompts, count)]
    return shards


def merge(shards: Sequence[Shard], results: Sequence[Sequence[Sequence[T]]], members: int, prompts: int) -> list[list[T]]:
    """result[member][prompt] from each shard's result[i][j] (its i-th member, j-th prompt). Every
    cell must come from exactly one shard of the right shape: a shard lost or answered twice is an
    error here, never a hole or a duplicate in the ledger."""
    if len(shards) != len(results):
        raise ValueError(f"{len(results)} shard results for {len(shards)} shards")
    grid: list[list] = [[_EMPTY] * prompts for _ in range(members)]
    filled = 0
    for shard, result in zip(shards, results):
        if len(result) != len(shard.members) or any(len(row) != len(shard.prompts) for row in result):
            raise ValueError(f"a shard of {len(shard.members)} members x {len(shard.prompts)} prompts answered "
                             f"{len(result)} x {[len(row) for row in result]}")
        for m, row in zip(shard.members, result):
            for p, value in zip(shard.prompts, row):
                if grid[m][p] is not _EMPTY:
                    raise ValueError(f"member {m}, prompt {p} answered by two shards")
                grid[m][p] = value
                filled += 1
    if filled != members * prompts:
        raise ValueError(f"{members * prompts - filled} of {members * prompts} rows were answered by no shard")
    return grid
