"""The WAL reader's record CRCs, on the session cluster's real WAL.

A record whose bytes do not match its ``xl_crc`` is never believed: inside an archived
segment it is damage, and an incremental whose span holds it compares checksums instead of
trusting a change set that may name the wrong relation (and restores equal to its source);
as the last record of the WAL read from the server's ``pg_wal`` it is a record still being
written, where the WAL ends (as PostgreSQL takes it), so every record before it is read and
the span, which it cuts short, gets no answer.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest
from support.clusters import DbHandle

from backup_tool.config.policy import BackupSettings, Policy, Retention
from backup_tool.config.settings import Settings
from backup_tool.core import walnames
from backup_tool.core.report import NullReporter
from backup_tool.errors import WalDamagedError
from backup_tool.logical import backup, restore
from backup_tool.physical import wal, walscan
from backup_tool.postgres import walbasis
from backup_tool.repository import walidentity
from backup_tool.repository.manifest import Manifest
from backup_tool.repository.storage import Storage, open_storage

SEG = walnames.DEFAULT_SEGMENT_SIZE
SCHEMA = r"""
CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, items jsonb, receipt bytea, note text);
CREATE TABLE "Quiet Customers" (id bigint PRIMARY KEY, name text, tags text[]);
CREATE TABLE ledger (id int, amount numeric(12, 2), memo text);
INSERT INTO orders SELECT g, 'customer ' || g, jsonb_build_object('sku', g, 'qty', g % 5, 'tags', '["a", "b"]'::jsonb),
                          decode(md5(g::text), 'hex'), CASE WHEN g % 3 = 0 THEN NULL ELSE E'tab\there\nline\\' END
                   FROM generate_series(1, 400) g;
INSERT INTO "Quiet Customers" SELECT g, repeat('ü', g % 40), ARRAY['x', NULL, 'y,z'] FROM generate_series(1, 300) g;
INSERT INTO ledger SELECT g, g * 1.25, repeat(md5(g::text), 30) FROM generate_series(1, 200) g;
"""


class Events(NullReporter):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

        self.warnings: list[str] = []

    def event(self, message: str, **fields: Any) -> None:
        self.events.append((message, fields))

    def warning(self, message: str, **fields: Any) -> None:
        self.warnings.append(message)


def lsn_now(conn: psycopg.Connection[Any]) -> int:
    return walnames.parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])


def contents(dsn: str) -> dict[str, list[Any]]:
    """Every user table's rows, as JSON, in a fixed order."""
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute("SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                                             "WHERE schemaname = 'public' ORDER BY 1")]
        return {t: [r[0] for r in conn.execute(f"SELECT to_jsonb(t) FROM {t} t ORDER BY to_jsonb(t)::text")]
                for t in tables}


def stored(m: Manifest) -> set[str]:
    return {t.full_name for t in m.tables if t.object and t.object.key.startswith(f"backups/{m.id}/")}


def archive_of(db: DbHandle, repo: Path) -> tuple[Storage, walidentity.ClusterIdentity, int]:
    storage = open_storage(str(repo))
    sysid = int(db.scalar("SELECT system_identifier FROM pg_control_system()"))
    identity = walidentity.ClusterIdentity(sysid, 15)
    walidentity.claim_archive(storage, identity, "test")
    return storage, identity, sysid


@pytest.mark.slow
def test_a_damaged_record_in_an_archived_segment_sends_the_incremental_to_the_checksums(
        fresh_db: Callable[[str], DbHandle], tmp_path: Path) -> None:
    """One byte of the relation a row insert names, flipped in the archived segment (its
    sha256 is that of the damaged content, as when the server's disk damaged it before the
    archiver read it; the server has recycled its own copy since): the page headers, lengths and back-pointers all still hold, and the
    record would name a relation that does not exist instead of ``orders``. The CRC check
    refuses it, the incremental compares checksums (and says why), stores ``orders`` and only
    it, and restores equal to the source."""
    db = fresh_db("walcrc")
    db.execute(SCHEMA)
    storage, identity, _ = archive_of(db, tmp_path / "repo")
    settings = Settings(str(tmp_path / "repo"), db.dsn, Policy(retention=Retention(max_chain_length=10),
                                                                backup=BackupSettings(change_detection="wal")))
    full = backup.backup_full(settings)
    assert full.wal_basis is not None
    with db.connect() as conn:
        before = lsn_now(conn)
        conn.execute("INSERT INTO orders VALUES (1000, 'late', '{\"sku\": 1000}', '\\x00ff', 'after the full')")
        after = lsn_now(conn)
        orders = (1663, int(conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()")
                            .fetchone()[0]), int(conn.execute("SELECT pg_relation_filenode('orders')").fetchone()[0]))
        conn.execute("SELECT pg_switch_wal()")
        names = {n: walnames.segment_name(1, n) for n in range(walnames.parse_lsn(full.wal_basis.start_lsn) // SEG,
                                                               (after - 1) // SEG + 1)}
        segments = {n: bytearray(walbasis.read_wal_file(conn, name, SEG) or b"") for n, name in names.items()}
    insert = next(r for r in walscan.records(lambda n: bytes(segments[n]), before, after) if (0, orders) in r.blocks)
    damaged = segments[insert.lsn // SEG]
    at = insert.lsn % SEG + walscan.RECORD_HEADER
    found = bytes(damaged[at:at + 64]).find(struct.pack("<III", *orders))
    assert found >= 0
    damaged[at + found + 8 + 2] ^= 0x40
    with pytest.raises(walscan.WalRecordDamaged) as refused:
        list(walscan.records(lambda n: bytes(segments[n]), before, after))
    assert refused.value.lsn == insert.lsn
    for n, name in names.items():
        (tmp_path / name).write_bytes(segments[n])
        wal.push_file(storage, tmp_path / name, archive=identity)
    with db.connect() as conn:
        conn.execute("CHECKPOINT")
        assert not any(walbasis.read_wal_file(conn, name, 8192) for name in names.values()), \
            "recycled: only the archive's (damaged) copies are left to read"

    events = Events()
    incr = backup.backup_incremental(settings, events, changes=walscan.changed_relations)
    why = (f"archived WAL segment {names[insert.lsn // SEG]} is damaged: the record at "
           f"{walnames.format_lsn(insert.lsn)} fails its CRC check")
    assert incr.options["changed_tables_method"] == "checksum", incr.options
    assert why in incr.options["changed_tables_note"]
    assert any(message == "change detection" and why in fields.get("reason", "") for message, fields in events.events)
    assert [w for w in events.warnings if why in w and "point-in-time recovery through it would stop" in w] \
        == events.warnings and len(events.warnings) == 1
    assert stored(incr) == {"public.orders"}

    target = fresh_db("walcrc_restored")
    result = restore.restore_full(settings, target.dsn, incr.id)
    assert result.validation is not None and result.validation.ok
    assert contents(target.dsn) == contents(db.dsn)
    assert len(contents(target.dsn)["public.orders"]) == 401


@pytest.mark.slow
def test_a_torn_last_record_in_the_servers_wal_is_where_it_ends(fresh_db: Callable[[str], DbHandle],
                                                                 tmp_path: Path) -> None:
    """The span's tail read from ``pg_wal``: its last record with its data not yet written
    is the end of the WAL (every record before it read, no answer for the span); the same
    damage one record earlier, with a complete record after it, is a damaged file."""
    db = fresh_db("waltail")
    storage, _, sysid = archive_of(db, tmp_path / "repo")
    with db.connect() as conn:
        conn.execute("CREATE TABLE t (id int, v text)")
        start = lsn_now(conn)
        conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 500) g")
        conn.execute("UPDATE t SET v = v || 'x' WHERE id % 7 = 0")
        end = lsn_now(conn)
        assert walbasis.can_read_wal_files(conn) and walbasis.request_wal_flush(conn)
        span = walnames.WalSpan(1, start, end, SEG, sysid)
        read: dict[str, bytes] = {}

        def server(name: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
            whole = walbasis.ServerWal(conn, walnames.format_lsn(end), SEG, 5.0)(name, [(0, ranges[-1][1])])
            read[name] = whole[0] if whole else b""
            return [read[name][first:stop] for first, stop in ranges] if whole else None

        whole = walscan.relations_written(storage, span, 0, live=server)
    assert whole.from_server == whole.segments >= 1
    tail = {walnames.segment_number(name): data for name, data in read.items()}
    records = list(walscan.records(lambda n: tail[n] + bytes(SEG - len(tail[n])), start, end))
    ends = [r.lsn for r in records[1:]] + [end]

    def unwritten(index: int) -> Callable[[str, list[tuple[int, int]]], list[bytes]]:
        """The server's files with the data of ``records[index]`` (what follows its header, on
        the first page that holds any: a header can end at or cross a page boundary) zeros."""
        lsn = records[index].lsn
        base = lsn // SEG * SEG
        data = bytearray(tail[lsn // SEG])
        spots = [p - base for p in _record_bytes(lsn, min(ends[index], base + SEG))[walscan.RECORD_HEADER:]]
        page = [p for p in spots if p // walscan.BLCKSZ == spots[0] // walscan.BLCKSZ]
        first, stop = page[0], page[-1] + 1
        assert stop - first == len(page) and any(data[first:stop])
        data[first:stop] = bytes(stop - first)
        return lambda name, ranges: [bytes(data[first:stop]) if walnames.segment_number(name) == lsn // SEG
                                     else read[name][first:stop] for first, stop in ranges]

    torn = unwritten(len(records) - 1)
    with pytest.raises(walscan.WalScanUncertain, match=f"the WAL the server has written ends at "
                                                       f"{walnames.format_lsn(records[-1].lsn)}: its last record") \
            as ended:
        walscan.relations_written(storage, span, 0, live=torn)
    assert not isinstance(ended.value, WalDamagedError), "a record still being written is no damage to warn about"
    got = []
    with pytest.raises(walscan.WalRecordDamaged) as stopped:
        for record in walscan.records(lambda n: torn(walnames.segment_name(1, n), [(0, SEG)])[0]
                                      + bytes(SEG - len(tail[n])), start, end):
            got.append(record)
    assert got == records[:-1] and stopped.value.lsn == records[-1].lsn

    earlier = len(records) - 2
    name = walnames.segment_name(1, records[earlier].lsn // SEG)
    with pytest.raises(walscan.WalSegmentDamaged, match=f"pg_wal/{name} is damaged: the record at "
                                                        f"{walnames.format_lsn(records[earlier].lsn)} fails its CRC"):
        walscan.relations_written(storage, span, 0, live=unwritten(earlier))


def _record_bytes(lsn: int, stop: int) -> list[int]:
    """WAL positions of the record at ``lsn`` up to ``stop``, page headers left out."""
    spots: list[int] = []
    p = lsn
    while p < stop:
        header = walscan.LONG_PHD if p % SEG < walscan.BLCKSZ else walscan.SHORT_PHD
        if p % walscan.BLCKSZ < header:
            p += header - p % walscan.BLCKSZ
            continue
        spots.append(p)
        p += 1
    return spots


def test_what_a_failed_crc_means_depends_on_where_the_record_was_read() -> None:
    span = walnames.WalSpan(1, 0x3000028, 0x5000100, SEG, 42)
    last, before = walnames.segment_name(1, 5), walnames.segment_name(1, 4)

    def reason(lsn: int, following: int, from_server: set[int]) -> str:
        return walscan.damaged_record_reason(walscan.WalRecordDamaged(lsn, following), span, frozenset(from_server))

    assert reason(0x50000C8, 0x5000100, {5}).startswith("the WAL the server has written ends at 0/50000C8: ")
    assert reason(0x4FFFFE0, 0x5000100, {4, 5}).startswith("the WAL the server has written ends at 0/4FFFFE0: ")
    assert reason(0x50000C8, 0x5000200, {5}).startswith("the WAL the server has written ends at")
    assert reason(0x50000C8, 0x5000100, set()) == (f"archived WAL segment {last} is damaged: the record at 0/50000C8 "
                                                   f"fails its CRC check (incorrect resource manager data checksum)")
    assert reason(0x5000040, 0x50000C8, {5}).startswith(f"pg_wal/{last} is damaged: the record at 0/5000040 fails")
    assert reason(0x4FFFFE0, 0x5000060, {5}).startswith(f"archived WAL segment {before}, pg_wal/{last} are damaged")
    assert reason(0x4000028, 0x4000100, {4, 5}).startswith(f"pg_wal/{before} is damaged")


def test_the_scan_tells_catalog_writes_but_not_in_place_updates_vacuum_or_statistics(
        fresh_db: Callable[[str], DbHandle], tmp_path: Path) -> None:
    """What an incremental's schema reuse reads (:class:`walnames.CatalogEvidence`): ANALYZE,
    VACUUM (FREEZE) and DML write ``pg_statistic`` and user relations only (``pg_class`` takes
    in-place updates, told apart); COMMENT writes ``pg_description``; VACUUM FULL
    of a mapped catalog updates this database's relation map."""
    db = fresh_db("walcatalogs")
    storage, _, sysid = archive_of(db, tmp_path / "repo")
    with db.connect() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 300) g")
        conn.execute("DELETE FROM t WHERE id % 2 = 0")
        files = {name: tuple(int(x) for x in conn.execute(
            "SELECT CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END,"
            " CASE WHEN c.relisshared THEN 0 ELSE d.oid END, pg_relation_filenode(c.oid)"
            " FROM pg_class c, pg_database d WHERE c.oid = %s::regclass AND d.datname = current_database()",
            (name,)).fetchone()) for name in ("pg_class", "pg_statistic", "pg_description", "t")}
        db_oid = files["t"][1]

        def evidence(*statements: str) -> walnames.CatalogEvidence:
            start = lsn_now(conn)
            for statement in statements:
                conn.execute(statement)
            end = lsn_now(conn)
            assert walbasis.request_wal_flush(conn)
            live = walbasis.ServerWal(conn, walnames.format_lsn(end), SEG, 5.0)
            changes = walscan.changed_relations(storage, walnames.WalSpan(1, start, end, SEG, sysid), 0, live=live)
            assert changes.evidence is not None
            return changes.evidence

        quiet = evidence("UPDATE t SET v = v || 'x' WHERE id % 3 = 0", "ANALYZE t", "VACUUM (FREEZE) t",
                         "VACUUM pg_class")
        assert {files["t"], files["pg_statistic"]} <= quiet.written
        assert files["pg_class"] not in quiet.written and files["pg_class"] in quiet.inplace
        assert db_oid not in quiet.relmaps and not quiet.restarted
        commented = evidence("COMMENT ON TABLE t IS 'now'")
        assert files["pg_description"] in commented.written
        rewritten = evidence("VACUUM FULL pg_class")
        assert db_oid in rewritten.relmaps
