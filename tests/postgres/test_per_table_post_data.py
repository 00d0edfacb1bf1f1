"""Which post-data entries a full restore builds per table, in the session that loaded it,
right after its rows (pure planning); end to end in tests/logical/test_backup_restore.py and
tests/logical/test_partitioned_indexes.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from backup_tool.postgres import schema
from backup_tool.postgres.connection import ConnInfo
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


ODD = '"Odd ""name"""'
SCHEMA = ";".join([
    f"CREATE TABLE {ODD} (id int PRIMARY KEY, code text UNIQUE, span circle, EXCLUDE USING gist (span WITH &&))",
    f'CREATE INDEX "Odd lower" ON {ODD} (lower(code)) WHERE id > 0',
    "COMMENT ON INDEX \"Odd lower\" IS 'kept by the late replay'",
    'ALTER INDEX "Odd lower" ALTER COLUMN 1 SET STATISTICS 500',
    f'ALTER TABLE {ODD} CLUSTER ON "Odd ""name""_pkey"',
    f"CREATE TABLE child (id int REFERENCES {ODD}, note text)",
    "CREATE INDEX child_note ON child (note text_pattern_ops)",
    "CREATE SCHEMA other",
    "CREATE TABLE other.t (a int, b int, UNIQUE (a, b) DEFERRABLE INITIALLY DEFERRED)",
    "CREATE TABLE tp (a int, b int, PRIMARY KEY (a, b)) PARTITION BY LIST (a)",
    "CREATE TABLE tp_1 PARTITION OF tp FOR VALUES IN (1)",
    "CREATE INDEX tp_1_b ON tp_1 (b)",
])


def test_per_table_statements_and_the_late_replay_rebuild_the_whole_post_data(fresh_db: Any, tmp_path: Path) -> None:
    """Each table's early entries run alone on a plain session, the replay skips them and
    does the rest: the schema comes out as the source's, every item counted once."""
    src = fresh_db("early_src")
    src.execute(SCHEMA)
    archive = tmp_path / "schema.pgdump"
    archive.write_bytes(subprocess.run([schema.find_tool("pg_dump", 15), "--format=custom", "--schema-only",
                                        "--dbname", src.dsn], check=True, capture_output=True).stdout)
    toc = schema.read_toc(archive.read_bytes())
    tables = {(e.namespace, e.tag) for e in toc if e.desc == "TABLE" and e.tag != "tp"}
    plan = schema.per_table_post_data(toc, tables)
    early = [i for p in plan.values() for i in p.ids]
    by_id = {e.dump_id: e for e in toc}
    assert sorted(by_id[i].tag for i in early) == sorted([
        'Odd "name" Odd "name"_pkey', 'Odd "name" Odd "name"_code_key', 'Odd "name" Odd "name"_span_excl',
        "Odd lower", "child_note", "tp_1_b", "t t_a_b_key"])
    statements = schema.post_data_statements(archive, toc, early, 15)
    assert statements is not None and set(statements) == set(early)

    dst = fresh_db("early_dst")
    target = ConnInfo(dst.dsn)
    schema.restore_section(archive, target, 15, "pre-data")
    with target.connect() as conn:
        for i in early:
            conn.execute(statements[i].encode("utf-8", "surrogateescape"))
    done: list[int] = []
    schema.restore_section(archive, target, 15, "post-data", jobs=2, on_item=lambda: done.append(1),
                           skip=frozenset(early))
    assert len(done) == len(schema.section_ids(archive, 15, "post-data")) - len(early)
    assert schema.live_schema(target, 15) == schema.live_schema(ConnInfo(src.dsn), 15)
