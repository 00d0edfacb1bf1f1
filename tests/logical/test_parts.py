"""Which tables a backup splits, into how many parts, and the parts' objects and shares (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from backup_tool.logical.parts import (
    MAX_PARTS,
    Work,
    batched,
    even_share,
    part_count,
    schedule,
    slices,
    split_tables,
)
from backup_tool.postgres.connection import TableInfo

MB = 2**20


def table(oid: int, size: int, columns: tuple[str, ...] = ("id", "v")) -> TableInfo:
    return TableInfo(oid, "public", f"t{oid}", "r", None, columns, size)


def test_small_tables_old_servers_and_a_zero_threshold_are_not_split() -> None:
    assert part_count(255 * MB, 32000, 256, 4, 15, 2) == 1
    assert part_count(3000 * MB, 400000, 256, 4, 13, 2) == 1, "no TID range scan before PostgreSQL 14"
    assert part_count(3000 * MB, 400000, 0, 4, 15, 2) == 1
    assert part_count(3000 * MB, 400000, 256, 4, 15, 0) == 1, "a table without columns"


def test_parts_are_at_most_the_threshold_and_at_least_one_per_job() -> None:
    assert part_count(3000 * MB, 384000, 256, 2, 15, 2) == 12
    assert part_count(300 * MB, 38400, 256, 8, 15, 2) == 8
    assert part_count(256 * MB, 32768, 256, 1, 15, 2) == 2
    assert part_count(100000 * MB, 10**7, 256, 2, 15, 2) == MAX_PARTS
    assert part_count(300 * MB, 3, 256, 8, 15, 2) == 3, "never more parts than blocks"


def test_a_full_backup_splits_only_a_table_whose_dump_is_more_than_a_sessions_share_of_the_work() -> None:
    accounts, wide = table(1, 641 * MB), [table(2 + i, 29 * MB) for i in range(16)]
    everything = [accounts, *wide]
    share = even_share(everything, 2)
    assert share == (641 + 16 * 29) * MB * 3 // 4, "every table dumped and checksummed (half a dump), over 2 sessions"
    assert part_count(641 * MB, 82000, 256, 2, 15, 2, share) == 1, "its one COPY fits one session's share"
    assert [s.count for s in slices(everything, {1: 82000}, 256, 2, 15, share)] == [1] * 17
    assert split_tables(everything, 256, 2, 15, share) == []
    alone = even_share([accounts, table(2, MB)], 2)
    assert part_count(641 * MB, 82000, 256, 2, 15, 2, alone) == 3, "a table most of the work still is"
    assert split_tables([accounts, table(2, MB)], 256, 2, 15, alone) == [accounts]
    assert part_count(641 * MB, 82000, 256, 1, 15, 2, even_share([accounts], 1)) == 1, "one session: nothing to share"
    assert part_count(641 * MB, 82000, 256, 2, 15, 2) == 3, "without a share (an incremental's comparison), as before"


@given(st.lists(st.integers(0, 600 * MB), min_size=1, max_size=8), st.integers(1, 8))
def test_slices_name_distinct_objects_and_their_shares_add_up(sizes: list[int], jobs: int) -> None:
    tables = [table(100 + i, s) for i, s in enumerate(sizes)]
    found = slices(tables, {t.oid: t.size // 8192 for t in tables}, 256, jobs, 15)
    assert len({s.object_name for s in found}) == len(found)
    for t in tables:
        mine = [s for s in found if s.table == t]
        assert sum(s.size for s in mine) == t.size
        assert [s.index for s in mine] == list(range(len(mine))) and {s.count for s in mine} == {len(mine)}
        if len(mine) == 1:
            assert mine[0].object_name == f"{t.oid}.copy.zst" and mine[0].blocks == (None, None)
        else:
            assert mine[0].blocks[0] is None and mine[-1].blocks[1] is None
            assert [s.blocks[1] for s in mine[:-1]] == [s.blocks[0] for s in mine[1:]]


def test_the_longest_tasks_go_first_dumps_and_checksums_of_different_tables_side_by_side() -> None:
    small, big, mid = table(1, 10 * MB), table(2, 300 * MB), table(3, 100 * MB)
    pieces = slices([small, big, mid], {2: 300 * MB // 8192}, 256, 2, 15)
    big_parts = [s for s in pieces if s.table == big]
    assert len(big_parts) == 2
    order = [(work, s.table.name, s.index) for work, s in schedule(pieces, pieces)]
    assert order == [(Work.DUMP, "t2", 0), (Work.DUMP, "t2", 1), (Work.DUMP, "t3", 0), (Work.CHECKSUM, "t2", 0),
                     (Work.CHECKSUM, "t2", 1), (Work.CHECKSUM, "t3", 0), (Work.DUMP, "t1", 0), (Work.CHECKSUM, "t1", 0)]
    assert [w for w, _ in schedule([], pieces)] == [Work.CHECKSUM] * 4
    assert [s.table.name for _, s in schedule(pieces[:1], [])] == ["t1"]


@given(st.lists(st.integers(0, 600 * MB), min_size=1, max_size=8), st.integers(1, 8))
def test_the_schedule_runs_every_task_once(sizes: list[int], jobs: int) -> None:
    tables = [table(100 + i, s) for i, s in enumerate(sizes)]
    found = slices(tables, {t.oid: t.size // 8192 for t in tables}, 256, jobs, 15)
    planned = schedule(found, found[::2])
    assert sorted((w.value, s.object_name) for w, s in planned) == sorted(
        [("dump", s.object_name) for s in found] + [("checksum", s.object_name) for s in found[::2]])


def test_small_whole_tables_checksums_are_batched_where_the_first_of_them_was() -> None:
    tables = [table(1, 300 * MB), *[table(10 + i, 8192) for i in range(5)]]
    pieces = slices(tables, {1: 300 * MB // 8192}, 256, 2, 15)
    tasks = batched(schedule(pieces, pieces), MB, 2)
    shown = [(work, [(s.table.name, s.index) for s in batch]) for work, batch in tasks]
    assert shown[:4] == [(Work.DUMP, [("t1", 0)]), (Work.DUMP, [("t1", 1)]),
                         (Work.CHECKSUM, [("t1", 0)]), (Work.CHECKSUM, [("t1", 1)])], "parts stay alone"
    assert shown[4:] == [(Work.DUMP, [(f"t{10 + i}", 0)]) for i in range(5)] + [
        (Work.CHECKSUM, [("t10", 0), ("t11", 0)]), (Work.CHECKSUM, [("t12", 0), ("t13", 0)]),
        (Work.CHECKSUM, [("t14", 0)])]
    mixed = [(Work.CHECKSUM, pieces[2]), (Work.DUMP, pieces[2]), (Work.CHECKSUM, pieces[3]),
             (Work.CHECKSUM, pieces[4])]
    assert [(w, [s.table.name for s in b]) for w, b in batched(mixed, MB, 2)] == [
        (Work.CHECKSUM, ["t10", "t11"]), (Work.DUMP, ["t10"]), (Work.CHECKSUM, ["t12"])]
    assert batched([], MB, 8) == []


@given(st.lists(st.integers(0, 3 * MB), max_size=30), st.integers(1, 9))
def test_batching_runs_every_task_once(sizes: list[int], size: int) -> None:
    found = slices([table(100 + i, s) for i, s in enumerate(sizes)], {}, 256, 2, 15)
    planned = schedule(found, found[1::2])
    tasks = batched(planned, MB, size)
    assert sorted((w.value, s.object_name) for w, batch in tasks for s in batch) == \
        sorted((w.value, s.object_name) for w, s in planned)
    assert all(batch and len(batch) <= size and (w is Work.CHECKSUM or len(batch) == 1) for w, batch in tasks)
