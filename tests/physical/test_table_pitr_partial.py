"""Table PITR from a partial lay-out is exact: a real PostgreSQL 15 cluster archiving through
`backup-tool wal push`, one base backup, then a seeded random workload on the target table
(inserts, updates, deletes with TOASTed values, TRUNCATE, ALTER TABLE ... TYPE, VACUUM FULL,
index builds including a hash index) interleaved with noise on tables the copy does not need
(one with a matview and btree index over it, one whose untouched pages VACUUM marks
all-visible without a full-page image, another database, and the postgres database, which
a table request's lay-out leaves out). At several recorded moments the
table's rows are fingerprinted on the live server; `restore tables --target-time` must
bring back exactly those rows from the partial lay-out, equal to what the full lay-out
brings back, read only part of the stored backup, and fall back to the full lay-out when
the table was renamed after the backup."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
from server_tool import archive_settings, archiving_workspace
from support.cli import Cli
from support.clusters import PgServer, free_port, run_sql, start_pg_server, switch_and_wait_archived

from backup_tool.config.settings import resolve_settings
from backup_tool.core import walnames
from backup_tool.core.report import NullReporter
from backup_tool.jobs import table_pitr
from backup_tool.physical import partial as partial_mod
from backup_tool.physical import pitr
from backup_tool.postgres import tools as pg_tools
from backup_tool.postgres.cluster import LocalServer, find_bin_dir
from backup_tool.postgres.connection import find_tool
from backup_tool.repository.manifest import utc_iso

pytestmark = pytest.mark.slow

ROWS_SQL = "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t.id), '')) FROM {} t"


@dataclass
class World:
    server: PgServer
    repo: str
    cli: Cli
    moments: list[tuple[str, tuple[int, str]]]
    renamed_at: str
    renamed_rows: tuple[int, str]
    base_size: int
    fresh_at: str
    fresh_rows: tuple[int, str]
    inflight_at: str
    inflight_rows: tuple[int, str]
    gone_at: str


def sql(server: PgServer, *statements: str, db: str = "app") -> Any:
    return run_sql(server, db, *statements)


def now_utc(server: PgServer) -> str:
    time.sleep(0.05)
    stamp = sql(server, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0]
    time.sleep(0.05)
    return stamp


def rows(server: PgServer, table: str, db: str = "app") -> tuple[int, str]:
    count, digest = sql(server, ROWS_SQL.format(table), db=db)
    return int(count), digest


def step(server: PgServer, rnd: random.Random, n: int) -> None:
    """One random change to public.orders plus noise elsewhere."""
    big = "repeat(md5(random()::text), 200)"
    choices = [
        f"INSERT INTO orders (amount, note) SELECT (random() * 1000)::int, CASE WHEN g % 3 = 0 THEN {big} "
        f"ELSE 'n' || g END FROM generate_series(1, {rnd.randint(50, 400)}) g",
        f"UPDATE orders SET amount = amount + 1, note = note || 'u' WHERE id % {rnd.randint(2, 7)} = 0",
        f"DELETE FROM orders WHERE id % {rnd.randint(5, 13)} = 1",
        f"UPDATE orders SET note = {big} WHERE id % 11 = 0",
    ]
    sql(server, rnd.choice(choices), rnd.choice(choices),
        f"INSERT INTO noise (v) SELECT md5(g::text) FROM generate_series(1, {rnd.randint(100, 2000)}) g",
        f"UPDATE noise SET v = v || 'x' WHERE id < {rnd.randint(50, 400)}")
    sql(server, f"UPDATE chores SET v = v || 'y' WHERE id % {rnd.randint(3, 9)} = 0",
        f"INSERT INTO chores SELECT g, md5(g::text) FROM generate_series({5000 + 100 * n}, {5099 + 100 * n}) g",
        "VACUUM chores", db="postgres")
    ddl = [
        "TRUNCATE orders; INSERT INTO orders (amount, note) SELECT g, 't' || g FROM generate_series(1, 300) g",
        f"ALTER TABLE orders ALTER COLUMN amount TYPE {'numeric(12,2)' if n % 2 else 'bigint'}",
        "VACUUM FULL orders",
        f"CREATE INDEX IF NOT EXISTS orders_note_{n} ON orders (note)",
        "REINDEX TABLE orders",
        "VACUUM orders",
    ]
    sql(server, rnd.choice(ddl))


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base, wrapper, repo = archiving_workspace("backup-tool-partial-test-")
    server = start_pg_server(archive_settings(wrapper, repo))
    shutil.chown(repo, server.os_user, server.os_user)
    (base / "cli").mkdir()
    cli = Cli(workdir=base / "cli")
    try:
        server.create_db("app")
        server.create_db("other")
        server.create_db("gone")
        sql(server, "CREATE TABLE kept (id int PRIMARY KEY)", db="gone")
        # the postgres database, left out of a table request's lay-out, is written to all along
        sql(server, "CREATE TABLE chores (id int PRIMARY KEY, v text)",
            "INSERT INTO chores SELECT g, md5(g::text) FROM generate_series(1, 4000) g", db="postgres")
        sql(server, "CREATE TABLE elsewhere (id int PRIMARY KEY, v text)",
            "INSERT INTO elsewhere SELECT g, md5(g::text) FROM generate_series(1, 20000) g", db="other")
        # a template database (as PostGIS set-ups keep one): --only-database must still drop it
        server.create_db("spare_template")
        sql(server, "ALTER DATABASE spare_template IS_TEMPLATE true", db="postgres")
        sql(server,
            "CREATE TABLE orders (id bigserial PRIMARY KEY, amount int NOT NULL, note text)",
            "CREATE INDEX orders_amount_hash ON orders USING hash (amount)",
            "INSERT INTO orders (amount, note) SELECT g, CASE WHEN g % 5 = 0 THEN repeat(md5(g::text), 300) "
            "ELSE 'o' || g END FROM generate_series(1, 2000) g",
            "CREATE TABLE noise (id bigserial PRIMARY KEY, v text)",
            "INSERT INTO noise (v) SELECT md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) "
            "FROM generate_series(1, 200000) g",
            "CREATE MATERIALIZED VIEW noise_sum AS SELECT id % 100 AS k, count(*) AS n FROM noise GROUP BY 1",
            "CREATE UNIQUE INDEX ON noise_sum (k)",
            "CREATE TABLE cold (id int, v text)",
            "INSERT INTO cold SELECT g, md5(g::text) FROM generate_series(1, 30000) g",
            "CREATE TABLE stock (id int PRIMARY KEY, qty int)",
            "INSERT INTO stock SELECT g, g FROM generate_series(1, 500) g",
            "CHECKPOINT")
        backup = cli.json("backup", "base", "--repo", str(repo), "--dsn", server.dsn("app"))
        assert backup["method"] == "direct", "the partial lay-out is proved over a direct backup's index"
        sql(server, "VACUUM cold")  # all-visible marks on pages with no image since the checkpoint
        rnd = random.Random(18)
        moments = []
        for n in range(6):
            step(server, rnd, n)
            moments.append((now_utc(server), rows(server, "orders")))
        with psycopg.connect(server.dsn("app")) as bulk:
            bulk.execute("SELECT txid_current()")  # begun before the moment, its ~20 MB of WAL after it
            sql(server, "UPDATE orders SET amount = amount + 1 WHERE id % 17 = 0")
            inflight_at, inflight_rows = now_utc(server), rows(server, "orders")
            bulk.execute("INSERT INTO orders (amount, note) SELECT g, repeat(md5(g::text), 20)"
                         " FROM generate_series(1, 30000) g")
            bulk.execute("UPDATE orders SET note = 'bulk' WHERE id % 2 = 0")
        sql(server, "UPDATE stock SET qty = qty * 2 WHERE id % 3 = 0", "ALTER TABLE stock RENAME TO stock_renamed")
        renamed_at, renamed_rows = now_utc(server), rows(server, "stock_renamed")
        sql(server, "ALTER DATABASE other RENAME TO other_before",
            "CREATE DATABASE other TEMPLATE app STRATEGY FILE_COPY", db="postgres")
        sql(server, "CREATE TABLE late (id int PRIMARY KEY, v text)",
            "INSERT INTO late SELECT g, md5(g::text) FROM generate_series(1, 500) g", db="other")
        fresh_at, fresh_rows = now_utc(server), rows(server, "late", db="other")
        sql(server, "DELETE FROM late WHERE id % 2 = 0", db="other")
        sql(server, "DROP DATABASE gone", db="postgres")
        gone_at = now_utc(server)
        sql(server, "DELETE FROM orders", "DROP TABLE stock_renamed", "UPDATE noise SET v = 'gone' WHERE id < 1000")
        switch_and_wait_archived(server)
        yield World(server, str(repo), cli, moments, renamed_at, renamed_rows, int(backup["size_bytes"]),
                    fresh_at, fresh_rows, inflight_at, inflight_rows, gone_at)
    finally:
        server.pg_ctl("-m", "immediate", "stop", check=False)
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)


def walk(world: World, tmp: Path, partial: bool,
         moments: list[str]) -> tuple[list[tuple[int, str]], str, pitr.Layout]:
    """Lay out once, then recover to each moment in turn (pausing there, reading the table
    read-only, restarting with the next target): the rows of orders at every moment."""
    settings = resolve_settings(world.repo, world.server.dsn("app"), None)
    first = pitr.Target("time", time=pitr.parse_time(moments[0]))
    request = pitr.PartialRequest("app", ((None, "orders"),)) if partial else None
    layout = pitr.lay_out(settings, first, tmp / "data", None, world.server.os_user, archive=False,
                          partial_for=request)
    assert (layout.choice is not None) == partial
    if partial:
        maps = sorted(p.name for p in [*(tmp / "data" / "base").glob("*/*"), *(tmp / "data" / "global").glob("*")]
                      if p.name.endswith(("_fsm", "_vm")))
        assert maps == [], "a table request lays out no free space map or visibility map fork"
        assert layout.choice is not None
        app = sql(world.server, "SELECT oid::bigint FROM pg_database WHERE datname = 'app'")[0]
        others = [m.name for m in (*layout.choice.full, *layout.choice.sparse)
                  if partial_mod.RELATION_FILE.match(m.name) and not m.name.startswith(f"base/{app}/")]
        assert others == [], "the scratch cluster connects to app alone: every other database's relation " \
                             "files (postgres's, template1's) are left out"
    assert layout.database == ("app" if partial else "postgres")
    server = LocalServer(pgdata=layout.pgdata, os_user=layout.os_user, bin_dir=world.server.bin_dir,
                         port=free_port(), private_dir=tmp / "s", log_file=tmp / "recovery.log", superuser="postgres",
                         database=layout.database)
    found = []
    try:
        for moment in moments:
            server.start_private({**(pitr.PARTIAL_SETTINGS if partial else {}), "recovery_target_action": "pause",
                                  "recovery_target_time": pitr.pg_timestamp(pitr.parse_time(moment))})
            server.wait_until(lambda: paused(server), 120, "recovery")
            with server.conninfo("app").connect() as conn:
                count, digest = conn.execute(ROWS_SQL.format("orders")).fetchone()
            found.append((int(count), digest))
            server.stop("fast")
    finally:
        server.stop("immediate")
    return found, server.log_text(), layout


def paused(server: LocalServer) -> bool:
    try:
        with server.conninfo().connect() as conn:
            return conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()[0] == "paused"
    except Exception:  # noqa: BLE001 - not accepting connections yet
        return False


def test_partial_layout_equals_full_layout_and_live_rows_at_every_moment(world: World) -> None:
    moments = [moment for moment, _ in world.moments]
    live = [expected for _, expected in world.moments]
    from_partial, log, layout = walk(world, world.server.make_user_dir(), True, moments)
    assert from_partial == live
    from_full, _, _ = walk(world, world.server.make_user_dir(), False, [moments[1], moments[-1]])
    assert from_full == [from_partial[1], from_partial[-1]]
    assert layout.choice is not None
    # VACUUM's all-visible marks on pages without an image since the checkpoint met zeroed
    # pages of the sparse table "cold": skipped, and only ever in sparse files.
    assert "invalid pages" in log
    assert partial_mod.unexplained_invalid_pages(log, layout.choice.sparse_files) == []
    assert layout.bytes_fetched is not None and layout.bytes_fetched < world.base_size * 0.6


def restore_at(world: World, table: str, moment: str, schema: str, *extra: str) -> dict[str, Any]:
    return world.cli.json("restore", "tables", "--repo", world.repo, "--tables", table, "--target-time", moment,
                          "--target-dsn", world.server.dsn("app"), "--into-schema", schema, *extra)


def test_restore_tables_at_a_time_uses_the_partial_layout(world: World) -> None:
    moment, expected = world.moments[3]
    result = restore_at(world, "orders", moment, "at_moment")
    assert result["ok"] is True
    layout = result["recovery_layout"]
    assert layout["kind"] == "partial" and layout["fallback_because"] is None
    assert layout["read_paused"] is False, "--into-schema moves the tables in the scratch cluster: promoted"
    assert layout["bytes_fetched"] < world.base_size * 0.6
    assert rows(world.server, "at_moment.orders") == expected


def test_a_copy_into_a_schema_promotes_the_scratch_at_the_time_without_a_checkpoint(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """--into-schema must write in the scratch cluster: it is asked to promote while it
    replays, replays on to the time all the same and promotes there instead of pausing,
    without the end-of-recovery checkpoint of every page replay dirtied, with exactly the
    rows the live server had at the moment. A request that comes after the pause (here: never
    made early) is finished from the pause (here by just ending it, which takes the
    checkpoint), with the same rows.

    The early request races a short replay (tens of ms here), and the late path's own wake-up
    of the paused startup process can lose too (then it ends the pause: the checkpoint): a
    run that took the checkpoint is checked for its rows like any, and tried again (up to
    :data:`EARLY_TRIES` runs) until one promotes without it. The old code, which promoted
    at the target, took it every time."""
    logs: list[str] = []
    retire = table_pitr._retire

    def keep_log(server: LocalServer, data: Path | None) -> None:
        logs.append(server.log_text())
        retire(server, data)
    monkeypatch.setattr(table_pitr, "_retire", keep_log)
    settings = resolve_settings(world.repo, world.server.dsn("app"), None)

    def restore(n: int, schema: str) -> str:
        moment, expected = world.moments[n]
        result = table_pitr.restore_tables_at(settings, world.server.dsn("app"), ["orders"], moment,
                                              into_schema=schema)
        assert result.validation is not None and result.validation.ok
        assert result.recovery_layout is not None and result.recovery_layout["read_paused"] is False
        assert rows(world.server, f"{schema}.orders") == expected
        return logs[-1]

    early = ""
    for attempt in range(EARLY_TRIES):
        log = restore(2, f"promoted_early_{attempt}")
        if "received promote request" in log and "end-of-recovery" not in log:
            early = log
            break
    assert early, f"every one of {EARLY_TRIES} runs promoted with the end-of-recovery checkpoint:\n{log}"
    assert early.index("recovery stopping after") < early.index("received promote request")
    monkeypatch.setattr(pitr, "LOG_HOT_STANDBY", "never logged")
    monkeypatch.setattr(pitr, "PROMOTE_TRIES", 0)
    late = restore(3, "promoted_late")
    assert "pausing at the end of recovery" in late and "end-of-recovery" in late, late


EARLY_TRIES = 4


def test_recovery_stops_at_the_last_commit_before_the_time(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction begun before the moment writes ~20 MB of WAL after it and commits later:
    the scratch recovery stops at the commit before the moment, found in the WAL read ahead
    (none of that WAL replayed), with exactly the rows the live server had at the moment. With
    the scan allowed less WAL than reaches that commit, recovery stops at the time as before,
    with the same rows."""
    early = restore_at(world, "orders", world.inflight_at, "inflight_early")
    assert early["ok"] is True and early["recovery_layout"]["stopped_at_commit"]
    assert rows(world.server, "inflight_early.orders") == world.inflight_rows
    assert early["recovered_to"] is not None and early["recovered_to"] < world.inflight_at

    monkeypatch.setattr(pitr, "EARLY_STOP_SCAN_BYTES", 1)
    settings = resolve_settings(world.repo, world.server.dsn("app"), None)
    late = table_pitr.restore_tables_at(settings, world.server.dsn("app"), ["orders"], world.inflight_at,
                                        into_schema="inflight_time")
    assert late.validation is not None and late.validation.ok
    assert late.recovery_layout["stopped_at_commit"] is None
    assert rows(world.server, "inflight_time.orders") == world.inflight_rows
    assert late.recovered_to is not None
    assert utc_iso(late.recovered_to) == early["recovered_to"], "the same last commit, however recovery stopped"


class Events(NullReporter):
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def event(self, message: str, **fields: Any) -> None:
        self.seen.append((message, fields))

    def field(self, message: str, name: str) -> Any:
        return next(fields[name] for seen, fields in self.seen if seen == message)


def test_the_scan_for_the_stop_reads_ahead_of_itself_not_of_the_archive(world: World) -> None:
    """While the WAL read ahead during the lay-out is scanned for the last commit before the
    time, the read-ahead runs at most SCAN_LEAD segments ahead of the scan: the archive holds
    more after the stop (WAL written later, elsewhere), which is fetched (decompressed,
    verified, written) no more. It used to fill its usual window of 16 segments first,
    whatever the scan had found."""
    moment, expected = world.moments[0]
    sql(world.server, "CREATE TABLE IF NOT EXISTS wal_filler AS"
        " SELECT g, repeat(md5(g::text), 4) AS v FROM generate_series(1, 300000) g", db="postgres")
    switch_and_wait_archived(world.server)
    settings = resolve_settings(world.repo, world.server.dsn("app"), None)
    plan = pitr.plan_recovery(settings, pitr.Target("time", time=pitr.parse_time(moment)))
    seg = plan.physical.wal_segment_size
    start = walnames.parse_lsn(plan.physical.start_lsn)
    assert plan.coverage.last_segment is not None
    archived = walnames.segment_number(plan.coverage.last_segment, seg) - walnames.lsn_segment(start, seg) + 1
    events = Events()
    result = table_pitr.restore_tables_at(settings, world.server.dsn("app"), ["orders"], moment,
                                          into_schema="read_ahead", reporter=events)
    assert result.validation is not None and result.validation.ok
    assert rows(world.server, "read_ahead.orders") == expected
    assert result.recovery_layout is not None and result.recovery_layout["stopped_at_commit"]
    needed = pitr.stop_segments(start, walnames.parse_lsn(result.recovery_layout["stopped_at_commit"]), seg)
    assert archived > needed + pitr.SCAN_LEAD, "the archive must hold more WAL after the stop than the scan reads"
    fetched = events.field("data directory laid out", "wal_prefetched")
    assert fetched <= needed + pitr.SCAN_LEAD, (fetched, needed, archived)


def test_table_renamed_after_the_backup_falls_back_to_the_full_layout(world: World) -> None:
    result = restore_at(world, "stock_renamed", world.renamed_at, "renamed")
    assert result["ok"] is True
    assert result["recovery_layout"]["kind"] == "full"
    assert result["recovery_layout"]["fallback_because"]
    assert rows(world.server, "renamed.stock_renamed") == world.renamed_rows


def test_a_database_replaced_after_the_backup_by_a_copy_of_a_template_falls_back(world: World) -> None:
    """"other" was renamed after the backup and a new "other" made as a copy of "app" by
    CREATE DATABASE ... STRATEGY FILE_COPY, which copies the directory when replayed. The
    partial lay-out for a table of "other" lays out the backup's "other" and leaves the
    relation files of the other user databases, "app" among them, out: the new "other"
    has no catalogs in the scratch cluster. The first connection, made to "other" once
    recovery reached the time (before it, "other" is still the backup's one), fails
    (PostgreSQL PANICs on the missing catalogs), and the whole base backup is laid out
    instead."""
    result = world.cli.json("restore", "tables", "--repo", world.repo, "--tables", "late", "--target-time",
                            world.fresh_at, "--target-dsn", world.server.dsn("other"), "--into-schema", "late_back")
    assert result["ok"] is True
    assert result["recovery_layout"]["kind"] == "full"
    assert "database other cannot be read from the partial lay-out" in result["recovery_layout"]["fallback_because"][0]
    assert rows(world.server, "late_back.late", db="other") == world.fresh_rows


def test_a_database_dropped_before_the_time_is_named_without_the_whole_lay_out(world: World) -> None:
    """The tables' database is in the base backup but was dropped before the time: the first
    connection to it, once recovery reached the time, is refused as a database that does not
    exist, and the restore says so at once instead of laying out the whole base backup to
    find the same."""
    proc = world.cli("restore", "tables", "--repo", world.repo, "--tables", "kept", "--target-time", world.gone_at,
                     "--dsn", world.server.dsn("gone"), "--target-dsn", world.server.dsn("app"),
                     "--into-schema", "gone_back", "--json")
    assert proc.returncode == 1, proc.stderr
    assert f"database gone did not exist at {world.gone_at[:19]}" in proc.stderr, proc.stderr
    assert "laying out the whole base backup" not in proc.stdout + proc.stderr


def test_a_target_database_absent_at_the_time_is_named_with_how_to_name_the_source(world: World) -> None:
    """Without --dsn the tables come from the database of --target-dsn's name; a target created
    after the time is not in the recovered cluster: the restore names it as a database that did
    not exist then and says how to name the source (it said the scratch cluster could not be
    connected to, with a hint to use restore full --create), and the target is left as it was."""
    world.server.drop_db("landing")
    world.server.create_db("landing")
    try:
        proc = world.cli("restore", "tables", "--repo", world.repo, "--tables", "orders",
                         "--target-time", world.moments[0][0], "--target-dsn", world.server.dsn("landing"))
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"database landing did not exist at {world.moments[0][0][:19]}" in lines[0], lines
        assert "--dsn" in lines[0] and "--create" not in lines[0] and "cannot connect" not in lines[0], lines
        assert sql(world.server, "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace",
                   db="landing")[0] == 0
    finally:
        world.server.drop_db("landing")


def test_restore_pitr_of_one_database_drops_the_others(world: World) -> None:
    moment, expected = world.moments[2]
    pgdata, port = world.server.make_user_dir(), free_port()
    result = world.cli.json("restore", "pitr", "--repo", world.repo, "--target-time", moment, "--pgdata", pgdata,
                            "--port", str(port), "--no-archive", "--only-database", "app")
    try:
        assert result["ok"] is True
        assert result["layout"]["kind"] == "partial" and result["layout"]["dropped"] == ["gone", "other", "spare_template"]
        assert result["layout"]["bytes_fetched"] < world.base_size
        dsn = f"postgresql://postgres:{world.server.password}@127.0.0.1:{port}/app"
        with psycopg.connect(dsn) as conn:
            names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
            count, digest = conn.execute(ROWS_SQL.format("orders")).fetchone()
            settings = conn.execute("SELECT current_setting('ignore_invalid_pages'), "
                                    "current_setting('autovacuum')").fetchone()
        assert names == {"app", "postgres", "template0", "template1"}
        assert (int(count), digest) == expected
        assert settings == ("off", "on"), "the partial lay-out's recovery settings do not outlive recovery"
    finally:
        world.server.run_as_os_user([world.server.bin_dir / "pg_ctl", "-D", pgdata, "-m", "immediate", "stop"],
                                    check=False)


def test_tables_are_read_paused_at_the_time_unless_the_copy_must_write(world: World) -> None:
    """Without --into-schema the scratch cluster is read paused at the time as a hot standby
    (never promoted); the rows are exactly those the live server had at each moment, as with
    the promoted cluster --into-schema needs (the test above)."""
    world.server.create_db("paused_copy")
    for n in (1, 4):
        moment, expected = world.moments[n]
        sql(world.server, "DROP TABLE IF EXISTS orders", db="paused_copy")
        result = world.cli.json("restore", "tables", "--repo", world.repo, "--tables", "orders", "--target-time",
                                moment, "--target-dsn", world.server.dsn("paused_copy"), "--dsn",
                                world.server.dsn("app"))
        assert result["ok"] is True and result["recovery_layout"]["read_paused"] is True
        assert rows(world.server, "orders", db="paused_copy") == expected


def test_program_probes_are_made_beside_the_plan(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PostgreSQL program a table PITR runs has its version probed by the warm-up that
    runs beside the plan: afterwards finding each one starts no process."""
    with psycopg.connect(world.server.dsn("app")) as conn:
        major = conn.info.server_version // 10000
    pg_tools._versions.clear()
    table_pitr._warm_programs(frozenset({major}))

    def no_process(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")
    monkeypatch.setattr(subprocess, "run", no_process)
    assert find_bin_dir(major) == world.server.bin_dir
    assert all(find_tool(name, major) for name in table_pitr.PROGRAMS)


def test_a_user_template_database_is_held_by_the_base_backup(world: World) -> None:
    """A template database of the user's (IS_TEMPLATE, as PostGIS set-ups keep one) is in the
    base backup's files, so the backup names it among the databases it holds (what `restore
    pitr --database` and table PITR look for); the two system templates are not named."""
    base = [e["id"] for e in world.cli.json("list", "--repo", world.repo) if e["kind"] == "base"]
    shown = world.cli.json("show", base[-1], "--repo", world.repo)
    assert set(shown["databases"]) >= {"app", "other", "spare_template"}
    assert not {"template0", "template1"} & set(shown["databases"])
