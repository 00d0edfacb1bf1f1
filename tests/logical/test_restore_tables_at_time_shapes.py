"""Table PITR (``restore tables --target-time``) of shapes real extensions give a database.

``--into-schema`` moves the tables into the new schema inside
the scratch cluster recovered to the time (:func:`backup_tool.logical.restore_tables.detach_copy`).
That is DDL, so the database's event triggers fire there, and the partial lay-out holds only
the requested tables and the catalogs: an event trigger that reads another table (the
``periods`` extension's ``health_checks`` reads its configuration table ``periods.periods`` on
every ``ddl_command_end``) met that table's zeroed pages and the restore failed; one that
refuses DDL (a common guard in production, ``ENABLE ALWAYS`` so that
``session_replication_role`` does not silence it) refused it. The scratch copy is the tool's own
throwaway: its event triggers are disabled before anything is moved, and the copy is exact.

``--replace`` of a partitioned table one of whose partitions was dropped since (pg_partman's
retention): the definitions come from ``pg_dump --table`` of that partition alone, without its
parent; attached before its own indexes and keys existed, it got the parent's copies and
creating its own failed ("multiple primary keys"). And a partition made since holding rows
is emptied (see ``tests/logical/test_restore_tables_partition_drift.py``)."""

from __future__ import annotations

import shutil
from typing import Iterator

import pytest
from server_tool import archive_settings, archiving_workspace
from support.cli import Cli
from support.clusters import PgServer, run_sql, start_pg_server, switch_and_wait_archived

pytestmark = pytest.mark.slow

ROWS = "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t.id)) FROM {} t"
PARTED = "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t.k)) FROM parted t"
World = tuple[PgServer, str, Cli, str, tuple[int, str], tuple[int, str]]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base, wrapper, repo = archiving_workspace("backup-tool-evt-test-")
    server = start_pg_server(archive_settings(wrapper, repo))
    shutil.chown(repo, server.os_user, server.os_user)
    (base / "cli").mkdir()
    cli = Cli(workdir=base / "cli")
    try:
        server.create_db("app")
        run_sql(server, "app",
                "CREATE TABLE ddl_rules (id int PRIMARY KEY, forbid_ddl boolean NOT NULL)",
                "INSERT INTO ddl_rules SELECT g, false FROM generate_series(1, 300) g",
                "CREATE TABLE orders (id int PRIMARY KEY, note text)",
                "INSERT INTO orders SELECT g, 'o' || g FROM generate_series(1, 200) g",
                """CREATE FUNCTION check_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
                   BEGIN
                     IF EXISTS (SELECT 1 FROM public.ddl_rules WHERE forbid_ddl) THEN
                       RAISE EXCEPTION 'DDL is frozen';
                     END IF;
                   END $$""",
                "CREATE EVENT TRIGGER reads_rules ON ddl_command_end EXECUTE FUNCTION check_ddl()",
                """CREATE FUNCTION no_drops() RETURNS event_trigger LANGUAGE plpgsql AS $$
                   BEGIN RAISE EXCEPTION 'nothing is dropped here'; END $$""",
                "CREATE EVENT TRIGGER guards_drops ON sql_drop EXECUTE FUNCTION no_drops()",
                "ALTER EVENT TRIGGER guards_drops ENABLE ALWAYS",
                "CREATE TABLE notes (id int PRIMARY KEY, order_id int REFERENCES orders)",
                "CREATE TABLE parted (k int PRIMARY KEY, v text) PARTITION BY RANGE (k)",
                "CREATE INDEX parted_v ON parted (v)",
                "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)",
                "CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (100) TO (200)",
                "INSERT INTO parted SELECT g, 'p' || g FROM generate_series(0, 199) g",
                # the copy leaves its triggers behind: DROP TRIGGER in the scratch, a sql_drop
                "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
                "CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch()",
                "CHECKPOINT")
        cli.json("backup", "base", "--repo", str(repo), "--dsn", server.dsn("app"))
        run_sql(server, "app", "UPDATE orders SET note = note || ' paid' WHERE id % 3 = 0",
                "INSERT INTO orders SELECT g, 'late' FROM generate_series(201, 260) g")
        at = run_sql(server, "app", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                    "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0]
        expected = tuple(run_sql(server, "app", ROWS.format("orders")))
        parted = tuple(run_sql(server, "app", PARTED))
        run_sql(server, "app", "DELETE FROM orders WHERE id > 100", "ALTER EVENT TRIGGER guards_drops DISABLE",
                "DROP TABLE parted_1", "ALTER EVENT TRIGGER guards_drops ENABLE ALWAYS",
                "CREATE TABLE parted_3 PARTITION OF parted FOR VALUES FROM (200) TO (300)",
                "INSERT INTO parted SELECT g, 'late' FROM generate_series(200, 209) g")
        switch_and_wait_archived(server)
        yield server, str(repo), cli, at, (int(expected[0]), str(expected[1])), (int(parted[0]), str(parted[1]))
    finally:
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_event_triggers_of_the_scratch_cluster_do_not_stop_a_copy_into_a_schema(world: World) -> None:
    server, repo, cli, at, expected, _ = world
    result = cli.json("restore", "tables", "--repo", repo, "--tables", "public.orders", "--target-time", at,
                      "--target-dsn", server.dsn("app"), "--into-schema", "as_at")
    assert result["ok"] is True
    assert result["recovery_layout"]["kind"] == "partial", "the case that lays out the requested tables alone"
    found = run_sql(server, "app", ROWS.format("as_at.orders"))
    assert (int(found[0]), str(found[1])) == expected
    # the live database's event triggers are untouched
    assert run_sql(server, "app", "SELECT string_agg(evtname || ':' || evtenabled::text, ',' ORDER BY evtname)"
                                  " FROM pg_event_trigger")[0] == "guards_drops:A,reads_rules:O"


def test_a_partitioned_table_whose_partition_was_dropped_since_is_replaced_as_at_the_time(world: World) -> None:
    server, repo, cli, at, _, expected = world
    result = cli.json("restore", "tables", "--repo", repo, "--tables", "public.parted", "--target-time", at,
                      "--target-dsn", server.dsn("app"), "--replace")
    assert result["ok"] is True
    found = run_sql(server, "app", PARTED)
    assert (int(found[0]), str(found[1])) == expected
    assert run_sql(server, "app", "SELECT count(*) FROM parted_3")[0] == 0
    assert run_sql(server, "app", "SELECT string_agg(indexrelid::regclass::text || ':' || inhparent::regclass::text,"
                                  " ', ' ORDER BY indexrelid::regclass::text) FROM pg_index"
                                  " JOIN pg_inherits ON inhrelid = indexrelid"
                                  " WHERE indrelid = 'parted_1'::regclass")[0] == \
        "parted_1_pkey:parted_pkey, parted_1_v_idx:parted_v"
