"""An incremental reusing its parent's schema archive and roles dump (logical.schema_reuse).

The pure rule is checked case by case; then, on a real cluster archiving its WAL, random
workloads between parent and incremental (DML, VACUUM, VACUUM FREEZE, ANALYZE of user tables
and catalogs, DDL of many kinds, large objects, temporary tables, rolled-back transactions
and subtransactions holding DDL) are backed up with the WAL method: whatever the
incremental did, its schema archive and roles dump read exactly as a fresh dump taken right
after it (nothing else writes meanwhile), and for workloads of DML, VACUUM and ANALYZE alone
it reused the parent's instead of dumping them.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support.archiving import Archiving, archiving_server
from support.cli import Cli
from support.clusters import find_pg_bin_dir

from backup_tool.config.policy import BackupSettings, Policy, Retention
from backup_tool.config.settings import Settings
from backup_tool.core.walnames import CatalogEvidence
from backup_tool.logical import backup, schema_reuse
from backup_tool.physical import walscan
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import schema, walbasis
from backup_tool.repository.manifest import Manifest
from backup_tool.repository.manifest import _digest as manifest_digest
from backup_tool.repository.storage import open_storage
from backup_tool.streams import pipeline

DB = 7
FILES = walbasis.SnapshotFiles(frozenset({(1663, DB, 16400), (1663, DB, 16401)}),
                               frozenset({(1663, DB, 2619), (1663, DB, 2840)}),
                               frozenset({(1663, DB, 1259), (1664, 0, 1262)}))
CONTEXT = {"server_version_num": 150020, "role": "postgres"}


def evidence(*written: tuple[int, int, int], inplace: frozenset[tuple[int, int, int]] = frozenset(),
             relmaps: frozenset[int] = frozenset(), restarted: bool = False) -> CatalogEvidence:
    return CatalogEvidence(frozenset(written), inplace, relmaps, restarted)


def plan(found: CatalogEvidence | None, parent_context: Any = CONTEXT, context: dict[str, Any] = CONTEXT,
         statistics_dumped: bool = False) -> schema_reuse.SideReuse:
    return schema_reuse.plan("P", parent_context, context, found, DB, FILES, statistics_dumped)


class TestPureRule:
    def test_writes_to_user_relations_and_other_databases_reuse_both(self) -> None:
        reuse = plan(evidence((1663, DB, 16400), (1663, DB, 16401), (1663, 99, 1259)))
        assert (reuse.schema_from, reuse.globals_from) == ("P", "P")

    def test_statistics_are_reused_only_while_the_dump_holds_none(self) -> None:
        assert plan(evidence((1663, DB, 2619), (1663, DB, 2840))).schema_from == "P"
        dumped = plan(evidence((1663, DB, 2619)), statistics_dumped=True)
        assert (dumped.schema_from, dumped.globals_from) == (None, "P")
        assert "1663/7/2619" in dumped.schema_note

    def test_a_catalog_of_this_database_dumps_the_schema_but_reuses_the_roles(self) -> None:
        reuse = plan(evidence((1663, DB, 1259)))
        assert (reuse.schema_from, reuse.globals_from) == (None, "P")
        assert "relation file 1663/7/1259" in reuse.schema_note
        assert plan(evidence(relmaps=frozenset({DB}))).schema_from is None

    def test_in_place_updates_count_only_outside_pg_class_and_pg_database(self) -> None:
        quiet = plan(evidence(inplace=frozenset({(1663, DB, 1259), (1664, 0, 1262), (1663, DB, 16400)})))
        assert (quiet.schema_from, quiet.globals_from) == ("P", "P")
        index_flags = plan(evidence(inplace=frozenset({(1663, DB, 2610)})))
        assert (index_flags.schema_from, index_flags.globals_from) == (None, "P")
        shared = plan(evidence(inplace=frozenset({(1664, 0, 1260)})))
        assert (shared.schema_from, shared.globals_from) == (None, None)
        assert plan(evidence((1663, DB, 1259))).schema_from is None, "pg_class written otherwise than in place"

    def test_a_file_unknown_at_the_snapshot_dumps_the_schema(self) -> None:
        assert plan(evidence((1663, DB, 16999))).schema_from is None

    def test_a_shared_catalog_or_map_dumps_both(self) -> None:
        for found in (evidence((1664, 0, 1260)), evidence(relmaps=frozenset({0}))):
            reuse = plan(found)
            assert (reuse.schema_from, reuse.globals_from) == (None, None)
            assert reuse.schema_note == reuse.globals_note and "shared" in reuse.schema_note

    def test_a_restart_another_context_or_no_answer_dumps_both(self) -> None:
        assert "restarted" in plan(evidence(restarted=True)).schema_note
        assert "role changed" in plan(evidence(), context={**CONTEXT, "role": "other"}).schema_note
        assert "recorded no dump context" in plan(evidence(), parent_context=None).schema_note
        unread = {"server_version_num": 150020}
        for context, parent_context in ((unread, unread), (CONTEXT, unread), (unread, CONTEXT)):
            reuse = plan(evidence(), parent_context=parent_context, context=context)
            assert (reuse.schema_from, reuse.globals_from) == (None, None)
            assert "could not be read" in reuse.schema_note
        assert "not learnt from the WAL" in plan(None).globals_note
        for reuse in (plan(evidence(restarted=True)), plan(None), plan(evidence(), parent_context=None)):
            assert (reuse.schema_from, reuse.globals_from) == (None, None)

    def test_pg_dump_18_statistics_count_unless_left_out(self) -> None:
        options = schema.SCHEMA_DUMP_OPTIONS
        assert not schema_reuse.statistics_in_dump(15, options)
        assert not schema_reuse.statistics_in_dump(17, options)
        assert schema_reuse.statistics_in_dump(18, options)
        assert not schema_reuse.statistics_in_dump(18, (*options, "--no-statistics"))


# --------------------------------------------------------------------------- on a real cluster

SCHEMA = """
DO $$BEGIN CREATE ROLE reader; EXCEPTION WHEN duplicate_object THEN NULL; END$$;
CREATE TABLE a (id int PRIMARY KEY, v text, n int);
CREATE TABLE b (id bigserial PRIMARY KEY, v text);
CREATE TABLE c (id int, payload jsonb);
CREATE INDEX c_id ON c (id);
CREATE SEQUENCE ids START 1000;
CREATE STATISTICS a_stats (dependencies) ON id, n FROM a;
COMMENT ON TABLE a IS 'first';
GRANT SELECT ON a TO reader;
INSERT INTO a SELECT g, md5(g::text), g % 7 FROM generate_series(1, 500) g;
INSERT INTO b (v) SELECT md5(g::text) FROM generate_series(1, 300) g;
INSERT INTO c SELECT g, jsonb_build_object('k', g, 'pad', repeat('x', 3000)) FROM generate_series(1, 40) g;
CREATE MATERIALIZED VIEW mv AS SELECT id, payload ->> 'k' AS k FROM c;
CREATE UNIQUE INDEX mv_id ON mv (id);
"""

REUSABLE = ["insert", "update", "delete", "nextval", "copy-toast", "vacuum", "vacuum-freeze", "analyze",
            "analyze-everything", "vacuum-catalogs", "vacuum-database", "rollback-dml", "subxact-dml", "nothing"]
SCHEMA_CHANGING = ["create-table", "add-column", "drop-table", "comment", "grant", "create-index", "alter-sequence",
                   "large-object", "temp-table", "rollback-ddl", "subxact-comment", "subxact-grant", "alter-role",
                   "alter-database", "comment-database", "create-role", "truncate", "vacuum-full-catalog",
                   "create-index-concurrently", "drop-index-concurrently", "reindex-concurrently", "refresh-mv",
                   "refresh-mv-concurrently"]


@pytest.fixture(scope="module")
def archiving() -> Iterator[Archiving]:
    with archiving_server("backup-tool-schemareuse-") as archiving:
        yield archiving


def settings_for(archiving: Archiving, db: str) -> Settings:
    return Settings(str(archiving.repo), archiving.dsn(db), Policy(retention=Retention(max_chain_length=100),
                                                                   backup=BackupSettings(change_detection="wal")))


def apply(conn: psycopg.Connection[Any], kind: str, step: int) -> None:
    """Run one workload step on database ``conn`` is connected to (autocommit)."""
    if kind == "insert":
        conn.execute(f"INSERT INTO a SELECT nextval('ids'), 'step {step}', 1 FROM generate_series(1, 20)")
    elif kind == "update":
        conn.execute("UPDATE a SET n = n + 1 WHERE id % 3 = 0")
    elif kind == "delete":
        conn.execute("DELETE FROM b WHERE id IN (SELECT id FROM b ORDER BY id LIMIT 7)")
    elif kind == "nextval":
        conn.execute("INSERT INTO b (v) VALUES ('serial')")
        conn.execute("SELECT nextval('ids')")
    elif kind == "copy-toast":
        conn.execute(f"UPDATE c SET payload = jsonb_build_object('k', {step}, 'pad', "
                     "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 200))) WHERE id % 5 = 0")
    elif kind == "vacuum":
        conn.execute("VACUUM a, b, c")
    elif kind == "vacuum-freeze":
        conn.execute("VACUUM (FREEZE, ANALYZE) a")
    elif kind == "analyze":
        conn.execute("ANALYZE a, c")
    elif kind == "analyze-everything":
        conn.execute("ANALYZE")
    elif kind == "vacuum-catalogs":
        conn.execute("VACUUM (FREEZE) pg_class, pg_attribute, pg_statistic, pg_depend")
    elif kind == "vacuum-database":
        conn.execute("VACUUM (FREEZE)")
    elif kind == "rollback-dml":
        with conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO a SELECT nextval('ids'), 'gone', 0 FROM generate_series(1, 10)")
    elif kind == "subxact-dml":
        with conn.transaction():
            conn.execute("UPDATE b SET v = 'kept' WHERE id % 11 = 0")
            with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
                conn.execute("DELETE FROM a WHERE id % 13 = 0")
                conn.execute("SELECT 1 / 0")
    elif kind == "create-table":
        conn.execute(f"CREATE TABLE IF NOT EXISTS made_{step % 3} (id int, v text)")
    elif kind == "add-column":
        conn.execute(f"ALTER TABLE b ADD COLUMN IF NOT EXISTS extra_{step % 4} int DEFAULT {step}")
    elif kind == "drop-table":
        conn.execute(f"DROP TABLE IF EXISTS made_{step % 3}")
    elif kind == "comment":
        conn.execute(f"COMMENT ON TABLE a IS 'step {step}'")
    elif kind == "grant":
        conn.execute("REVOKE SELECT ON b FROM reader" if step % 2 else "GRANT SELECT ON b TO reader")
    elif kind == "create-index":
        conn.execute(f"CREATE INDEX IF NOT EXISTS a_v_{step % 2} ON a (v)")
    elif kind == "alter-sequence":
        conn.execute(f"ALTER SEQUENCE ids INCREMENT BY {1 + step % 3}")
    elif kind == "large-object":
        conn.execute(f"SELECT lo_from_bytea(0, 'large object {step}')")
    elif kind == "temp-table":
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS scratch (id int); INSERT INTO scratch VALUES (1)")
        conn.execute("DROP TABLE scratch")
    elif kind == "rollback-ddl":
        with conn.transaction(force_rollback=True):
            conn.execute("CREATE TABLE never (id int); COMMENT ON TABLE a IS 'never'")
    elif kind in ("subxact-comment", "subxact-grant"):
        with conn.transaction():
            conn.execute("UPDATE a SET n = n WHERE id = 1")
            with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
                conn.execute("COMMENT ON TABLE b IS 'rolled back'" if kind == "subxact-comment"
                             else "GRANT UPDATE ON a TO reader")
                conn.execute("SELECT 1 / 0")
    elif kind == "alter-role":
        conn.execute(f"ALTER ROLE reader SET work_mem = '{4 + step % 5}MB'")
    elif kind == "alter-database":
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET statement_timeout = '{10 + step % 5}s'")
    elif kind == "comment-database":
        conn.execute(f"COMMENT ON DATABASE {conn.info.dbname} IS 'step {step}'")
    elif kind == "create-role":
        conn.execute(f"DROP ROLE IF EXISTS r_0; DROP ROLE IF EXISTS r_1; CREATE ROLE r_{step % 2}")
    elif kind == "truncate":
        conn.execute("TRUNCATE c")
        conn.execute("INSERT INTO c SELECT g, '{}' FROM generate_series(1, 5) g")
    elif kind == "vacuum-full-catalog":
        conn.execute("VACUUM FULL pg_description")
    elif kind == "create-index-concurrently":
        conn.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS b_v ON b (v)")
    elif kind == "drop-index-concurrently":
        conn.execute("DROP INDEX CONCURRENTLY IF EXISTS b_v")
    elif kind == "reindex-concurrently":
        conn.execute("REINDEX INDEX CONCURRENTLY c_id")
    elif kind == "refresh-mv":
        conn.execute("REFRESH MATERIALIZED VIEW mv")
    elif kind == "refresh-mv-concurrently":
        conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY mv")
    else:
        assert kind == "nothing"


def globals_text(raw: bytes) -> list[str]:
    return [line for line in raw.decode().splitlines()
            if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict"))]


def archive_texts(archive: bytes) -> tuple[str, list[str]]:
    """The schema text the fingerprint is taken of, and every entry of the archive as
    ``pg_restore`` prints it (the data ``pg_dump --schema-only`` keeps, an extension's
    configuration rows and sequence values, included)."""
    whole = pipeline.run([postgres.find_tool("pg_restore", 15), "--file=-"], {}, "pg_restore", archive)
    return schema.normalize(schema.schema_text(archive, 15)), globals_text(whole)


def stored_texts(archiving: Archiving, m: Manifest) -> tuple[tuple[str, list[str]], list[str]]:
    storage = open_storage(str(archiving.repo))
    assert m.schema is not None and m.globals is not None
    archive = pipeline.read_object(storage, m.schema)
    return archive_texts(archive), globals_text(pipeline.read_object(storage, m.globals))


def fresh_texts(archiving: Archiving, db: str) -> tuple[tuple[str, list[str]], list[str]]:
    info = postgres.ConnInfo(archiving.dsn(db)).with_search_path(postgres.NAME_SEARCH_PATH)
    archive = schema.dump_schema(info, 15)
    return archive_texts(archive), globals_text(schema.dump_globals(info, 15))


def check_exact(archiving: Archiving, db: str, m: Manifest) -> None:
    """The stored schema archive and roles dump read as fresh dumps, and the fingerprint is the schema's."""
    stored_schema, stored_globals = stored_texts(archiving, m)
    fresh_schema, fresh_globals = fresh_texts(archiving, db)
    assert stored_schema == fresh_schema
    assert stored_globals == fresh_globals
    assert m.schema_fingerprint == schema.fingerprint(fresh_schema[0])


@pytest.fixture(scope="module")
def chain(archiving: Archiving) -> dict[str, Any]:
    archiving.server.create_db("reuse")
    with psycopg.connect(archiving.dsn("reuse"), autocommit=True) as conn:
        conn.execute(SCHEMA)
    full = backup.backup_full(settings_for(archiving, "reuse"))
    assert full.options["dump_context"]["role"]
    return {"last": full, "pending": []}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.lists(st.sampled_from(REUSABLE), min_size=1, max_size=4),
                 st.lists(st.sampled_from(REUSABLE + SCHEMA_CHANGING), min_size=1, max_size=4)))
def test_the_schema_and_roles_are_a_fresh_dumps_and_reused_after_dml_vacuum_and_analyze(
        archiving: Archiving, chain: dict[str, Any], ops: list[str]) -> None:
    parent: Manifest = chain["last"]
    chain["pending"] += ops  # an example that failed before its backup left its steps in the next span
    with psycopg.connect(archiving.dsn("reuse"), autocommit=True) as conn:
        for step, kind in enumerate(ops):
            apply(conn, kind, step + int(time.monotonic()))
    incr = backup.backup_incremental(settings_for(archiving, "reuse"), changes=walscan.changed_relations)
    chain["last"] = incr
    since_parent, chain["pending"] = chain["pending"], []
    assert incr.parent_id == parent.id
    check_exact(archiving, "reuse", incr)
    if set(since_parent) <= set(REUSABLE):
        assert incr.options["changed_tables_method"] == "wal", incr.options
        assert incr.options.get("schema_reused_from") == parent.id, (ops, incr.options)
        assert incr.options.get("globals_reused_from") == parent.id, (ops, incr.options)
        assert incr.schema == parent.schema and incr.globals == parent.globals
    event(f"schema {'reused' if incr.options.get('schema_reused_from') else 'dumped'}, roles "
          f"{'reused' if incr.options.get('globals_reused_from') else 'dumped'}")
    if incr.options.get("schema_reused_from"):
        assert incr.schema_fingerprint == parent.schema_fingerprint
    else:
        assert incr.options.get("schema_dumped_because"), incr.options
        assert incr.schema is not None and incr.schema.key.startswith(f"backups/{incr.id}/")


def test_statistics_written_by_analyze_still_reuse_the_schema(archiving: Archiving) -> None:
    archiving.server.create_db("stats")
    with psycopg.connect(archiving.dsn("stats"), autocommit=True) as conn:
        conn.execute(SCHEMA)
        full = backup.backup_full(settings_for(archiving, "stats"))
        before = conn.execute("SELECT count(*) FROM pg_statistic s JOIN pg_class c ON c.oid = s.starelid"
                              " WHERE c.relname IN ('a', 'c')").fetchone()
        conn.execute("UPDATE a SET n = n + 1")
        conn.execute("ANALYZE a, c")
        after = conn.execute("SELECT count(*) FROM pg_statistic s JOIN pg_class c ON c.oid = s.starelid"
                             " WHERE c.relname IN ('a', 'c')").fetchone()
        stats_ext = conn.execute("SELECT count(*) FROM pg_statistic_ext_data").fetchone()
    assert before == (0,) and after is not None and after[0] > 0 and stats_ext == (1,)
    incr = backup.backup_incremental(settings_for(archiving, "stats"), changes=walscan.changed_relations)
    assert incr.options.get("schema_reused_from") == full.id, incr.options
    assert incr.options.get("globals_reused_from") == full.id, incr.options
    check_exact(archiving, "stats", incr)


def test_a_comment_dumps_the_schema_and_a_role_change_both(archiving: Archiving) -> None:
    archiving.server.create_db("ddl")
    with psycopg.connect(archiving.dsn("ddl"), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        backup.backup_full(settings_for(archiving, "ddl"))
        conn.execute("COMMENT ON TABLE t IS 'now'")
        commented = backup.backup_incremental(settings_for(archiving, "ddl"), changes=walscan.changed_relations)
        assert "catalog" in commented.options["schema_dumped_because"]
        assert commented.options["globals_reused_from"] == commented.parent_id
        check_exact(archiving, "ddl", commented)
        conn.execute("CREATE ROLE ddl_role")
        try:
            roles = backup.backup_incremental(settings_for(archiving, "ddl"), changes=walscan.changed_relations)
            assert "shared catalog" in roles.options["globals_dumped_because"]
            assert "shared catalog" in roles.options["schema_dumped_because"]
            check_exact(archiving, "ddl", roles)
        finally:
            conn.execute("DROP ROLE ddl_role")


def test_a_parent_without_a_dump_context_is_not_reused(archiving: Archiving) -> None:
    """A parent written before the context was recorded is never reused: the next
    incremental dumps and records its context, and the one after reuses."""
    archiving.server.create_db("old")
    with psycopg.connect(archiving.dsn("old"), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
    full = backup.backup_full(settings_for(archiving, "old"))
    stored_manifest = archiving.repo / "manifests" / f"{full.id}.json"
    body = json.loads(stored_manifest.read_bytes())
    del body["options"]["dump_context"]
    body["manifest_sha256"] = manifest_digest(body)
    stored_manifest.chmod(0o644)
    stored_manifest.write_text(json.dumps(body))
    first = backup.backup_incremental(settings_for(archiving, "old"), changes=walscan.changed_relations)
    assert first.options["changed_tables_method"] == "wal", first.options
    assert "recorded no dump context" in first.options["schema_dumped_because"]
    assert "recorded no dump context" in first.options["globals_dumped_because"]
    second = backup.backup_incremental(settings_for(archiving, "old"), changes=walscan.changed_relations)
    assert second.options.get("schema_reused_from") == first.id, second.options
    assert second.schema == first.schema and second.globals == first.globals
    check_exact(archiving, "old", second)


def test_an_incremental_reusing_the_schema_restores_and_validates(archiving: Archiving, tmp_path: Path) -> None:
    archiving.server.create_db("restorable")
    with psycopg.connect(archiving.dsn("restorable"), autocommit=True) as conn:
        conn.execute(SCHEMA)
        backup.backup_full(settings_for(archiving, "restorable"))
        conn.execute("INSERT INTO a VALUES (100000, 'late', 1); ANALYZE a")
    first = backup.backup_incremental(settings_for(archiving, "restorable"), changes=walscan.changed_relations)
    with psycopg.connect(archiving.dsn("restorable"), autocommit=True) as conn:
        conn.execute("DELETE FROM b WHERE id < 10")
        conn.execute("VACUUM b")
    second = backup.backup_incremental(settings_for(archiving, "restorable"), changes=walscan.changed_relations)
    assert first.options.get("schema_reused_from") == first.parent_id
    assert second.options.get("schema_reused_from") == first.id and second.schema == first.schema
    archiving.server.create_db("restored_reuse")
    cli = Cli(workdir=tmp_path)
    result = cli.json("restore", "full", "--repo", str(archiving.repo), "--backup", second.id,
                      "--target-dsn", archiving.dsn("restored_reuse"))
    assert result["ok"] is True, result
    shown = cli.json("list", "--repo", str(archiving.repo))
    assert next(e for e in shown if e["id"] == second.id)["schema_reused_from"] == first.id
    with psycopg.connect(archiving.dsn("restored_reuse"), autocommit=True) as conn:
        conn.execute("COMMENT ON TABLE a IS 'changed after the restore'")
    changed = cli.json("validate", "--repo", str(archiving.repo), "--dsn", archiving.dsn("restored_reuse"),
                       "--against", second.id, expect_rc=3)
    failed = [c["name"] for c in changed["checks"] if not c["ok"]]
    assert "schema_matches" in failed, failed


def test_autovacuum_and_autoanalyze_keep_the_reuse(archiving: Archiving) -> None:
    """Autovacuum's work between parent and incremental (VACUUM and ANALYZE of the written
    table, of catalogs, the database's frozen xid) writes no catalog a dump reads."""
    archiving.server.create_db("auto")
    with psycopg.connect(archiving.dsn("auto"), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("ALTER TABLE a SET (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,"
                     " autovacuum_analyze_threshold = 0, autovacuum_analyze_scale_factor = 0)")
        full = backup.backup_full(settings_for(archiving, "auto"))
        seen = conn.execute("SELECT autovacuum_count, autoanalyze_count FROM pg_stat_user_tables"
                            " WHERE relname = 'a'").fetchone()
        conn.execute("UPDATE a SET n = n + 1 WHERE id % 2 = 0")
        conn.execute("DELETE FROM a WHERE id % 9 = 0")
        with archiving.server.admin_conn() as admin:
            admin.execute("ALTER SYSTEM SET autovacuum = on")
            admin.execute("ALTER SYSTEM SET autovacuum_naptime = '1s'")
            admin.execute("SELECT pg_reload_conf()")
            try:
                deadline = time.monotonic() + 90
                while True:
                    conn.execute("SELECT pg_stat_clear_snapshot()")
                    now = conn.execute("SELECT autovacuum_count, autoanalyze_count FROM pg_stat_user_tables"
                                       " WHERE relname = 'a'").fetchone()
                    if now is not None and seen is not None and now[0] > seen[0] and now[1] > seen[1]:
                        break
                    assert time.monotonic() < deadline, f"autovacuum did not process a: {seen} -> {now}"
                    time.sleep(0.2)
            finally:
                admin.execute("ALTER SYSTEM RESET autovacuum")
                admin.execute("ALTER SYSTEM RESET autovacuum_naptime")
                admin.execute("SELECT pg_reload_conf()")
    incr = backup.backup_incremental(settings_for(archiving, "auto"), changes=walscan.changed_relations)
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert incr.options.get("schema_reused_from") == full.id, incr.options
    assert incr.options.get("globals_reused_from") == full.id, incr.options
    check_exact(archiving, "auto", incr)


CONFIG_EXTENSION = "backup_tool_reuse_config"
CONFIG_EXTENSION_SQL = """
CREATE TABLE reuse_config (key text PRIMARY KEY, value text, builtin boolean NOT NULL DEFAULT false);
INSERT INTO reuse_config VALUES ('units', 'metre', true);
CREATE SEQUENCE reuse_config_serial;
SELECT pg_catalog.pg_extension_config_dump('reuse_config', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('reuse_config_serial', '');
"""


def test_an_extensions_configuration_rows_and_sequence_are_in_the_schema_dump(archiving: Archiving) -> None:
    """``pg_dump --schema-only`` dumps the rows of an extension's configuration table and its
    configuration sequence's value: writing either dumps the schema again (other tables'
    writes do not)."""
    sharedir = subprocess.run([str(find_pg_bin_dir() / "pg_config"), "--sharedir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    extdir = Path(sharedir) / "extension"
    if not os.access(extdir, os.W_OK):
        pytest.skip(f"cannot install a test extension into {extdir}")
    (extdir / f"{CONFIG_EXTENSION}.control").write_text(
        "comment = 'backup-tool test: configuration table'\ndefault_version = '1.0'\nrelocatable = false\n"
        "schema = public\n")
    (extdir / f"{CONFIG_EXTENSION}--1.0.sql").write_text(CONFIG_EXTENSION_SQL)
    archiving.server.create_db("extcfg")
    with psycopg.connect(archiving.dsn("extcfg"), autocommit=True) as conn:
        conn.execute(f"CREATE EXTENSION {CONFIG_EXTENSION}")
        conn.execute("CREATE TABLE plain (id int)")
        backup.backup_full(settings_for(archiving, "extcfg"))
        conn.execute("INSERT INTO plain VALUES (1)")
        quiet = backup.backup_incremental(settings_for(archiving, "extcfg"), changes=walscan.changed_relations)
        assert quiet.options.get("schema_reused_from") == quiet.parent_id, quiet.options
        conn.execute("INSERT INTO reuse_config VALUES ('grid', 'local', false)")
        rows = backup.backup_incremental(settings_for(archiving, "extcfg"), changes=walscan.changed_relations)
        assert rows.options["changed_tables_method"] == "wal" and "schema_reused_from" not in rows.options
        check_exact(archiving, "extcfg", rows)
        conn.execute("SELECT nextval('reuse_config_serial')")
        value = backup.backup_incremental(settings_for(archiving, "extcfg"), changes=walscan.changed_relations)
        assert value.options["changed_tables_method"] == "wal" and "schema_reused_from" not in value.options
        check_exact(archiving, "extcfg", value)


def test_a_server_restart_since_the_parent_dumps_both(archiving: Archiving) -> None:
    """What changed while the server was down (its programs, a tablespace's link) is in no
    WAL: a shutdown checkpoint in the span means dumping the schema and roles again."""
    archiving.server.create_db("restarted")
    with psycopg.connect(archiving.dsn("restarted"), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
    backup.backup_full(settings_for(archiving, "restarted"))
    archiving.server.restart()
    with psycopg.connect(archiving.dsn("restarted"), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    incr = backup.backup_incremental(settings_for(archiving, "restarted"), changes=walscan.changed_relations)
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert "restarted" in incr.options["schema_dumped_because"]
    assert "restarted" in incr.options["globals_dumped_because"]
    check_exact(archiving, "restarted", incr)
    after = backup.backup_incremental(settings_for(archiving, "restarted"), changes=walscan.changed_relations)
    assert after.options.get("schema_reused_from") == incr.id, after.options


def test_a_time_zone_changed_by_a_reload_dumps_both(archiving: Archiving) -> None:
    """A default's timestamptz constant prints in the session's time zone, which a
    configuration reload changes without writing WAL."""
    archiving.server.create_db("zoned")
    with psycopg.connect(archiving.dsn("zoned"), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int, at timestamptz DEFAULT '2025-01-01 12:00+00')")
    full = backup.backup_full(settings_for(archiving, "zoned"))
    with archiving.server.admin_conn() as admin:
        admin.execute("ALTER SYSTEM SET TimeZone = 'Asia/Kolkata'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            time.sleep(0.5)
            incr = backup.backup_incremental(settings_for(archiving, "zoned"), changes=walscan.changed_relations)
            assert incr.options["changed_tables_method"] == "wal", incr.options
            assert "TimeZone changed" in incr.options["schema_dumped_because"], incr.options
            check_exact(archiving, "zoned", incr)
            assert incr.schema_fingerprint != full.schema_fingerprint
        finally:
            admin.execute("ALTER SYSTEM RESET TimeZone")
            admin.execute("SELECT pg_reload_conf()")


def test_an_index_built_concurrently_across_the_parents_snapshot_dumps_the_schema(archiving: Archiving) -> None:
    """CREATE INDEX CONCURRENTLY in progress while the parent is taken (its index not valid
    yet) and finished after: marking the index valid writes pg_index in the span, so the
    child dumps the schema, which shows the index valid."""
    archiving.server.create_db("cic")
    with psycopg.connect(archiving.dsn("cic"), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int, v text)")
        conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
    holder = psycopg.connect(archiving.dsn("cic"))
    holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT count(*) FROM pg_class")  # a snapshot CREATE INDEX CONCURRENTLY waits out

    def build() -> None:
        with psycopg.connect(archiving.dsn("cic"), autocommit=True) as builder:
            builder.execute("CREATE INDEX CONCURRENTLY t_v ON t (v)")
    builder = threading.Thread(target=build)
    builder.start()
    try:
        with psycopg.connect(archiving.dsn("cic"), autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while conn.execute("SELECT count(*) FROM pg_index WHERE indexrelid = to_regclass('t_v')"
                               " AND indisready AND NOT indisvalid").fetchone() != (1,):
                assert time.monotonic() < deadline, "CREATE INDEX CONCURRENTLY did not reach its last wait"
                time.sleep(0.05)
            backup.backup_full(settings_for(archiving, "cic"))
    finally:
        holder.rollback()
        holder.close()
        builder.join()
    with psycopg.connect(archiving.dsn("cic"), autocommit=True) as conn:
        assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_v'::regclass").fetchone() == (True,)
    incr = backup.backup_incremental(settings_for(archiving, "cic"), changes=walscan.changed_relations)
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert incr.options.get("schema_dumped_because"), incr.options
    check_exact(archiving, "cic", incr)
    stored_schema, _ = stored_texts(archiving, incr)
    assert "CREATE INDEX t_v ON public.t USING btree (v);" in stored_schema[0]
