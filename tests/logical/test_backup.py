"""The data phase of a logical backup on a real server and a real (local) repository: at most
``jobs`` COPY sessions at once, and the next table's COPY runs while the previous object's
upload is still being answered; a table's object, in independent zstd frames (or in the one
frame older versions wrote), restores, verifies and reads back byte for byte."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import dbcompare
import psycopg
import pytest
import zstandard
from sessions import holding
from support.clusters import logged_pid, logged_statements

from backup_tool.config.policy import BackupSettings, Policy
from backup_tool.config.settings import Settings
from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.jobs.verify import verify
from backup_tool.logical import backup
from backup_tool.logical.restore import restore_full
from backup_tool.logical.restore_tables import restore_tables
from backup_tool.postgres import connection as postgres
from backup_tool.repository.manifest import (
    FRAMED_BASE_FORMAT,
    SPLIT_TABLE_FORMAT,
    TYPED_COLUMN_FORMAT,
    StoredObject,
    TableEntry,
)
from backup_tool.repository.storage.base import PutResult
from backup_tool.repository.storage.local import LocalStorage
from backup_tool.streams import pipeline

pytestmark = pytest.mark.slow

HELD_ANSWERS = 2
ANSWER_PATIENCE = 20.0


class SlowlyAnsweringStorage(LocalStorage):
    """A local repository that holds the answer to each of its first ``HELD_ANSWERS`` data
    objects' puts after the stream ended (as an S3 PUT is answered after its body is sent),
    until the next data object's put begins or ``ANSWER_PATIENCE`` seconds pass: a backup
    that overlaps a COPY with the answer shows it however slow the machine is, one that
    waits for the answer first waits out the patience and shows none. Records, per data
    object, when its put began (its COPY had started), when its stream ended and when the
    put returned."""

    def __init__(self, root: str | Path, events: list[tuple[str, str]]) -> None:
        super().__init__(root)
        self.events = events
        self._began = threading.Condition()
        self._puts = 0

    def _note(self, what: str, key: str) -> None:
        with self._began:
            self.events.append((what, key))

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        if "/data/" not in key:
            return super().put(key, chunks)
        with self._began:
            self._puts += 1
            ordinal = self._puts
            self.events.append(("put", key))
            self._began.notify_all()

        def watched() -> Iterator[bytes]:
            yield from chunks
            self._note("end", key)

        result = super().put(key, watched())
        if ordinal <= HELD_ANSWERS:
            with self._began:
                self._began.wait_for(lambda: self._puts > ordinal, timeout=ANSWER_PATIENCE)
        self._note("stored", key)
        return result


@contextmanager
def watching(dsn: str, sample: Callable[[psycopg.Connection[Any]], None]) -> Iterator[None]:
    """Inside the block, ``sample`` looks at the server through a session of its own every few ms."""
    done = threading.Event()

    def watch() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not done.is_set():
                sample(conn)
                time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def test_one_session_copies_the_next_table_while_the_last_upload_is_answered(
        fresh_db: Callable[..., Any], local_repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = fresh_db("sessions")
    for n in range(4):
        db.execute(f"CREATE TABLE public.t{n} (id int PRIMARY KEY, v text);"
                   f"INSERT INTO public.t{n} SELECT g, repeat(md5(g::text), {n + 1}) FROM generate_series(1, 3000) g")
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(backup, "open_storage", lambda url: SlowlyAnsweringStorage(url, events))
    busiest: list[int] = []

    def sample(conn: psycopg.Connection[Any]) -> None:
        """How many of the backup's sessions run a COPY or a checksum query."""
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND (query LIKE 'COPY %%' OR query LIKE 'SELECT n, %%')").fetchone()
        assert row is not None
        busiest.append(int(row[0]))

    with watching(db.dsn, sample):
        manifest = backup.backup_full(Settings(local_repo, db.dsn, Policy(backup=BackupSettings(jobs=1))))

    assert sorted((t.name, t.rows) for t in manifest.tables) == [(f"t{n}", 3000) for n in range(4)]
    assert max(busiest, default=0) <= 1, "with jobs 1 one session works at a time"  # sampling may miss a short COPY
    # An upload overlaps when another table's COPY (its put) begins before the upload is
    # answered: after its last byte (held answers), or already before it, when the COPY ended
    # while the compressed stream's last pieces were still on their way.
    overlapped = 0
    for i, (what, key) in enumerate(events):
        if what == "put":
            answered = events.index(("stored", key))
            overlapped += any(w == "put" for w, _ in events[i + 1:answered])
    assert overlapped >= 2, f"no COPY began while an upload was answered: {events}"


def test_a_local_backup_makes_its_data_directory_durable_once_before_its_manifest(
        fresh_db: Callable[..., Any], local_repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each table object's file is fsynced before its name appears, but the data directory's
    entries are fsynced once, after the last object and before the manifest is linked (with
    the directories above it, made by the backup and never fsynced into their parents
    before): it fsynced the directory once per table (6,000 fsyncs for 3,000 tables)."""
    db = fresh_db("dirsync")
    db.execute(";".join(f"CREATE TABLE public.t{n} (id int PRIMARY KEY);INSERT INTO public.t{n} VALUES (1)"
                        for n in range(5)))
    root = Path(local_repo).resolve()
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        real_fsync(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.is_relative_to(root):
            events.append(("fsync", path.relative_to(root).as_posix()))

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_link(src, dst, *args, **kwargs)
        events.append(("link", Path(dst).resolve().relative_to(root).as_posix()))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    manifest = backup.backup_full(Settings(local_repo, db.dsn, Policy(backup=BackupSettings(jobs=2))))

    data = f"backups/{manifest.id}/data"
    objects = {t.object.key for t in manifest.tables if t.object is not None}
    assert len(objects) == 5 and all(k.startswith(data + "/") for k in objects)
    manifest_linked = events.index(("link", f"manifests/{manifest.id}.json"))
    assert [e for e in events if e == ("fsync", data)] == [("fsync", data)], events
    synced = events.index(("fsync", data))
    assert all(events.index(("link", k)) < synced for k in objects)
    assert synced < events.index(("fsync", f"backups/{manifest.id}")) < events.index(("fsync", "backups")) \
        < manifest_linked
    for key in objects:
        linked = events.index(("link", key))
        name = key.rsplit("/", 1)[1]
        assert any(w == "fsync" and p.startswith(f"{data}/.{name}.partial-") for w, p in events[:linked]), key


def test_the_backups_sessions_start_no_parallel_workers(fresh_db: Callable[..., Any], local_repo: str) -> None:
    """``--jobs`` bounds the server processes a backup keeps busy: its checksum queries start
    no parallel workers, even where the planner gives every other session some (here parallel
    plans are made free for the database)."""
    db = fresh_db("noparallel")
    db.execute("CREATE TABLE public.t (id int, v text);"
               "INSERT INTO public.t SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 100000) g")
    for setting in ("parallel_setup_cost = 0", "parallel_tuple_cost = 0", "min_parallel_table_scan_size = 0",
                    "max_parallel_workers_per_gather = 2"):
        db.execute(f"ALTER DATABASE {db.name} SET {setting}")
    with psycopg.connect(db.dsn) as conn:
        plan = "\n".join(str(r[0]) for r in conn.execute("EXPLAIN SELECT count(*) FROM public.t").fetchall())
    assert "Workers Planned: 2" in plan, plan
    workers: list[int] = []
    checksums: list[int] = []

    def sample(conn: psycopg.Connection[Any]) -> None:
        for kind, count in conn.execute(
                "SELECT backend_type, count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'active' AND query LIKE 'SELECT n, %%' GROUP BY 1").fetchall():
            (workers if kind == "parallel worker" else checksums).append(int(count))

    with watching(db.dsn, sample):
        manifest = backup.backup_full(Settings(local_repo, db.dsn, Policy(backup=BackupSettings(jobs=2))))
    assert [(t.name, t.rows) for t in manifest.tables] == [("t", 100000)]
    assert checksums, "the watcher saw no checksum query: make the table bigger"
    assert not workers, f"parallel workers ran a checksum query beside the backup's sessions: {workers}"


PARTITIONS = 40


def test_a_backup_reads_column_types_once_and_sets_jit_on_no_checksum_session(
        pg_server: Any, fresh_db: Callable[..., Any], local_repo: str, cli: Any) -> None:
    """Checksumming each of thousands of small partitions cost three round trips: its column
    types, ``SET jit = off`` and the query. The types of every table are read in one catalog
    query, the sessions start with JIT off, and small tables are checksummed
    ``RENEW_EVERY`` to a statement, each table still in its own count and sum."""
    db = fresh_db("manyparts")
    db.execute("CREATE TABLE public.m (id int, k int, v numeric, ts timestamptz) PARTITION BY LIST (k);"
               + "".join(f"CREATE TABLE public.m_{i} PARTITION OF public.m FOR VALUES IN ({i});"
                         for i in range(PARTITIONS))
               + f"INSERT INTO public.m SELECT g, g % {PARTITIONS}, g / 7.0, now() FROM generate_series(1, 500) g")
    db.execute(f"ALTER DATABASE {db.name} SET log_statement = 'all'")
    since = pg_server.log_file.stat().st_size
    manifest = backup.backup_full(Settings(local_repo, db.dsn, Policy(backup=BackupSettings(jobs=2))))
    assert sum(t.rows for t in manifest.tables) == 500
    logged = logged_statements(pg_server, db.name, since)
    checksums = [e for e in logged if "SELECT n, " in e]
    named = sorted(name for e in checksums for name in re.findall(r'FROM ONLY "public"\."(m_\d+)"', e))
    assert named == sorted(f"m_{i}" for i in range(PARTITIONS)), logged
    assert len(checksums) <= -(-PARTITIONS // backup.RENEW_EVERY) + 1, checksums
    assert not [e for e in logged if "SET jit" in e]
    summing = {logged_pid(e) for e in checksums}
    assert not [e for e in logged if logged_pid(e) in summing and "pg_attribute" in e]
    assert len([e for e in logged if "pg_attribute" in e]) < PARTITIONS
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        alone = {t.name: postgres.table_checksum(conn, t.schema, t.name, t.columns, manifest.checksum_method)
                 for t in manifest.tables if t.relkind == "r"}
    assert {t.name: (t.rows, t.checksum) for t in manifest.tables if t.relkind == "r"} == alone
    db.execute("UPDATE public.m_7 SET v = v + 1 WHERE id = (SELECT min(id) FROM public.m_7)")
    changed = cli("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", manifest.id, "--json")
    assert changed.returncode == 3, changed.stdout + changed.stderr
    failed = [c for c in json.loads(changed.stdout)["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["content_checksums"] and "m_7" in failed[0]["detail"], failed


WIDE = """
CREATE TABLE public.wide (id int PRIMARY KEY, note text, doc jsonb, blob bytea, tags text[]);
INSERT INTO public.wide
SELECT g,
       CASE WHEN g % 13 = 0 THEN NULL ELSE repeat(md5(g::text), 1 + g % 5) || E'\\t tab \\\\ back\\nline café' END,
       CASE WHEN g % 7 = 0 THEN NULL ELSE jsonb_build_object('g', g, 's', md5((g * 3)::text)) END,
       decode(md5(g::text), 'hex'),
       ARRAY[md5(g::text), NULL, 'a"b']
  FROM generate_series(1, 40000) g;
CREATE TABLE public.small (id int PRIMARY KEY, wide_id int REFERENCES public.wide (id), v text);
INSERT INTO public.small SELECT g, g, 'v' || g FROM generate_series(1, 50) g;
"""


def _frame_count(data: bytes) -> int:
    count = 0
    while data:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        dobj.decompress(data)
        data = dobj.unused_data
        count += 1
    return count


def _streamed_in_one_frame(fill: pipeline.Fill, level: int, threads: int, stats: pipeline.StreamStats,
                           on_raw: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """What versions before frames wrote: one frame from zstd's streaming compressor."""
    chunker = zstandard.ZstdCompressor(level=level, write_checksum=True).chunker(chunk_size=1 << 20)
    buf = bytearray(1 << 16)
    with memoryview(buf) as view:
        while n := fill(view):
            stats.raw_size += n
            stats.lines += buf.count(b"\n", 0, n)
            yield from chunker.compress(bytes(buf[:n]))
    yield from chunker.finish()


@pytest.mark.parametrize("writer", ["frames", "one frame (older versions)"])
def test_a_table_object_restores_verifies_and_reads_back_whichever_way_it_was_compressed(
        fresh_db: Callable[..., Any], local_repo: str, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    db = fresh_db("frames")
    db.execute(WIDE)
    settings = Settings(local_repo, db.dsn, Policy(backup=BackupSettings(jobs=2)))
    if writer != "frames":
        monkeypatch.setattr(pipeline, "compress_filled", _streamed_in_one_frame)
    full = backup.backup_full(settings)
    monkeypatch.undo()

    wide = full.table("public", "wide")
    assert wide is not None and wide.object is not None
    with psycopg.connect(db.dsn) as conn, conn.cursor().copy("COPY public.wide TO STDOUT") as copy:
        copied = b"".join(bytes(block) for block in copy)
    assert len(copied) > 2 * pipeline.FRAME
    stored = (Path(local_repo) / wide.object.key).read_bytes()
    assert _frame_count(stored) == (-(-len(copied) // pipeline.FRAME) if writer == "frames" else 1)
    assert pipeline.read_object(LocalStorage(local_repo), wide.object) == copied

    restored = fresh_db("frames_r")
    result = restore_full(settings, restored.dsn, full.id)
    assert result.validation is not None and result.validation.ok
    assert dbcompare.table_hashes(restored.dsn) == dbcompare.table_hashes(db.dsn)
    copy_back = restore_tables(settings, db.dsn, ["public.wide"], backup_ref=full.id, into_schema="inspect")
    assert copy_back.validation is not None and copy_back.validation.ok
    assert dbcompare.table_hashes(db.dsn, ["inspect.wide"])["inspect.wide"] == \
        dbcompare.table_hashes(db.dsn, ["public.wide"])["public.wide"]
    assert verify(settings, full.id).ok


def test_table_data_is_compressed_at_the_logical_level(fresh_db: Callable[..., Any], local_repo: str) -> None:
    """A logical backup compresses at ``backup.logical_compression_level`` (1 by default), not at
    the ``compression_level`` of base backups and WAL, and records the level it used: each stored
    frame is exactly zstd's at that level."""
    db = fresh_db("levels")
    db.execute(WIDE)
    with psycopg.connect(db.dsn) as conn, conn.cursor().copy("COPY public.wide TO STDOUT") as copy:
        copied = b"".join(bytes(block) for block in copy)
    for policy, level in ((Policy(), 1), (Policy(backup=BackupSettings(compression_level=2, logical_compression_level=5)), 5)):
        full = backup.backup_full(Settings(local_repo, db.dsn, policy))
        assert full.options["compression_level"] == level
        wide = full.table("public", "wide")
        assert wide is not None and wide.object is not None
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        expected = b"".join(cctx.compress(copied[i:i + pipeline.FRAME]) for i in range(0, len(copied), pipeline.FRAME))
        assert (Path(local_repo) / wide.object.key).read_bytes() == expected, level


def test_a_backup_with_an_object_of_several_frames_is_refused_by_readers_of_one_frame() -> None:
    """Versions before FRAMED_BASE_FORMAT decompress only an object's first frame: a manifest
    listing an object longer than a frame (a table, its part, or a side object) is written in
    that format at least, whatever its checksum method; a backup of small objects keeps its
    older format."""
    def obj(raw: int) -> StoredObject:
        return StoredObject(f"backups/b/data/{raw}.copy.zst", 100, "0" * 64, raw)

    def table(stored: StoredObject | None, parts: tuple[StoredObject, ...] = ()) -> TableEntry:
        return TableEntry("public", "t", "r", None, ("id",), 1, "0" * 16, stored, parts)

    small, big = obj(pipeline.FRAME), obj(pipeline.FRAME + 1)
    schema = obj(10)
    row_text = ChecksumMethod.ROW_TEXT
    assert backup.manifest_format([table(small)], [schema, schema, None], row_text) == 1
    assert backup.manifest_format([table(big)], [schema, schema, None], row_text) == FRAMED_BASE_FORMAT
    assert backup.manifest_format([table(small)], [schema, schema, big], row_text) == FRAMED_BASE_FORMAT
    assert backup.manifest_format([table(None, (small, big))], [schema, schema, None], row_text) == SPLIT_TABLE_FORMAT
    assert backup.manifest_format([table(big)], [schema, schema, None], ChecksumMethod.TYPED_COLUMN) == \
        TYPED_COLUMN_FORMAT


def test_a_backup_needs_two_lock_slots_per_table_and_its_restore_fits_a_smaller_server(
        pg_cluster_factory: Callable[..., Any], cli: Any, local_repo: str, tmp_path: Path) -> None:
    """A server's lock table holds max_locks_per_transaction x (connections) locks in all. A
    backup's checksum sessions used to keep every table's lock (and its indexes', taken by the
    planner) until the backup ended: three locks per table. Now they let go every few tables,
    so the backup needs the two README states (the snapshot's session and the schema's
    pg_dump each lock every table, as pg_dump --jobs's leader does, plus the catalogs pg_dump
    reads): on a server of 420 slots, 150 tables (about 300 + 140) fit. The restore's pre-data
    was one transaction locking each table, its TOAST table and index (450 locks): a server
    sized like the one backed up (or the same server) refused it, out of shared memory, where
    pg_restore without --single-transaction fits. It is now replayed in transactions sized to
    the target's lock table, here one of 320 slots. Autovacuum is off: its workers, busy with
    the new tables, took slots at random.
    (The test once put 200 tables on this server: that fitted only in the spare shared memory
    a lock table may borrow, which PostgreSQL 15.20 no longer leaves.)"""
    server = pg_cluster_factory(max_locks_per_transaction="10", max_connections="20", autovacuum="off")
    db = server.create_db("many")
    for start in range(0, 150, 50):
        db.execute(";".join(f"CREATE TABLE public.t{i} (id int PRIMARY KEY, v text);"
                            f"INSERT INTO public.t{i} SELECT g, md5(g::text) FROM generate_series(1, {i % 7}) g"
                            for i in range(start, start + 50)))
    jobs_dump = subprocess.run([dbcompare.find_pg_dump(), "-Fd", "-j", "2", "-f", str(tmp_path / "dump"), "-d", db.dsn],
                               capture_output=True, text=True)
    assert jobs_dump.returncode == 0, jobs_dump.stderr
    made = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    assert made["tables"] == 150
    target = pg_cluster_factory(max_locks_per_transaction="10", max_connections="10", autovacuum="off") \
        .create_db("many_restored")
    report = cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn)
    assert report["validation"]["ok"] is True
    assert dbcompare.table_hashes(db.dsn) == dbcompare.table_hashes(target.dsn)
    target.execute("ALTER TABLE public.t149 ALTER COLUMN v SET DEFAULT 'changed'")
    altered = cli("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", made["id"], "--json")
    assert altered.returncode == 3, altered.stdout + altered.stderr
    assert [c["name"] for c in json.loads(altered.stdout)["checks"] if not c["ok"]] == ["schema_matches"]


def test_a_table_whose_row_security_binds_the_role_backing_up_is_refused_naming_it(
        pg_cluster_factory: Callable[..., Any], cli: Any, local_repo: str) -> None:
    """The COPY of a table under FORCE ROW LEVEL SECURITY, backed up by its owner (no
    BYPASSRLS), failed half-way with PostgreSQL's bare "query would be affected by row-level
    security"; it is refused before the snapshot, saying what to do. Without FORCE the owner
    reads every row and the backup holds them all."""
    server = pg_cluster_factory()
    db = server.create_db("tenants")
    db.execute("CREATE ROLE tenant_owner LOGIN PASSWORD 'tenant-pw-3b'")
    db.execute("ALTER DATABASE tenants OWNER TO tenant_owner")
    owner = f"postgresql://tenant_owner:tenant-pw-3b@127.0.0.1:{server.port}/tenants"
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, tenant text); "
                     "INSERT INTO public.docs SELECT g, 't' || g % 3 FROM generate_series(1, 30) g; "
                     "ALTER TABLE public.docs ENABLE ROW LEVEL SECURITY; ALTER TABLE public.docs FORCE ROW LEVEL SECURITY; "
                     "CREATE POLICY mine ON public.docs USING (tenant = current_setting('app.tenant', true))")
    refused = cli("backup", "full", "--repo", local_repo, "--dsn", owner)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "row-level security would hide rows of 1 of the tables to back up from role tenant_owner (public.docs)" \
        in refused.stderr and "BYPASSRLS" in refused.stderr
    db.execute("ALTER TABLE public.docs NO FORCE ROW LEVEL SECURITY")
    made = cli.json("backup", "full", "--repo", local_repo, "--dsn", owner)
    assert made["rows"] == 30


def test_a_backup_waiting_on_an_exclusive_lock_says_who_holds_it_then_finishes(
        cli: Any, local_repo: str, seed_db_rw: Any) -> None:
    """A migration's ACCESS EXCLUSIVE lock kept the backup silent for as long as it lasted."""
    db = seed_db_rw
    with holding(db.dsn, "LOCK TABLE public.coupons IN ACCESS EXCLUSIVE MODE", "schema-migration", 3):
        proc = cli("backup", "full", "--repo", local_repo, "--dsn", db.dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    waits = [line for line in proc.stderr.splitlines() if "locked exclusively by" in line]
    assert len(waits) == 1 and "schema-migration" in waits[0] and "waiting for them" in waits[0]
