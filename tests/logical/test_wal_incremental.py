"""Incrementals that learn the changed tables from the archived WAL.

One cluster archives through ``backup-tool wal push`` (as the server's OS user) into a local
repository. The WAL reader is checked record by record against ``pg_waldump`` on WAL full of
awkward records (compressed and uncompressed full-page images, TOAST, COPY, a WAL switch, a
record crossing segments); random workloads (rollbacks, subtransactions, TRUNCATE, COPY,
partition attach and detach, unlogged tables, VACUUM FULL, type rewrites) are backed up with
the WAL method and compared with the ground truth, the tables' content checksums: every
table whose content changed is stored again, every table's recorded checksum is its
content's, untouched tables are not read, and the chain restores and validates.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.archiving import Archiving, archiving_server
from support.cli import Cli

from backup_tool.config.policy import BackupSettings, Policy, Retention
from backup_tool.config.settings import Settings
from backup_tool.core import walnames
from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.errors import ConfigError
from backup_tool.logical import backup
from backup_tool.physical import wal, walscan
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import walbasis
from backup_tool.repository import walidentity
from backup_tool.repository.manifest import Manifest
from backup_tool.repository.manifest import _digest as manifest_digest
from backup_tool.repository.storage import open_storage
from backup_tool.repository.storage.encrypted import EncryptionKey

pytestmark = pytest.mark.slow

RMGRS = ["XLOG", "Transaction", "Storage", "CLOG", "Database", "Tablespace", "MultiXact", "RelMap", "Standby",
         "Heap2", "Heap", "Btree", "Hash", "Gin", "Gist", "Sequence", "SPGist", "BRIN", "CommitTs",
         "ReplicationOrigin", "Generic", "LogicalMessage"]
FORKS = {"main": 0, "fsm": 1, "vm": 2, "init": 3}
WALDUMP_LINE = re.compile(r"^rmgr: (\w+) .* lsn: ([0-9A-F]+/[0-9A-F]+), prev .*?desc: (.*)$")
BLKREF = re.compile(r"blkref #\d+: rel (\d+)/(\d+)/(\d+)(?: fork (\w+))? blk \d+")

TABLES = ["t0", "t1", "t2", "t3"]
SCHEMA = """
CREATE TABLE t0 (id int PRIMARY KEY, v text, n int);
CREATE TABLE t1 (id int PRIMARY KEY, v text, n int);
CREATE TABLE t2 (id int PRIMARY KEY, v text, n int);
CREATE TABLE t3 (id int PRIMARY KEY, v text, n int);
CREATE TABLE quiet (id int PRIMARY KEY, v text);
CREATE UNLOGGED TABLE scratch (id int, v text);
CREATE TABLE meas (k int NOT NULL, v text) PARTITION BY RANGE (k);
CREATE TABLE meas_a PARTITION OF meas FOR VALUES FROM (0) TO (100);
CREATE TABLE meas_b PARTITION OF meas FOR VALUES FROM (100) TO (200);
CREATE TABLE meas_c (k int NOT NULL, v text);
CREATE SEQUENCE ids START 1000;
INSERT INTO t0 SELECT g, md5(g::text), g FROM generate_series(1, 300) g;
INSERT INTO t1 SELECT g, repeat(md5(g::text), 80), g FROM generate_series(1, 60) g;
INSERT INTO t2 SELECT g, md5(g::text), g FROM generate_series(1, 200) g;
INSERT INTO t3 SELECT g, md5(g::text), g FROM generate_series(1, 100) g;
INSERT INTO quiet SELECT g, md5(g::text) FROM generate_series(1, 100) g;
INSERT INTO scratch SELECT g, md5(g::text) FROM generate_series(1, 50) g;
INSERT INTO meas SELECT g % 200, md5(g::text) FROM generate_series(1, 400) g;
INSERT INTO meas_c SELECT 200 + g % 50, md5(g::text) FROM generate_series(1, 80) g;
"""


@pytest.fixture(scope="module")
def archiving() -> Iterator[Archiving]:
    with archiving_server("backup-tool-walinc-") as archiving:
        yield archiving


def lsn_now(conn: psycopg.Connection[Any]) -> int:
    return walnames.parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])


def waldump(archiving: Archiving, span: walnames.WalSpan, folder: Path) -> list[tuple[int, int, set[tuple[int, tuple[int, int, int]]]]]:
    storage = open_storage(str(archiving.repo))
    folder.mkdir()
    for segno in walscan.segments_needed(span.start, span.end, span.segment_size):
        name = walnames.segment_name(span.timeline, segno, span.segment_size)
        wal.fetch(storage, name, folder / name)
    out = subprocess.run([str(archiving.server.bin_dir / "pg_waldump"), "-p", str(folder),
                          "-s", walnames.format_lsn(span.start), "-e", walnames.format_lsn(span.end)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    found = []
    for line in out.stdout.splitlines():
        match = WALDUMP_LINE.match(line)
        assert match, line
        refs = {(FORKS[fork or "main"], (int(s), int(d), int(r))) for s, d, r, fork in BLKREF.findall(match[3])}
        found.append((walnames.parse_lsn(match[2]), RMGRS.index(match[1]), refs))
    return found


def test_reader_agrees_with_pg_waldump_record_by_record(archiving: Archiving, tmp_path: Path) -> None:
    archiving.server.create_db("dumped")
    with psycopg.connect(archiving.dsn("dumped"), autocommit=True) as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, payload text)")
        conn.execute("ALTER TABLE big ALTER COLUMN payload SET STORAGE EXTERNAL")
        conn.execute("CREATE TABLE small (id int, v text)")
        start = lsn_now(conn)
        conn.execute("INSERT INTO small SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
        conn.execute("CHECKPOINT")
        conn.execute("UPDATE small SET v = v || 'x' WHERE id % 9 = 0")
        conn.execute("SET wal_compression = pglz")
        conn.execute("CHECKPOINT")
        conn.execute("UPDATE small SET v = upper(v) WHERE id % 11 = 0")
        conn.execute("RESET wal_compression")
        conn.execute("INSERT INTO big SELECT g, string_agg(md5(g::text || h::text), '') FROM generate_series(1, 20) g,"
                     " generate_series(1, 400) h GROUP BY g")
        with conn.cursor() as cur, cur.copy("COPY small FROM STDIN") as copy:
            for i in range(2000):
                copy.write_row((i, "copied" * (i % 7)))
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("SELECT pg_logical_emit_message(true, 'big', repeat('m', 17000000))")
        conn.execute("VACUUM FULL small")
        conn.execute("CREATE INDEX ON small (v)")
        conn.execute("TRUNCATE big")
        conn.execute("BEGIN; INSERT INTO small VALUES (-1, 'gone'); SAVEPOINT s; DELETE FROM small; "
                     "ROLLBACK TO s; COMMIT")
        end = lsn_now(conn)
        sysid = int(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
    archiving.switch_and_wait()
    span = walnames.WalSpan(1, start, end, walnames.DEFAULT_SEGMENT_SIZE, sysid)
    storage = open_storage(str(archiving.repo))
    ours = [(r.lsn, r.rmid, set(r.blocks)) for r in walscan.records(walscan.archive_source(storage, span),
                                                                      start, end)]
    theirs = waldump(archiving, span, tmp_path / "wal")
    assert len(ours) == len(theirs) > 5000
    assert ours == theirs
    kinds = {(rmid, bool(refs)) for _lsn, rmid, refs in ours}
    assert {(0, True), (9, True), (10, True), (21, False), (2, False)} <= kinds

    segments = {n: walscan.archive_source(storage, span)(n) for n in walscan.segments_needed(start, end, span.segment_size)}
    first = min(segments)
    damaged = bytearray(segments[first])
    page = (start % span.segment_size) // walscan.BLCKSZ * walscan.BLCKSZ + 2 * walscan.BLCKSZ
    damaged[page + 8] ^= 0x01
    with pytest.raises(walscan.WalScanUncertain, match="address"):
        walscan.scan(lambda n: bytes(damaged) if n == first else segments[n], start, end)
    with pytest.raises(walscan.WalScanUncertain, match="not at"):
        walscan.scan(lambda n: segments[n], start, end - 8)
    with pytest.raises(walscan.WalScanUncertain):
        walscan.scan(lambda n: segments[n], start + 8, end)


def test_the_reader_fetches_through_an_encrypted_s3_repository(archiving: Archiving, s3_repo: str,
                                                                tmp_path: Path) -> None:
    """The same span read from the local archive and from an encrypted S3 copy of it gives
    the same answer; without the key the S3 copy cannot be read at all."""
    archiving.server.create_db("enc")
    with psycopg.connect(archiving.dsn("enc"), autocommit=True) as conn:
        start = lsn_now(conn)
        conn.execute("CREATE TABLE secret (id int, v text); INSERT INTO secret SELECT g, md5(g::text) "
                     "FROM generate_series(1, 5000) g")
        end = lsn_now(conn)
        table = (1663, int(conn.execute("SELECT oid FROM pg_database WHERE datname = 'enc'").fetchone()[0]),
                 int(conn.execute("SELECT pg_relation_filenode('secret')").fetchone()[0]))
        sysid = int(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
    archiving.switch_and_wait()
    span = walnames.WalSpan(1, start, end, walnames.DEFAULT_SEGMENT_SIZE, sysid)
    local = open_storage(str(archiving.repo))
    remote = open_storage(s3_repo, key=EncryptionKey(bytes(range(32))))
    identity = walidentity.ClusterIdentity(sysid, 15)
    walidentity.claim_archive(remote, identity, "test")
    for segno in walscan.segments_needed(start, end, span.segment_size):
        name = walnames.segment_name(1, segno)
        wal.fetch(local, name, tmp_path / name)
        wal.push_file(remote, tmp_path / name, archive=identity)
    from_s3 = walscan.relations_written(remote, span, 0)
    assert from_s3 == walscan.relations_written(local, span, 0)
    assert table in from_s3.touched
    with pytest.raises(ConfigError, match="no encryption key"):
        walscan.relations_written(open_storage(s3_repo), span, 0)


def settings_for(archiving: Archiving, db: str, detection: str = "wal") -> Settings:
    return Settings(str(archiving.repo), archiving.dsn(db), Policy(retention=Retention(max_chain_length=100),
                                                                   backup=BackupSettings(change_detection=detection)))


def truth(dsn: str, method: ChecksumMethod = ChecksumMethod.TYPED_COLUMN
          ) -> dict[str, tuple[str, str | None, tuple[str, ...], int, str]]:
    """Every table's kind, parent, columns, row count and content checksum (by the method a
    PostgreSQL 15 backup uses), read now."""
    info = postgres.ConnInfo(dsn)
    with info.connect() as conn:
        found = {}
        for t in postgres.list_tables(conn):
            rows, digest = postgres.table_checksum(conn, t.schema, t.name, t.columns, method) if t.has_data else (0, "0" * 16)
            found[f"{t.schema}.{t.name}"] = (t.relkind, t.parent, t.columns, rows, digest)
    return found


def content_changed(parent: Manifest, now: dict[str, tuple[str, str | None, tuple[str, ...], int, str]]) -> set[str]:
    changed = set()
    for name, (relkind, parent_name, columns, rows, digest) in now.items():
        if relkind != "r":
            continue
        entry = next((e for e in parent.tables if e.full_name == name), None)
        if entry is None or (entry.relkind, entry.parent, entry.columns, entry.rows, entry.checksum) != (
                relkind, parent_name, columns, rows, digest):
            changed.add(name)
    return changed


def stored(m: Manifest) -> set[str]:
    return {t.full_name for t in m.tables if t.object and t.object.key.startswith(f"backups/{m.id}/")}


OPS = st.one_of(
    st.tuples(st.sampled_from(["insert", "update", "same", "delete", "rollback", "truncate", "truncate-rollback",
                               "copy", "vacuum-full", "toast", "retype"]), st.sampled_from(TABLES)),
    st.tuples(st.just("subxact"), st.sampled_from(TABLES), st.sampled_from(TABLES)),
    st.tuples(st.sampled_from(["unlogged", "partition", "attach-detach", "create-table", "drop-table",
                               "nothing"])),
)


def apply(conn: psycopg.Connection[Any], op: tuple[str, ...]) -> set[str]:
    """Run one workload step; return the tables it wrote to at all (rolled back or not)."""
    kind, *tables = op
    t = tables[0] if tables else ""
    if kind == "insert":
        conn.execute(f"INSERT INTO {t} SELECT nextval('ids'), md5(random()::text), 1 FROM generate_series(1, 20)")
    elif kind == "update":
        conn.execute(f"UPDATE {t} SET n = n + 1 WHERE id % 3 = 0")
    elif kind == "same":
        conn.execute(f"UPDATE {t} SET n = n WHERE id % 5 = 0")
    elif kind == "delete":
        conn.execute(f"DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY id LIMIT 5)")
    elif kind == "rollback":
        with conn.transaction(force_rollback=True):
            conn.execute(f"INSERT INTO {t} SELECT nextval('ids'), 'rolled back', 0 FROM generate_series(1, 10)")
            conn.execute(f"UPDATE {t} SET v = 'x' WHERE id % 2 = 0")
    elif kind == "truncate":
        conn.execute(f"TRUNCATE {t}")
    elif kind == "truncate-rollback":
        with conn.transaction(force_rollback=True):
            conn.execute(f"TRUNCATE {t}")
    elif kind == "copy":
        ids = [r[0] for r in conn.execute("SELECT nextval('ids') FROM generate_series(1, 30)")]
        with conn.cursor() as cur, cur.copy(f"COPY {t} (id, v, n) FROM STDIN") as copy:
            for i in ids:
                copy.write_row((i, f"copied\t{i}\n\\", i))
    elif kind == "vacuum-full":
        conn.execute(f"VACUUM FULL {t}")
    elif kind == "toast":
        conn.execute(f"UPDATE {t} SET v = (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 300))"
                     f" WHERE id = (SELECT min(id) FROM {t})")
    elif kind == "retype":
        wide = conn.execute(f"SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '{t}'::regclass"
                            " AND attname = 'n'").fetchone()[0] == "bigint"
        conn.execute(f"ALTER TABLE {t} ALTER COLUMN n TYPE {'int' if wide else 'bigint'}")
    elif kind == "subxact":
        u = tables[1]
        with conn.transaction():
            conn.execute(f"INSERT INTO {t} SELECT nextval('ids'), 'kept', 2")
            with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
                conn.execute(f"UPDATE {u} SET n = n - 1 WHERE id % 4 = 0")
                conn.execute("SELECT 1 / 0")
        tables = [t, u]
    elif kind == "unlogged":
        conn.execute("INSERT INTO scratch SELECT nextval('ids'), 'scratch'")
        tables = ["scratch"]
    elif kind == "partition":
        conn.execute("INSERT INTO meas SELECT g % 200, 'later' FROM generate_series(1, 7) g")
        tables = ["meas_a", "meas_b"]
    elif kind == "create-table":
        conn.execute("CREATE TABLE IF NOT EXISTS made (id int PRIMARY KEY, v text, n int);"
                     "INSERT INTO made SELECT nextval('ids'), 'made', 3 FROM generate_series(1, 4)")
        tables = ["made"]
    elif kind == "drop-table":
        conn.execute("DROP TABLE IF EXISTS made")
    elif kind == "attach-detach":
        attached = conn.execute("SELECT relispartition FROM pg_class WHERE oid = 'meas_c'::regclass").fetchone()[0]
        conn.execute("ALTER TABLE meas DETACH PARTITION meas_c" if attached
                     else "ALTER TABLE meas ATTACH PARTITION meas_c FOR VALUES FROM (200) TO (300)")
        tables = ["meas_c"]
    return {f"public.{name}" for name in tables}


@pytest.fixture(scope="module")
def chain(archiving: Archiving) -> dict[str, Any]:
    archiving.server.create_db("work")
    with psycopg.connect(archiving.dsn("work"), autocommit=True) as conn:
        conn.execute(SCHEMA)
    full = backup.backup_full(settings_for(archiving, "work"))
    assert full.wal_basis is not None
    return {"last": full, "first": full}


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(OPS, min_size=1, max_size=5))
def test_wal_method_stores_every_changed_table_and_only_those_written(
        archiving: Archiving, chain: dict[str, Any], ops: list[tuple[str, ...]]) -> None:
    parent: Manifest = chain["last"]
    written: set[str] = set()
    with psycopg.connect(archiving.dsn("work"), autocommit=True) as conn:
        for op in ops:
            written |= apply(conn, op)
    now = truth(archiving.dsn("work"))
    incr = backup.backup_incremental(settings_for(archiving, "work"), changes=walscan.changed_relations)
    chain["last"] = incr
    assert incr.kind == "incremental" and incr.parent_id == parent.id
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert content_changed(parent, now) <= stored(incr)
    assert {t.full_name: (t.rows, t.checksum) for t in incr.tables if t.relkind == "r"} == {
        name: (v[3], v[4]) for name, v in now.items() if v[0] == "r"}
    assert stored(incr) <= written | {"public.scratch"} | content_changed(parent, now), ops
    assert "public.quiet" not in stored(incr)


def test_the_chain_restores_and_validates(archiving: Archiving, chain: dict[str, Any], tmp_path: Path) -> None:
    with psycopg.connect(archiving.dsn("work"), autocommit=True) as conn:
        conn.execute("INSERT INTO t2 VALUES (nextval('ids'), 'last', 0)")
    cli = Cli(workdir=tmp_path)
    proc = cli("backup", "incremental", "--repo", str(archiving.repo), "--dsn", archiving.dsn("work"),
               "--policy", str(write_policy(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "tables stored (changes read from the WAL archive)" in proc.stdout
    out = cli.json("list", "--repo", str(archiving.repo))[-1]
    assert out["id"] in proc.stdout and out["changed_tables_method"] == "wal"
    show = cli.json("show", "--repo", str(archiving.repo), out["id"])
    assert {t["table"] for t in show["tables"] if t["object"] and t["object"].startswith(f"backups/{out['id']}/")} \
        >= {"public.t2"}
    archiving.server.create_db("restored")
    result = cli.json("restore", "full", "--repo", str(archiving.repo), "--backup", out["id"],
                      "--target-dsn", archiving.dsn("restored"))
    assert result["ok"] is True
    assert truth(archiving.dsn("restored")) == truth(archiving.dsn("work"))


def write_policy(folder: Path) -> Path:
    path = folder / "long-chains.toml"
    path.write_text('[retention]\nmax_chain_length = 100\n[backup]\nchange_detection = "wal"\n')
    return path


def test_a_transaction_open_at_the_parent_snapshot_is_followed_back_to_its_start(archiving: Archiving) -> None:
    """Rows written before the parent's snapshot by a transaction that commits after it are
    in WAL before the parent's position: the reader goes back past the running-transactions
    record of the checkpoint (which lists the transaction as running) to one older than it."""
    archiving.server.create_db("open_tx")
    with psycopg.connect(archiving.dsn("open_tx"), autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int, v text); CREATE TABLE b (id int, v text);"
                     "INSERT INTO a VALUES (1, 'one'); INSERT INTO b VALUES (1, 'one')")
    backup.backup_full(settings_for(archiving, "open_tx"))
    with psycopg.connect(archiving.dsn("open_tx")) as open_tx:
        open_tx.execute("INSERT INTO a VALUES (2, 'written before the parent, committed after')")
        with archiving.server.admin_conn() as admin:
            admin.execute("CHECKPOINT")
        parent = backup.backup_incremental(settings_for(archiving, "open_tx"), changes=walscan.changed_relations)
        assert parent.options["changed_tables_method"] == "wal", parent.options
        assert parent.wal_basis is not None and parent.wal_basis.running_xids
        open_tx.commit()
    incr = backup.backup_incremental(settings_for(archiving, "open_tx"), changes=walscan.changed_relations)
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert stored(incr) == {"public.a"}
    assert truth(archiving.dsn("open_tx"))["public.a"][3] == 2


def test_without_a_recorded_position_or_archive_the_checksums_decide(archiving: Archiving) -> None:
    archiving.server.create_db("nobasis")
    with psycopg.connect(archiving.dsn("nobasis"), autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int); INSERT INTO a VALUES (1)")
    settings_ = settings_for(archiving, "nobasis")
    backup.backup_full(settings_)
    without_reader = backup.backup_incremental(settings_)
    assert without_reader.options["changed_tables_method"] == "checksum"
    by_policy = backup.backup_incremental(settings_for(archiving, "nobasis", "checksum"),
                                          changes=walscan.changed_relations)
    assert by_policy.options["changed_tables_note"] == "the policy says backup.change_detection = checksum"
    tiny = backup.backup_incremental(settings_for(archiving, "nobasis", "auto"), changes=walscan.changed_relations)
    assert "is cheaper than reading the WAL" in tiny.options["changed_tables_note"]
    other_repo = archiving.base / "no-archive"
    moved = backup.backup_full(replace(settings_, repo_url=str(other_repo)))
    with psycopg.connect(archiving.dsn("nobasis"), autocommit=True) as conn:
        conn.execute("INSERT INTO a VALUES (2)")
    incr = backup.backup_incremental(replace(settings_, repo_url=str(other_repo)), changes=walscan.changed_relations)
    assert incr.parent_id == moved.id
    assert incr.options["changed_tables_method"] == "checksum"
    assert "no WAL archive of this cluster" in incr.options["changed_tables_note"]
    assert stored(incr) == {"public.a"}


def test_a_column_naming_catalog_objects_is_compared_by_checksum(archiving: Archiving) -> None:
    """A regclass, regtype, regrole or regproc value is stored as an OID and printed as a name:
    renaming what it names changes the table's content (its COPY text, which a restore loads)
    without writing the table. Such tables (also through an array, a domain or a composite
    type) are compared by checksum, as unlogged ones are; the others still by the WAL."""
    db = "names_" + archiving.base.name[-6:].lower().replace("-", "_")
    archiving.server.create_db(db)
    with psycopg.connect(archiving.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int); CREATE TYPE pair AS (a int);"
                     "CREATE FUNCTION f_old() RETURNS int LANGUAGE sql AS 'SELECT 1';"
                     "CREATE DOMAIN rels AS regclass[];"
                     "CREATE TYPE audited AS (rel regclass, at date);"
                     "CREATE TABLE watched (id int, rel regclass, typ regtype, fn regproc);"
                     "CREATE TABLE via_domain (id int, rs rels);"
                     "CREATE TABLE via_composite (id int, a audited);"
                     "CREATE TABLE plain (id int);"
                     "INSERT INTO watched VALUES (1, 'orders', 'pair', 'f_old');"
                     "INSERT INTO via_domain VALUES (1, ARRAY['orders'::regclass]);"
                     "INSERT INTO via_composite VALUES (1, ROW('orders', '2024-01-01'));"
                     "INSERT INTO plain VALUES (1)")
    backup.backup_full(settings_for(archiving, db))
    with psycopg.connect(archiving.dsn(db), autocommit=True) as conn:
        conn.execute("ALTER TABLE orders RENAME TO orders_2024; ALTER TYPE pair RENAME TO pair2;"
                     "ALTER FUNCTION f_old() RENAME TO f_new")
    incr = backup.backup_incremental(settings_for(archiving, db), changes=walscan.changed_relations)
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert stored(incr) == {"public.watched", "public.via_domain", "public.via_composite", "public.orders_2024"}
    now = truth(archiving.dsn(db))
    assert {t.full_name: t.checksum for t in incr.tables} == {name: v[4] for name, v in now.items()}


def server_wal(conn: psycopg.Connection[Any], end: int) -> walbasis.ServerWal:
    return walbasis.ServerWal(conn, walnames.format_lsn(end), walnames.DEFAULT_SEGMENT_SIZE, 5.0)


def test_segments_not_archived_yet_are_read_from_the_servers_pg_wal(archiving: Archiving) -> None:
    """Reading a span's tail from the server's pg_wal gives what reading it from the archive
    gives once archived; a file that is not the segment asked for, or is not there, makes
    the scan uncertain instead of answering."""
    archiving.server.create_db("tail")
    with psycopg.connect(archiving.dsn("tail"), autocommit=True) as conn:
        start = lsn_now(conn)
        conn.execute("CREATE TABLE w (id int, v text); INSERT INTO w SELECT g, md5(g::text) FROM generate_series(1, 3000) g;"
                     "UPDATE w SET v = v || 'x' WHERE id % 7 = 0")
        end = lsn_now(conn)
        sysid = int(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
        assert walbasis.can_read_wal_files(conn) and walbasis.request_wal_flush(conn)
        assert walbasis.wal_flushed_through(conn, walnames.format_lsn(end), 5.0)
        assert not walbasis.wal_flushed_through(conn, walnames.format_lsn(end + 2**40), 0.02)
        span = walnames.WalSpan(1, start, end, walnames.DEFAULT_SEGMENT_SIZE, sysid)
        storage = open_storage(str(archiving.repo))
        live = walscan.relations_written(storage, span, 0, live=server_wal(conn, end))
        assert live.from_server >= 1
        with pytest.raises(walscan.WalScanUncertain, match="neither in the WAL archive nor"):
            walscan.relations_written(storage, span, 0, live=lambda name, ranges: None)

        def recycled(name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
            """The file as it reads once recycled: its page headers carry an older address."""
            pieces = []
            for piece in server_wal(conn, end)(name, ranges) or []:
                data = bytearray(piece)
                for page in range(0, len(data), walscan.BLCKSZ):
                    addr = int.from_bytes(data[page + 8:page + 16], "little")
                    data[page + 8:page + 16] = (addr ^ 1 << 40).to_bytes(8, "little")
                pieces.append(bytes(data))
            return pieces
        with pytest.raises(walscan.WalScanUncertain, match="address"):
            walscan.relations_written(storage, span, 0, live=recycled)
        with pytest.raises(walbasis.WalNotFlushed):
            walbasis.ServerWal(conn, walnames.format_lsn(end + 2**40), span.segment_size, 0.02)("x", [(0, 1)])
    archiving.switch_and_wait()
    archived = walscan.relations_written(storage, span, 0)
    assert archived.from_server == 0
    assert (live.touched, live.records, live.segments) == (archived.touched, archived.records, archived.segments)
    assert live.touched


def test_archived_segments_still_in_pg_wal_are_read_there(archiving: Archiving) -> None:
    """Segments the archive holds are read from pg_wal while they are still there (a local
    read instead of a download), with the same answer; the segment holding the span's start
    only from the span's start on. The server may recycle such a segment at any checkpoint:
    once it has, the file is not read there (not even under its old name), and the archive's
    copy is read instead."""
    archiving.server.create_db("local")
    with psycopg.connect(archiving.dsn("local"), autocommit=True) as conn:
        conn.execute("CREATE TABLE w (id int, v text); INSERT INTO w SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("INSERT INTO w SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 2000) g")
        start = lsn_now(conn)
        conn.execute("UPDATE w SET v = v || 'x' WHERE id % 7 = 0")
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("UPDATE w SET v = v || 'y' WHERE id % 5 = 0")
        end = lsn_now(conn)
        sysid = int(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
    archiving.switch_and_wait()
    span = walnames.WalSpan(1, start, end, walnames.DEFAULT_SEGMENT_SIZE, sysid)
    storage = open_storage(str(archiving.repo))
    names = [walnames.segment_name(1, n) for n in walscan.segments_needed(start, end, span.segment_size)]
    assert len(names) == 2 and all(wal.find_archived(storage, name) for name in names)
    archived = walscan.relations_written(storage, span, 0)
    with archiving.server.admin_conn() as conn:
        asked: list[tuple[str, list[tuple[int, int]]]] = []

        def server(name: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
            asked.append((name, ranges))
            return server_wal(conn, end)(name, ranges)
        local = walscan.relations_written(storage, span, 0, live=server)
        assert (local.touched, local.records, local.segments) == (archived.touched, archived.records, archived.segments)
        assert local.from_server == 2 and local.touched
        page = start % span.segment_size // walscan.BLCKSZ * walscan.BLCKSZ
        last = -(-(end % span.segment_size) // walscan.BLCKSZ) * walscan.BLCKSZ
        assert page > 0 and sorted(asked) == [(names[0], [(0, walscan.BLCKSZ), (page, span.segment_size)]),
                                              (names[1], [(0, last)])]
        assert server_wal(conn, end)(names[0], [(0, 8192)]) is not None, "archived, still there: read there"
        conn.execute("CHECKPOINT")
        assert walbasis.read_wal_file(conn, names[0], 8192) is None, "recycled or removed by the checkpoint"
        assert server_wal(conn, end)(names[0], [(0, 8192)]) is None
        asked.clear()
        again = walscan.relations_written(storage, span, 0, live=server)
        assert (again.touched, again.records, again.segments, again.from_server) == (
            archived.touched, archived.records, archived.segments, 0)
        assert {name for name, _ in asked} == set(names)


def test_a_segment_in_pg_wal_that_gives_no_answer_is_read_from_the_archive(archiving: Archiving) -> None:
    """A file in pg_wal that is not the segment it is named after (pages of another address,
    as a recycled file reads), or whose records fail their CRC check, never costs the WAL
    method its answer when the archive holds the segment: the archive's copy is read, and
    the answer and its damage verdict are the archive's."""
    archiving.server.create_db("fallback")
    with psycopg.connect(archiving.dsn("fallback"), autocommit=True) as conn:
        conn.execute("CREATE TABLE w (id int, v text); INSERT INTO w SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
        start = lsn_now(conn)
        conn.execute("UPDATE w SET v = v || 'x' WHERE id % 7 = 0")
        end = lsn_now(conn)
        sysid = int(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
    archiving.switch_and_wait()
    span = walnames.WalSpan(1, start, end, walnames.DEFAULT_SEGMENT_SIZE, sysid)
    storage = open_storage(str(archiving.repo))
    archived = walscan.relations_written(storage, span, 0)
    assert archived.touched
    with archiving.server.admin_conn() as conn:
        asked: list[str] = []

        def spoiled(offset: int, flip: int) -> Callable[[str, list[tuple[int, int]]], list[bytes] | None]:
            def read(name: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
                asked.append(name)
                pieces = []
                for (first, stop), piece in zip(ranges, server_wal(conn, end)(name, ranges) or [], strict=True):
                    data = bytearray(piece)
                    if first <= offset < stop and name == walnames.segment_name(1, start // span.segment_size):
                        data[offset - first] ^= flip
                    pieces.append(bytes(data))
                return pieces
            return read
        in_segment = start % span.segment_size
        page = in_segment - in_segment % walscan.BLCKSZ
        for offset, kept in ((page + 8, archived.segments - 1), (in_segment + walscan.XL_CRC_OFFSET, 0)):
            asked.clear()
            found = walscan.relations_written(storage, span, 0, live=spoiled(offset, 0x01))
            assert asked, "pg_wal was read first"
            assert (found.touched, found.records, found.segments, found.from_server) == (
                archived.touched, archived.records, archived.segments, kept)


def test_pg_wal_never_answers_for_a_repository_without_this_clusters_archive(archiving: Archiving,
                                                                             tmp_path: Path) -> None:
    """The span is read only when the repository's WAL archive is this cluster's, even when
    the server's pg_wal holds every segment of it: here the archive's identity is read (and
    found missing) only once the first segment has come from pg_wal, and the scan still
    gives no answer, the first time or when the span is read again from the archive."""
    from backup_tool.repository.storage.local import LocalStorage

    archiving.server.create_db("noarchive")
    with psycopg.connect(archiving.dsn("noarchive"), autocommit=True) as conn:
        start = lsn_now(conn)
        conn.execute("CREATE TABLE w (id int, v text); INSERT INTO w SELECT g, md5(g::text) FROM generate_series(1, 500) g")
        end = lsn_now(conn)
        sysid = int(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
        assert walbasis.force_wal_flush(conn) or walbasis.request_wal_flush(conn)
        served = threading.Event()

        class IdentityReadLate(LocalStorage):
            def get(self, key: str) -> Iterator[bytes]:
                if key == walidentity.ARCHIVE_INFO_KEY:
                    assert served.wait(30)
                return super().get(key)

        def server(name: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
            pieces = server_wal(conn, end)(name, ranges)
            served.set()
            return pieces
        (tmp_path / "empty").mkdir()
        storage = open_storage(str(tmp_path / "empty"), backend=IdentityReadLate(tmp_path / "empty"))
        span = walnames.WalSpan(1, start, end, walnames.DEFAULT_SEGMENT_SIZE, sysid)
        assert walscan.relations_written(open_storage(str(archiving.repo)), span, 0, live=server).touched
        served.clear()
        with pytest.raises(walscan.WalScanUncertain, match="no WAL archive of this cluster"):
            walscan.relations_written(storage, span, 0, live=server)
        assert served.is_set()


def test_a_role_that_may_emit_messages_has_the_wal_flushed_at_once(archiving: Archiving) -> None:
    """force_wal_flush returns only once the server has flushed every record inserted before
    it (no waiting for the WAL writer: one look at the flush position suffices), and the
    message it writes is read by the WAL reader as touching no table; a role that may not
    emit messages (EXECUTE revoked) is told so, and the WAL writer is left to flush."""
    archiving.server.create_db("flushnow")
    with psycopg.connect(archiving.dsn("flushnow"), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("CREATE TABLE f (id int)")
        start = lsn_now(conn)
        for i in range(20):
            conn.execute("INSERT INTO f VALUES (%s)", (i,))
            end = lsn_now(conn)
            assert walbasis.force_wal_flush(conn)
            assert walbasis.wal_flushed_through(conn, walnames.format_lsn(end), 0.0)
        past = lsn_now(conn)
        sysid = int(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
        span = walnames.WalSpan(1, end, past, walnames.DEFAULT_SEGMENT_SIZE, sysid)
        found = walscan.relations_written(open_storage(str(archiving.repo)), span, 0,
                                          live=server_wal(conn, past))
        assert found.records >= 1 and found.touched == frozenset()
        assert walscan.relations_written(open_storage(str(archiving.repo)), replace(span, start=start), 0,
                                         live=server_wal(conn, past)).touched
    emit = "pg_logical_emit_message(boolean, text, text)"
    with archiving.server.admin_conn("flushnow") as admin:
        admin.execute("CREATE ROLE flush_reader LOGIN PASSWORD 'flush-pw'")
        admin.execute("GRANT EXECUTE ON FUNCTION pg_read_binary_file(text, bigint, bigint, boolean) TO flush_reader")
        admin.execute(f"REVOKE EXECUTE ON FUNCTION {emit} FROM PUBLIC")
    dsn = archiving.dsn("flushnow").replace(f"{archiving.server.user}:{archiving.server.password}@",
                                            "flush_reader:flush-pw@")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert walbasis.can_read_wal_files(conn)
            assert not walbasis.force_wal_flush(conn)
            assert walbasis.request_wal_flush(conn)
    finally:
        with archiving.server.admin_conn("flushnow") as admin:
            admin.execute(f"GRANT EXECUTE ON FUNCTION {emit} TO PUBLIC")


def _two_tables_backed_up(archiving: Archiving, db: str, rows: int) -> None:
    """Database ``db`` with tables a and b of ``rows`` rows each, and its full backup."""
    archiving.server.create_db(db)
    with psycopg.connect(archiving.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int, v text); CREATE TABLE b (id int, v text);"
                     f"INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, {rows}) g;"
                     f"INSERT INTO b SELECT g, md5(g::text) FROM generate_series(1, {rows}) g")
    backup.backup_full(settings_for(archiving, db))


def _data_objects(archiving: Archiving) -> set[str]:
    return {str(p.relative_to(archiving.repo)) for p in archiving.repo.glob("backups/*/data/*")}


def test_a_table_the_wal_shows_written_is_dumped_while_the_scan_reads_on(archiving: Archiving) -> None:
    """The data phase starts a touched table's COPY as soon as the scan names it: here the
    scan, once it has named table b, goes on only when b's new object is stored. The
    incremental is exactly what reading the whole span first gives."""
    _two_tables_backed_up(archiving, "early", 2000)
    with psycopg.connect(archiving.dsn("early"), autocommit=True) as conn:
        conn.execute("UPDATE b SET v = upper(v) WHERE id % 5 = 0")
        b_node = conn.execute("SELECT pg_relation_filenode('b')").fetchone()[0]
    now = truth(archiving.dsn("early"))
    before = _data_objects(archiving)
    stored_while_scanning: list[bool] = []

    def source(storage: Any, span: walnames.WalSpan, wait: float, live: Any = None, seen: Any = None) -> Any:
        def told(rel: walscan.RelFile) -> None:
            seen(rel)
            if rel[2] != b_node:
                return
            deadline = time.monotonic() + 30
            while not _data_objects(archiving) - before and time.monotonic() < deadline:
                time.sleep(0.01)
            stored_while_scanning.append(bool(_data_objects(archiving) - before))
        return walscan.changed_relations(storage, span, wait, live=live, seen=told if seen else None)

    incr = backup.backup_incremental(settings_for(archiving, "early"), changes=source)
    assert stored_while_scanning and all(stored_while_scanning)
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert stored(incr) == {"public.b"}
    assert {t.full_name: (t.rows, t.checksum) for t in incr.tables} == {n: (v[3], v[4]) for n, v in now.items()}
    assert _data_objects(archiving) - before == {o.key for o in incr.objects() if "/data/" in o.key
                                                 and o.key.startswith(f"backups/{incr.id}/")}


def test_a_table_dumped_early_then_found_unchanged_is_reused_and_its_object_deleted(archiving: Archiving) -> None:
    """Should the scan fail after naming a table that the checksums then show unchanged, the
    table's early object is deleted and the parent's reused: the incremental is what the
    checksum method alone gives. (Table b, counted written since the full, may be dumped
    early too: it is changed, so its early object is the one stored.)"""
    archiving.server.create_db("early2")
    with psycopg.connect(archiving.dsn("early2"), autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int, v text); CREATE TABLE b (id int, v text);"
                     "INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 2000) g;"
                     "INSERT INTO b SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
        a_file = conn.execute("SELECT reltablespace, (SELECT oid FROM pg_database WHERE datname = current_database()),"
                              " pg_relation_filenode('a') FROM pg_class WHERE relname = 'a'").fetchone()
        a_oid = conn.execute("SELECT 'a'::regclass::oid").fetchone()[0]
        a_object = f"/data/{a_oid}.copy.zst"
    full = backup.backup_full(settings_for(archiving, "early2"))
    with psycopg.connect(archiving.dsn("early2"), autocommit=True) as conn:
        conn.execute("UPDATE b SET v = upper(v) WHERE id % 5 = 0")
    now = truth(archiving.dsn("early2"))
    before = _data_objects(archiving)
    early_objects: list[set[str]] = []

    def source(storage: Any, span: walnames.WalSpan, wait: float, live: Any = None, seen: Any = None) -> Any:
        assert seen is not None
        seen((a_file[0] or 1663, a_file[1], a_file[2]))
        deadline = time.monotonic() + 30
        while not {k for k in _data_objects(archiving) - before if k.endswith(a_object)} \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        early_objects.append({k for k in _data_objects(archiving) - before if k.endswith(a_object)})
        raise walscan.WalScanUncertain("the scan stopped short (test)")

    incr = backup.backup_incremental(settings_for(archiving, "early2"), changes=source)
    assert early_objects and early_objects[0], "table a was dumped while the scan ran"
    assert incr.options["changed_tables_method"] == "checksum"
    assert stored(incr) == {"public.b"}
    a_entry = incr.table("public", "a")
    assert a_entry is not None and a_entry.object == full.table("public", "a").object
    assert {t.full_name: (t.rows, t.checksum) for t in incr.tables} == {n: (v[3], v[4]) for n, v in now.items()}
    assert not early_objects[0] & _data_objects(archiving), "the early object of a is deleted"


def set_archive_command(archiving: Archiving, command: str | None) -> None:
    with archiving.server.admin_conn() as conn:
        if command is None:
            conn.execute("ALTER SYSTEM RESET archive_command")
        else:
            conn.execute(f"ALTER SYSTEM SET archive_command = '{command}'")
        conn.execute("SELECT pg_reload_conf()")


def test_a_stalled_archiver_costs_no_wait_when_the_server_wal_is_readable(archiving: Archiving) -> None:
    """With the archiver failing, the incremental still learns its changes from the WAL (its
    tail read from pg_wal), stores exactly the changed table, and says where it read."""
    _two_tables_backed_up(archiving, "stalled", 500)
    set_archive_command(archiving, "false")
    try:
        with psycopg.connect(archiving.dsn("stalled"), autocommit=True) as conn:
            conn.execute("UPDATE b SET v = 'changed' WHERE id % 9 = 0")
        now = truth(archiving.dsn("stalled"))
        incr = backup.backup_incremental(settings_for(archiving, "stalled"), changes=walscan.changed_relations)
        with archiving.server.admin_conn() as conn:
            finished = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
            end = walnames.parse_lsn(conn.execute("SELECT pg_switch_wal()::text").fetchone()[0])
            assert server_wal(conn, end)(finished, [(0, 8192)]) is not None, "waiting to be archived, so it stays"
    finally:
        set_archive_command(archiving, None)
    with psycopg.connect(archiving.dsn("stalled"), autocommit=True) as conn:
        conn.execute("INSERT INTO a VALUES (0, 'a record after the switch, so the next switch has one to finish')")
    archiving.switch_and_wait()
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert re.search(r", [1-9]\d* from the server's pg_wal", incr.options["changed_tables_note"]), incr.options
    assert stored(incr) == {"public.b"}
    assert {t.full_name: (t.rows, t.checksum) for t in incr.tables} == {n: (v[3], v[4]) for n, v in now.items()}


def test_a_role_that_may_not_read_pg_wal_waits_for_the_archive(archiving: Archiving) -> None:
    """Without the right to read the server's files, the server switches segments and the
    archive is waited for, as before; the note says every segment came from the archive."""
    archiving.server.create_db("plain")
    with archiving.server.admin_conn() as admin:
        admin.execute("DROP ROLE IF EXISTS plain_owner")
        admin.execute("CREATE ROLE plain_owner LOGIN PASSWORD 'plain-pw'")
        admin.execute("ALTER DATABASE plain OWNER TO plain_owner")
    with archiving.server.admin_conn("plain") as admin:
        admin.execute("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO plain_owner")
    dsn = archiving.dsn("plain").replace(f"{archiving.server.user}:{archiving.server.password}@",
                                         "plain_owner:plain-pw@")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert not walbasis.can_read_wal_files(conn)
        conn.execute("CREATE TABLE a (id int, v text); CREATE TABLE b (id int, v text);"
                     "INSERT INTO a VALUES (1, 'one'); INSERT INTO b VALUES (1, 'one')")
        settings_ = replace(settings_for(archiving, "plain"), dsn=dsn)
        backup.backup_full(settings_)
        conn.execute("INSERT INTO a VALUES (2, 'two')")
    incr = backup.backup_incremental(settings_, changes=walscan.changed_relations)
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert incr.options["changed_tables_note"].endswith(", 0 from the server's pg_wal")
    assert stored(incr) == {"public.a"}


class TestPureDecisions:
    def basis(self, **changes: Any) -> Any:
        from backup_tool.repository.manifest import RelationFile, WalBasis
        rels = (RelationFile('public.a', 10, 1663, 100, 101, True, "c1"),
                RelationFile('public.b', 11, 1663, 110, 0, True, "c1"),
                RelationFile('public.u', 12, 1663, 120, 0, False, "c1"))
        base = WalBasis(1, "0/1000028", "0/1000100", 700, (), 5, 16 << 20, "42", "d", rels)
        return replace(base, **changes)

    def test_span_needs_the_same_timeline_database_and_types(self) -> None:
        parent = self.basis()
        span = backup.wal_span(parent, self.basis(start_lsn="0/2000028", end_lsn="0/2000100"))
        assert isinstance(span, walnames.WalSpan) and (span.start, span.end) == (0x1000028, 0x2000100)
        assert "timeline" in str(backup.wal_span(parent, self.basis(timeline=2)))
        assert "re-created" in str(backup.wal_span(parent, self.basis(database_oid=6)))
        assert "type" in str(backup.wal_span(parent, self.basis(types_digest="e")))
        assert "recorded no WAL" in str(backup.wal_span(None, parent))
        assert "went back" in str(backup.wal_span(self.basis(start_lsn="0/3000000", end_lsn="0/3000100"), parent))

    def test_auto_reads_the_wal_only_when_cheaper_than_the_tables(self) -> None:
        span = walnames.WalSpan(1, 0, 40_000_000, 16 << 20, 42)
        wal_cost = backup.ARCHIVE_DELAY_SECONDS + 1.0
        cheap_tables = int(wal_cost * backup.CHECKSUM_BYTES_PER_SECOND * 2) - 1000
        assert "is cheaper" in str(backup.wal_worth_reading("auto", span, cheap_tables, 2))
        assert backup.wal_worth_reading("auto", span, cheap_tables + 2000, 2) is None
        assert "is cheaper" in str(backup.wal_worth_reading("auto", span, cheap_tables + 2000, 4))
        assert backup.wal_worth_reading("wal", span, 1, 2) is None
        assert "policy" in str(backup.wal_worth_reading("checksum", span, 10**12, 2))

    def test_auto_counts_no_archiver_delay_when_the_server_wal_is_readable(self) -> None:
        span = walnames.WalSpan(1, 0, 4_000_000, 16 << 20, 42)
        tables = int(1.0 * backup.CHECKSUM_BYTES_PER_SECOND * 2)
        assert "is cheaper" in str(backup.wal_worth_reading("auto", span, tables, 2, from_server=False))
        assert backup.wal_worth_reading("auto", span, tables, 2, from_server=True) is None
        assert "about 0.4 s" in str(backup.wal_worth_reading("auto", span, tables // 10, 2, from_server=True))

    def test_classify(self) -> None:
        from backup_tool.repository.manifest import RelationFile
        parent = self.basis()
        rels = parent.relations
        V = backup.TableVerdict
        assert backup.classify(parent, parent, frozenset()) == {10: V.UNCHANGED, 11: V.UNCHANGED, 12: V.SCAN}
        assert backup.classify(parent, parent, frozenset({(1663, 5, 101)}))[10] is V.CHANGED
        assert backup.classify(parent, parent, frozenset({(1663, 6, 101)}))[10] is V.UNCHANGED
        moved = replace(parent, relations=(replace(rels[0], relfilenode=200), *rels[1:]))
        assert backup.classify(parent, moved, frozenset())[10] is V.CHANGED
        retyped = replace(parent, relations=(replace(rels[0], column_types="c2"), *rels[1:]))
        assert backup.classify(parent, retyped, frozenset())[10] is V.CHANGED
        new = replace(parent, relations=(*rels, RelationFile('public.n', 13, 1663, 130, 0, True, "c1")))
        assert backup.classify(parent, new, frozenset())[13] is V.CHANGED
        was_unlogged = replace(parent, relations=(*rels[:2], replace(rels[2], logged_heap=True)))
        assert backup.classify(parent, was_unlogged, frozenset())[12] is V.CHANGED

    def test_early_candidates_are_tables_replaced_or_counted_written_since_the_parent(self) -> None:
        from backup_tool.repository.manifest import RelationFile
        parent = self.basis()
        rels = parent.relations
        recorded = {"10": 5, "11": 7, "12": 0}
        assert backup.early_candidates(parent, parent, recorded, {10: 5, 11: 7, 12: 3}) == []
        assert backup.early_candidates(parent, parent, recorded, {10: 6, 11: 7, 12: 3}) == [10]
        assert backup.early_candidates(parent, parent, recorded, {10: 0, 11: 2}) == [], "reset counts only lower"
        assert backup.early_candidates(parent, parent, None, {10: 99, 11: 99}) == [], "a parent that recorded none"
        assert backup.early_candidates(parent, parent, {"10": "5"}, {10: 99}) == []
        moved = replace(parent, relations=(rels[0], replace(rels[1], relfilenode=300), rels[2]))
        new = replace(moved, relations=(*moved.relations, RelationFile('public.n', 13, 1663, 130, 0, True, "c1")))
        assert backup.early_candidates(parent, new, recorded, {10: 5}) == [11, 13]
        assert backup.early_candidates(parent, new, {}, {}) == [11, 13]


def _counted(archiving: Archiving, db: str, table: str, rows: int) -> None:
    """Wait until the server's statistics count ``rows`` rows written in ``table`` (a session
    reports its counts as it ends, a moment after its client has gone)."""
    deadline = time.monotonic() + 30
    with psycopg.connect(archiving.dsn(db), autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_all_tables "
                               "WHERE relid = %s::regclass", (table,)).fetchone()
            if row and row[0] >= rows:
                return
            time.sleep(0.05)
    raise AssertionError(f"the statistics never counted {rows} rows written in {table}")


def test_a_table_counted_written_since_the_parent_is_dumped_before_the_scan_names_it(archiving: Archiving) -> None:
    """The parent recorded how many rows the server had counted written in each table; a
    table counted with more now has its COPY started with the snapshot, before the WAL scan
    names it: here the scan starts only once b's new object is stored. The counts decide
    nothing else: the incremental is exactly what the scan alone gives."""
    _two_tables_backed_up(archiving, "counted", 2000)
    full = backup.backup_full(settings_for(archiving, "counted"))
    assert len(full.options["row_writes"]) == 2
    with psycopg.connect(archiving.dsn("counted"), autocommit=True) as conn:
        conn.execute("UPDATE b SET v = upper(v) WHERE id % 5 = 0")
    _counted(archiving, "counted", "b", 2400)
    now = truth(archiving.dsn("counted"))
    before = _data_objects(archiving)
    stored_before_scan: list[bool] = []

    def source(storage: Any, span: walnames.WalSpan, wait: float, live: Any = None, seen: Any = None) -> Any:
        deadline = time.monotonic() + 30
        while not _data_objects(archiving) - before and time.monotonic() < deadline:
            time.sleep(0.01)
        stored_before_scan.append(bool(_data_objects(archiving) - before))
        return walscan.changed_relations(storage, span, wait, live=live, seen=seen)

    incr = backup.backup_incremental(settings_for(archiving, "counted"), changes=source)
    assert stored_before_scan == [True]
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert stored(incr) == {"public.b"}
    assert {t.full_name: (t.rows, t.checksum) for t in incr.tables} == {n: (v[3], v[4]) for n, v in now.items()}
    assert _data_objects(archiving) - before == {o.key for o in incr.objects() if "/data/" in o.key
                                                 and o.key.startswith(f"backups/{incr.id}/")}
    assert incr.options["row_writes"][str(next(r.oid for r in incr.wal_basis.relations
                                               if r.table == "public.b"))] >= 2400


def test_a_table_dumped_early_on_its_count_that_the_wal_shows_unchanged_is_reused(archiving: Archiving) -> None:
    """Counts can run ahead of the parent's snapshot (a session reports them only as it ends
    or a second later): here the parent's stored manifest records a lower count for table a,
    as if writes made before its snapshot had been reported only after it read them. The table is dumped early, the scan
    shows it unchanged, and its early object is deleted: the parent's is reused."""
    _two_tables_backed_up(archiving, "ahead", 2000)
    full = backup.backup_full(settings_for(archiving, "ahead"))
    a_oid = next(r.oid for r in full.wal_basis.relations if r.table == "public.a")
    with psycopg.connect(archiving.dsn("ahead"), autocommit=True) as conn:
        conn.execute("UPDATE b SET v = upper(v) WHERE id % 5 = 0")
    _counted(archiving, "ahead", "b", 2400)
    now = truth(archiving.dsn("ahead"))
    before = _data_objects(archiving)
    stored_manifest = archiving.repo / "manifests" / f"{full.id}.json"
    body = json.loads(stored_manifest.read_bytes())
    body["options"]["row_writes"][str(a_oid)] = 1
    body["manifest_sha256"] = manifest_digest(body)
    stored_manifest.chmod(0o644)
    stored_manifest.write_text(json.dumps(body))
    early_objects: list[set[str]] = []

    def source(storage: Any, span: walnames.WalSpan, wait: float, live: Any = None, seen: Any = None) -> Any:
        deadline = time.monotonic() + 30
        while len(_data_objects(archiving) - before) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        early_objects.append(_data_objects(archiving) - before)
        return walscan.changed_relations(storage, span, wait, live=live, seen=seen)

    incr = backup.backup_incremental(settings_for(archiving, "ahead"), changes=source)
    assert early_objects and len(early_objects[0]) == 2, "a and b dumped before the scan"
    assert incr.options["changed_tables_method"] == "wal", incr.options
    assert stored(incr) == {"public.b"}
    a_entry = incr.table("public", "a")
    assert a_entry is not None and a_entry.object == full.table("public", "a").object
    assert {t.full_name: (t.rows, t.checksum) for t in incr.tables} == {n: (v[3], v[4]) for n, v in now.items()}
    assert not early_objects[0] & _data_objects(archiving) - {o.key for o in incr.objects()}, \
        "the early object of a is deleted"


def test_tables_created_since_the_parent_keep_the_wal_method_and_a_used_enum_relabelled_does_not(
        archiving: Archiving) -> None:
    """Every table brings a row type of its own: the digest of type definitions covered every
    user type, so creating any table (pg_partman's next partition) had each later incremental
    checksum every table ("a type definition ... changed"). It now covers the types columns
    use: new tables, a new partition and a composite type no column uses leave the WAL method
    deciding; an enum a column uses, relabelled, still makes the checksums decide, and both
    incrementals hold exactly the database's rows."""
    db = "types_" + archiving.base.name[-6:].lower().replace("-", "_")
    archiving.server.create_db(db)
    with psycopg.connect(archiving.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok');"
                     "CREATE TABLE t (id int PRIMARY KEY, m mood, tags mood[]);"
                     "CREATE TABLE quiet (id int);"
                     "CREATE TABLE meas (k int, v text) PARTITION BY RANGE (k);"
                     "CREATE TABLE meas_1 PARTITION OF meas FOR VALUES FROM (0) TO (100);"
                     "INSERT INTO t VALUES (1, 'sad', '{sad,ok}'), (2, 'ok', '{}');"
                     "INSERT INTO quiet VALUES (1); INSERT INTO meas VALUES (5, 'a')")
    backup.backup_full(settings_for(archiving, db))
    with psycopg.connect(archiving.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE fresh (id int, m mood, note text);"
                     "INSERT INTO fresh VALUES (1, 'ok', 'new');"
                     "CREATE TABLE meas_2 PARTITION OF meas FOR VALUES FROM (100) TO (200);"
                     "INSERT INTO meas VALUES (150, 'b');"
                     "CREATE TYPE unused AS (a int, b text)")
    created = backup.backup_incremental(settings_for(archiving, db), changes=walscan.changed_relations)
    assert created.options["changed_tables_method"] == "wal", created.options
    assert stored(created) == {"public.fresh", "public.meas_2"}
    now = truth(archiving.dsn(db))
    assert {t.full_name: t.checksum for t in created.tables} == {name: v[4] for name, v in now.items()}
    with psycopg.connect(archiving.dsn(db), autocommit=True) as conn:
        conn.execute("ALTER TYPE mood RENAME VALUE 'sad' TO 'blue'")
    relabelled = backup.backup_incremental(settings_for(archiving, db), changes=walscan.changed_relations)
    assert relabelled.options["changed_tables_method"] == "checksum", relabelled.options
    assert "type definition" in relabelled.options["changed_tables_note"]
    assert stored(relabelled) == {"public.t"}
    now = truth(archiving.dsn(db))
    assert {t.full_name: t.checksum for t in relabelled.tables} == {name: v[4] for name, v in now.items()}
