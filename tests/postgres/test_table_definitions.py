"""Table definitions taken from the backup's schema archive without a scratch database:
the TOC entries chosen for a table are exactly those ``pg_dump --schema-only --table``
writes for it, and the SQL run before and after the data is exactly pg_dump's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from support.paths import FIXTURES_DIR

from backup_tool.postgres import schema
from backup_tool.postgres.schema import Section, TocEntry

PG18 = FIXTURES_DIR / "pg18"

AWKWARD = r"""
CREATE SCHEMA "Odd Schema";
CREATE SEQUENCE shared_seq;
CREATE TABLE parent (id int PRIMARY KEY, note text DEFAULT 'x');
CREATE TABLE child (id serial PRIMARY KEY, pid int REFERENCES parent(id),
                    v int DEFAULT nextval('shared_seq'), g int GENERATED ALWAYS AS (id * 2) STORED,
                    CHECK (v > 0));
CREATE INDEX child_pid ON child (pid);
COMMENT ON TABLE child IS 'c'; COMMENT ON COLUMN child.v IS 'vv'; COMMENT ON INDEX child_pid IS 'ix';
CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, x int);
CREATE ROLE defs_reader;
GRANT SELECT ON child TO defs_reader; GRANT SELECT (note) ON parent TO defs_reader;
ALTER TABLE child ENABLE ROW LEVEL SECURITY; CREATE POLICY p1 ON child USING (v > 0);
CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER t1 BEFORE INSERT ON child FOR EACH ROW EXECUTE FUNCTION trg();
CREATE TABLE pt (k int, d date) PARTITION BY RANGE (d);
CREATE TABLE pt_a PARTITION OF pt FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
CREATE INDEX pt_k ON pt (k);
ALTER TABLE pt ADD PRIMARY KEY (k, d);
CREATE VIEW v_child AS SELECT * FROM child;
CREATE STATISTICS st1 ON pid, v FROM child;
CREATE RULE r1 AS ON UPDATE TO parent DO ALSO NOTIFY parent_changed;
ALTER TABLE child ADD CONSTRAINT cv CHECK (v < 100000) NOT VALID;
CREATE TABLE inh_child () INHERITS (parent);
CREATE TABLE "Odd Schema"."we""ird
name" ("a b" int PRIMARY KEY, "x;y" text DEFAULT 'semi;colon' CHECK ("x;y" <> ''));
CREATE TABLE "Odd Schema"."we""ird
name_kid" (id int REFERENCES "Odd Schema"."we""ird
name" ("a b"));
CREATE TABLE "sp ace" (id int PRIMARY KEY);
CREATE TABLE "sp" (id int PRIMARY KEY, other int);
ALTER TABLE "sp" ADD CONSTRAINT "ace x" FOREIGN KEY (other) REFERENCES "sp ace" (id);
CREATE PUBLICATION defs_pub FOR TABLE parent;
"""


PRIVILEGES = ("GRANT ", "REVOKE ")  # pg_restore applies them after every other entry of its run


def _toc_entries(archive: bytes) -> list[TocEntry]:
    return [e for e in schema.read_toc(archive) if e.desc not in ("ENCODING", "STDSTRINGS", "SEARCHPATH", "DATABASE")]


def _statements(text: str) -> list[str]:
    return sorted(ln for ln in schema._kept_lines(text) if not ln.startswith(("SET ", "SELECT pg_catalog.set_config")))


@pytest.fixture
def awkward_db(seed_copy: Callable[[str], Any]) -> Any:
    db = seed_copy("defs")
    with db.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS defs_reader")
        conn.execute(AWKWARD)
    yield db
    with db.connect() as conn:
        conn.execute("DROP OWNED BY defs_reader")
        conn.execute("DROP ROLE defs_reader")


def _pg_dump(dsn: str, *args: str) -> bytes:
    tool = schema.find_tool("pg_dump", 15)
    return subprocess.run([tool, "--format=custom", "--compress=0", "--schema-only", "--dbname", dsn, *args],
                          check=True, capture_output=True).stdout


def test_definitions_equal_pg_dumps_table_selection(awkward_db: Any, tmp_path: Path) -> None:
    archive = _pg_dump(awkward_db.dsn)
    path = tmp_path / "schema.pgdump"
    path.write_bytes(archive)
    toc = schema.read_toc(archive)
    tables = [(e.namespace, e.tag) for e in toc if e.desc == "TABLE"]
    assert len(tables) > 30 and ("Odd Schema", 'we"ird\nname') in tables
    by_id = {e.dump_id: e for e in toc}
    ambiguous = []
    for ns, name in tables:
        ids = schema.table_definition_ids(toc, {(ns, name)})
        if ids is None:
            ambiguous.append((ns, name))
            continue
        quoted = '"' + ns.replace('"', '""') + '"."' + name.replace('"', '""') + '"'
        reference = _pg_dump(awkward_db.dsn, f"--table={quoted}", "--strict-names")
        want = sorted((e.section, e.desc, e.namespace, e.tag) for e in _toc_entries(reference))
        got = sorted((by_id[i].section, by_id[i].desc, by_id[i].namespace, by_id[i].tag) for i in ids)
        assert got == want, (ns, name)
        scripts = schema.definition_scripts(path, toc, ids, 15)
        ref_path = tmp_path / "ref.pgdump"
        ref_path.write_bytes(reference)
        pre = schema._script(ref_path, [e.dump_id for e in _toc_entries(reference)], 15, "pre-data")
        post = schema._script(ref_path, [e.dump_id for e in _toc_entries(reference)], 15, "post-data")
        ours, theirs = _statements(scripts.before_data.decode()), _statements("\n".join(pre))
        # a partition selected alone is attached to its parent after its own indexes and keys
        attach = [s for s in theirs if " ATTACH PARTITION " in s]
        assert [s for s in ours if not s.startswith(PRIVILEGES)] == \
            [s for s in theirs if not s.startswith(PRIVILEGES) and s not in attach], (ns, name)
        assert set(attach) <= set(_statements(scripts.after_data.decode())), (ns, name)
        assert sorted(ours + _statements(scripts.after_data.decode())) == \
            sorted(theirs + _statements("\n".join(post))), (ns, name)
    # "sp" with constraint "ace x" and "sp ace": the tag "sp ace x" names either table
    assert ambiguous == [("public", "sp")] or sorted(ambiguous) == [("public", "sp"), ("public", "sp ace")]


def test_pg_dump_18_archives_give_the_selection_pg_dump_18_makes() -> None:
    """Archive format 1.16 (pg_dump 17 and 18): the AWKWARD schema as pg_dump 18.6 archived it,
    and for each table the entries ``pg_dump --schema-only --table`` of it wrote (recorded by
    tests/fixtures/pg18/regenerate.py, since no PostgreSQL 17+ client is installed here)."""
    archive = (PG18 / "schema.pgdump").read_bytes()
    assert archive[5:7] == bytes([1, 16])
    recorded = {tuple(json.loads(k)): v for k, v in
                json.loads((PG18 / "table_selections.json").read_text())["selections"].items()}
    toc = schema.read_toc(archive)
    by_id = {e.dump_id: e for e in toc}
    assert sorted(recorded) == sorted((e.namespace, e.tag) for e in toc if e.desc == "TABLE")
    ambiguous = []
    for (ns, name), want in recorded.items():
        ids = schema.table_definition_ids(toc, {(ns, name)})
        if ids is None:
            ambiguous.append((ns, name))
            continue
        got = sorted([int(by_id[i].section), by_id[i].desc, by_id[i].namespace, by_id[i].tag] for i in ids)
        assert got == want, (ns, name)
    assert ambiguous == [("public", "sp")] or sorted(ambiguous) == [("public", "sp"), ("public", "sp ace")]


def _entry(dump_id: int, desc: str, tag: str, deps: tuple[int, ...] = (), section: Section = Section.PRE_DATA,
           namespace: str = "public") -> TocEntry:
    return TocEntry(dump_id, section, desc, namespace, tag, deps)


def test_selection_keeps_archive_order_and_skips_what_pg_dump_skips() -> None:
    toc = [
        _entry(1, "SEQUENCE", "shared"),
        _entry(2, "TABLE", "t", (1,)),
        _entry(3, "SEQUENCE", "t_id_seq", (2,)),
        _entry(4, "SEQUENCE OWNED BY", "t_id_seq", (3,)),
        _entry(5, "TABLE", "other"),
        _entry(6, "VIEW", "v", (2,)),
        _entry(7, "FK CONSTRAINT", "other other_t_fkey", (2, 5), Section.POST_DATA),
        _entry(8, "FK CONSTRAINT", "t t_other_fkey", (5, 2), Section.POST_DATA),
        _entry(9, "STATISTICS", "st", (2,), Section.POST_DATA),
        _entry(10, "INDEX", "t_idx", (2,), Section.POST_DATA),
        _entry(11, "COMMENT", "INDEX t_idx", (10,), Section.NONE),
        _entry(12, "COMMENT", "VIEW v", (6,), Section.NONE),
    ]
    assert schema.table_definition_ids(toc, {("public", "t")}) == [2, 3, 4, 8, 10, 11]
    assert schema.table_definition_ids(toc, {("other", "t")}) == []


def test_a_partition_of_a_parent_not_created_is_attached_after_its_indexes_and_keys() -> None:
    """A partition restored under a parent the target already has (pg_partman's, whose
    partition retention dropped): attached before its own indexes and keys exist, it would get
    the parent's copies under the same names, and creating its own would fail. Its
    attachment and its indexes' come last, whether the archive holds the parent (a backup's
    schema) or not (``pg_dump --table`` of the partition alone, as table PITR reads it); with
    the parent created too, the archive's order stands."""
    parent = [_entry(1, "TABLE", "events"),
              _entry(9, "INDEX", "events_kind", (1,), Section.POST_DATA),
              _entry(10, "CONSTRAINT", "events events_pkey", (1,), Section.POST_DATA)]
    partition = [
        _entry(2, "TABLE", "events_p1"),
        _entry(3, "TABLE ATTACH", "events_p1", (1, 2)),
        _entry(4, "DEFAULT", "events_p1 id", (2,)),
        _entry(11, "INDEX", "events_p1_kind_idx", (2,), Section.POST_DATA),
        _entry(12, "CONSTRAINT", "events_p1 events_p1_pkey", (2,), Section.POST_DATA),
        _entry(13, "INDEX ATTACH", "events_p1_kind_idx", (9, 11), Section.POST_DATA),
        _entry(14, "INDEX ATTACH", "events_p1_pkey", (10, 12), Section.POST_DATA),
        _entry(15, "COMMENT", "TABLE events_p1", (2,), Section.NONE),
    ]
    whole = sorted(parent + partition, key=lambda e: e.dump_id)
    assert schema.table_definition_ids(whole, {("public", "events_p1")}) == [2, 4, 15, 11, 12, 3, 13, 14]
    alone = [e for e in whole if e.dump_id not in (1, 9, 10)]
    assert schema.table_definition_ids(alone, {("public", "events_p1")}) == [2, 4, 15, 11, 12, 3, 13, 14]
    assert schema.table_definition_ids(whole, {("public", "events"), ("public", "events_p1")}) == \
        [1, 2, 3, 4, 15, 9, 10, 11, 12, 13, 14]


def test_unknown_archive_is_refused_not_misread() -> None:
    with pytest.raises(schema.UnreadableToc):
        schema.read_toc(b"-- plain SQL, not an archive\n")
    with pytest.raises(schema.UnreadableToc):
        schema.read_toc(b"PGDMP\x01\x10\x00\x04\x08\x01" + b"\x00" * 40)
