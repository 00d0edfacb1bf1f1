"""Block ranges that split a table's rows into parts, and the checksums summed over them (pure)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from backup_tool.postgres.connection import block_ranges, combine_checksums, ctid_condition


def owner(ranges: list[tuple[int | None, int | None]], block: int) -> list[int]:
    return [i for i, (start, stop) in enumerate(ranges)
            if (start is None or block >= start) and (stop is None or block < stop)]


@given(blocks=st.integers(0, 5000), parts=st.integers(1, 80))
def test_every_block_and_every_block_beyond_the_measured_size_is_in_exactly_one_range(blocks: int, parts: int) -> None:
    ranges = block_ranges(blocks, parts)
    assert 1 <= len(ranges) <= max(1, min(parts, blocks))
    assert ranges[0][0] is None and ranges[-1][1] is None
    for block in [*range(blocks), blocks, blocks + 1, blocks * 3 + 7]:
        assert len(owner(ranges, block)) == 1, block
    inner = [stop for _, stop in ranges[:-1]]
    assert inner == sorted(set(inner))
    if len(ranges) > 1:
        sizes = [(stop if stop is not None else blocks) - (start or 0) for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_conditions_are_tid_ranges() -> None:
    assert ctid_condition((None, None)) == ""
    assert ctid_condition((None, 10)) == "ctid < '(10,0)'::tid"
    assert ctid_condition((10, 20)) == "ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid"
    assert ctid_condition((20, None)) == "ctid >= '(20,0)'::tid"


@given(st.lists(st.integers(0, 2**64 - 1), max_size=60), st.integers(1, 6), st.randoms())
def test_summed_parts_equal_the_whole(hashes: list[int], parts: int, rnd: random.Random) -> None:
    """The table checksum is a sum of row hashes modulo 2**64: any partition of the rows sums
    to the whole table's value."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    for h in hashes:
        groups[rnd.randrange(parts)].append(h)
    whole = (len(hashes), f"{sum(hashes) % 2**64:016x}")
    assert combine_checksums([(len(g), f"{sum(g) % 2**64:016x}") for g in groups]) == whole
