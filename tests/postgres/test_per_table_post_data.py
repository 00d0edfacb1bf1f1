"""Which post-data entries a full restore builds per table, in the session that loaded it,
right after its rows (pure planning); end to end in tests/logical/test_backup_restore.py and
tests/logical/test_partitioned_indexes.py."""

from __future__ import annotations

from backup_tool.postgres import schema
from backup_tool.postgres.schema import Section, TablePostData, TocEntry

POST = Section.POST_DATA
PRE = Section.PRE_DATA


def _e(dump_id: int, desc: str, tag: str, deps: tuple[int, ...] = (), section: Section = POST,
       namespace: str = "public") -> TocEntry:
    return TocEntry(dump_id, section, desc, namespace, tag, deps)


# tp partitioned into tp_1 (index attached); ref -> tp; orders with an expression index on a
# function and extended statistics; plain without post-data; other.t in another schema.
TOC = [
    _e(1, "TABLE", "tp", section=PRE),
    _e(2, "TABLE", "tp_1", (1,), PRE),
    _e(3, "TABLE", "ref", section=PRE),
    _e(4, "FUNCTION", "lower_code(text)", section=PRE),
    _e(5, "TABLE", "orders", section=PRE),
    _e(6, "TABLE", "plain", section=PRE),
    _e(7, "TABLE", "t", section=PRE, namespace="other"),
    _e(10, "CONSTRAINT", "tp tp_pkey", (1,)),
    _e(11, "CONSTRAINT", "tp_1 tp_1_pkey", (2,)),
    _e(12, "INDEX ATTACH", "tp_1_pkey", (11, 10, 2, 1)),
    _e(13, "CONSTRAINT", "ref ref_pkey", (3,)),
    _e(14, "INDEX", "ref_b", (3,)),
    _e(15, "FK CONSTRAINT", "ref ref_a_fkey", (3, 10, 12)),
    _e(16, "TRIGGER", "ref ref_audit", (3, 4)),
    _e(17, "COMMENT", "INDEX ref_b", (14,), Section.NONE),
    _e(20, "INDEX", "orders_code", (5, 4)),
    _e(21, "STATISTICS", "orders_stats", (5,)),
    _e(22, "CONSTRAINT", "orders orders_excl", (5, 20)),
    _e(30, "INDEX", "t_a", (7,), namespace="other"),
]


def test_own_indexes_and_keys_are_built_per_table_the_rest_waits() -> None:
    plan = schema.per_table_post_data(TOC, {("public", "tp_1"), ("public", "ref"), ("public", "orders"),
                                            ("public", "plain"), ("other", "t")})
    assert plan == {
        ("public", "tp_1"): TablePostData((), False),        # its key is attached to the parent's: waits
        ("public", "ref"): TablePostData((13, 14), True),    # FK and trigger leave statistics alone
        ("public", "orders"): TablePostData((20,), False),   # extended statistics come later, so ANALYZE too;
        ("public", "plain"): TablePostData((), True),        # the constraint needing a post-data index waits
        ("other", "t"): TablePostData((30,), True),
    }


def test_only_the_tables_asked_for() -> None:
    assert schema.per_table_post_data(TOC, {("public", "ref")}) == {("public", "ref"): TablePostData((13, 14), True)}
    assert schema.per_table_post_data(TOC, set()) == {}


def test_an_inheritance_parent_is_analyzed_once_its_children_are_in() -> None:
    toc = [*TOC, _e(8, "TABLE", "orders_2024", (5,), PRE), _e(42, "INDEX", "orders_2024_code", (8, 4))]
    plan = schema.per_table_post_data(toc, {("public", "plain"), ("public", "orders_2024")})
    assert plan == {("public", "plain"): TablePostData((), True),
                    ("public", "orders_2024"): TablePostData((42,), True)}
    toc = [*TOC, _e(8, "TABLE", "plain_child", (6,), PRE)]
    assert schema.per_table_post_data(toc, {("public", "plain")}) == {("public", "plain"): TablePostData((), False)}


def test_an_entry_of_two_tables_or_of_a_table_it_does_not_name_waits() -> None:
    toc = [*TOC, _e(40, "INDEX", "odd", (3, 5)), _e(41, "CONSTRAINT", "orders not_orders_but_ref", (3,))]
    plan = schema.per_table_post_data(toc, {("public", "ref"), ("public", "orders")})
    assert plan[("public", "ref")] == TablePostData((13, 14), False)
    assert plan[("public", "orders")] == TablePostData((20,), False)
