"""Direct base backups: the tool reads the data directory itself, as pgBackRest does.

``pg_basebackup`` sends the whole cluster through one walsender, one file after another;
when the tool runs on the database host and can read the data directory it takes the same
backup by itself instead, reading files on ``backup.jobs`` threads ahead of the tar writer.

Guaranteed, so that every reader of a base backup works unchanged:

- The tar is what ``pg_basebackup -Ft -X none`` writes: the same member paths and kinds
  (directories with a trailing ``/``), headers as PostgreSQL's ``tarCreateHeader`` builds
  them, ``backup_label`` and ``tablespace_map`` with the contents ``pg_backup_stop`` returns
  (so ``pg_tblspc`` is sent empty, as pg_basebackup does when it sends a tablespace map;
  ``backup base`` refuses clusters with extra tablespaces anyway), ``global/pg_control`` read after every
  other file, and a ``backup_manifest`` in PostgreSQL's format (without file checksums)
  whose WAL range gives the stop LSN. The member order differs (``backup_label`` comes
  after the data files, since PostgreSQL 15+ hands its content out only at the stop);
  no reader depends on the order.
- What is left out follows PostgreSQL's ``basebackup.c`` (:func:`excluded`): the contents
  of ``pg_wal`` and of the directories in :data:`EXCLUDE_DIR_CONTENTS` (kept as empty
  directories), the files in :data:`EXCLUDE_FILES`, ``pgsql_tmp*``, temporary relations,
  and every fork but ``_init`` of unlogged relations.
- Files changing during the copy are handled as PostgreSQL and pgBackRest do: a file's
  size is taken when the directory is listed and that many bytes are stored; a file
  that shrank is padded with zeros, one that grew is cut, one that vanished before it was
  opened is left out (WAL replay from the backup's start recreates all of it). The counts
  are reported (:class:`CopyChanges`).
- Backup mode lives in one held session: ``pg_backup_start`` on a connection of its own,
  ``pg_backup_stop`` on the same one; if anything fails (or the process dies) the session
  ends and PostgreSQL aborts the backup mode itself.
- The WAL is not in the tar (as with ``-X none``). ``pg_backup_stop`` does not wait for the
  archiver (as pgBackRest calls it), so the tar's end and upload go on while the stop
  segment is archived; the caller then waits until the repository's archive holds the
  whole range (:func:`backup_tool.physical.basebackup.wal_wait_verdict`) before any
  manifest exists.
- With data checksums on, every relation page is verified as pg_basebackup verifies it
  (:mod:`backup_tool.physical.pagecheck`, loaded only then, on the reader threads); any
  failure fails the backup once every file has been read, naming the files and blocks
  (:class:`~backup_tool.errors.PageChecksumError`), before ``pg_backup_stop``.

:func:`probe` proves the data directory is the connected server's own (the server's
``data_directory`` exists here, or the one given, and its ``global/pg_control`` is the file
the server reads: same system identifier, last update and checkpoint, so neither another
cluster nor a standby or copy of this one passes); :func:`choose_method` decides from that,
purely.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import functools
import hashlib
import json
import os
import re
import stat
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

import psycopg

from backup_tool.core import walnames
from backup_tool.errors import BackupToolError, DatabaseError, PageChecksumError, RefusedError
from backup_tool.postgres.connection import ConnInfo
from backup_tool.streams import pipeline, testhooks

if TYPE_CHECKING:
    from backup_tool.physical.pagecheck import PageVerifier, PieceCheck

PIECE = 4 << 20
FLUSH = 1 << 20
TAR_BLOCK = 512
PG_FILE_MODE = 0o600
PG_DIR_MODE = 0o700

EXCLUDE_DIR_CONTENTS = frozenset({"pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial",
                                  "pg_snapshots", "pg_subtrans"})
EXCLUDE_FILES = frozenset({"postgresql.auto.conf.tmp", "current_logfiles.tmp", "backup_label", "tablespace_map",
                           "backup_manifest", "postmaster.pid", "postmaster.opts"})
EXCLUDE_PREFIXES = ("pg_internal.init", "pgsql_tmp")
RELATION_FILE = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?$")
TEMP_RELATION = re.compile(r"^t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?$")
CONTROL_FILE = "global/pg_control"
REPORTED_PER_FILE = 5


class BaseMethod(StrEnum):
    """How ``backup base`` copies the cluster: ``auto`` reads the data directory when
    :func:`probe` proves it is the cluster's, else runs pg_basebackup."""

    AUTO = "auto"
    DIRECT = "direct"
    PG_BASEBACKUP = "pg_basebackup"


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` found: the readable data directory, or why there is none."""

    data_directory: Path | None
    reason: str = ""
    page_checksums: bool = False


def choose_method(requested: BaseMethod, found: Probe) -> tuple[BaseMethod, str]:
    """The method to use and, when ``auto`` falls back to pg_basebackup, why; a forced
    ``direct`` whose data directory was not proved is refused. Data checksums do not matter:
    direct mode verifies pages as pg_basebackup does."""
    if requested is BaseMethod.PG_BASEBACKUP:
        return requested, "requested"
    if found.data_directory is not None:
        return BaseMethod.DIRECT, "the data directory is readable here"
    if requested is BaseMethod.DIRECT:
        raise RefusedError(f"cannot take a direct base backup: {found.reason}",
                           "run backup-tool on the database host as the cluster's OS user (or root), "
                           "give --data-directory, or use --method pg_basebackup")
    return BaseMethod.PG_BASEBACKUP, found.reason


@dataclass(frozen=True)
class ControlHead:
    """The head of ``pg_control`` (unchanged from PostgreSQL 9.x through 18): system
    identifier, time of its last update (epoch seconds) and the last checkpoint's LSN."""

    system_identifier: int
    modified: int
    checkpoint_lsn: int

    @classmethod
    def parse(cls, data: bytes) -> ControlHead:
        """From the file's first 40 bytes (native byte order, as the server writes them)."""
        if len(data) < 40:
            raise ValueError("pg_control is shorter than 40 bytes")
        order = sys.byteorder
        return cls(int.from_bytes(data[0:8], order), int.from_bytes(data[24:32], order, signed=True),
                   int.from_bytes(data[32:40], order))


CONTROL_SQL = ("SELECT s.system_identifier, extract(epoch FROM s.pg_control_last_modified)::bigint,"
               " c.checkpoint_lsn::text FROM pg_control_system() s, pg_control_checkpoint() c")
PROBE_ATTEMPTS = 3


def same_control(local: ControlHead, server: ControlHead) -> str:
    """Why the local ``pg_control`` is not the connected server's ("" when it is): another
    cluster, or the same cluster's file at another moment (a standby or a copy, whose
    files the server's backup mode would not cover)."""
    if local.system_identifier != server.system_identifier:
        return (f"belongs to another cluster (system identifier {local.system_identifier}, "
                f"the server's is {server.system_identifier})")
    if (local.modified, local.checkpoint_lsn) != (server.modified, server.checkpoint_lsn):
        return ("holds this cluster's pg_control as of another moment (checkpoint "
                f"{walnames.format_lsn(local.checkpoint_lsn)}, the server's is "
                f"{walnames.format_lsn(server.checkpoint_lsn)}): a standby or a copy, not the server's own files")
    return ""


def probe(conn: psycopg.Connection[Any], given: Path | None) -> Probe:
    """Whether this process can read the connected cluster's data directory (``given``, or
    the server's ``data_directory``): its ``global/pg_control`` must be the very file the
    server reads (:func:`same_control`, re-read a few times should a checkpoint land in
    between), the server must be a primary and the role allowed backup mode."""
    try:
        row = conn.execute(
            "SELECT pg_is_in_recovery(),"
            " has_function_privilege('pg_catalog.pg_backup_start(text, boolean)', 'EXECUTE'),"
            " (SELECT setting FROM pg_settings WHERE name = 'data_directory'),"
            " current_setting('data_checksums') = 'on'").fetchone()
    except psycopg.Error as exc:
        return Probe(None, f"the server did not say where its data directory is ({exc})")
    assert row is not None
    in_recovery, may_backup, server_dir, page_checksums = row
    if in_recovery:
        return Probe(None, "the server is a standby (direct backups are taken from a primary)")
    if not may_backup:
        return Probe(None, "the role may not run pg_backup_start")
    where = given or (Path(server_dir) if server_dir else None)
    if where is None:
        return Probe(None, "the role may not read the data_directory setting (grant pg_read_all_settings)")
    why = ""
    for _ in range(PROBE_ATTEMPTS):
        try:
            found = conn.execute(CONTROL_SQL).fetchone()
        except psycopg.Error as exc:
            return Probe(None, f"the server did not show its pg_control ({exc})")
        assert found is not None
        server = ControlHead(int(found[0]), int(found[1]), walnames.parse_lsn(found[2]))
        try:
            local = ControlHead.parse((where / CONTROL_FILE).read_bytes()[:40])
        except (OSError, ValueError) as exc:
            return Probe(None, f"cannot read {where / CONTROL_FILE} here ({exc.__class__.__name__}: {exc})")
        why = same_control(local, server)
        if not why or local.system_identifier != server.system_identifier:
            break
    return Probe(None, f"{where} {why}") if why else Probe(where, page_checksums=bool(page_checksums))


def excluded(parent: str, name: str) -> bool:
    """Whether PostgreSQL's base backup leaves out the entry ``name`` of the directory
    ``parent`` (relative to the data directory, "" for the top) entirely."""
    if name.startswith(EXCLUDE_PREFIXES) or name in EXCLUDE_FILES:
        return True
    if not _is_database_dir(parent):
        return False
    return bool(TEMP_RELATION.match(name))


def _is_database_dir(parent: str) -> bool:
    head, _, last = parent.rpartition("/")
    return head == "base" and last.isdigit()


def unlogged_skip(names: set[str], name: str) -> bool:
    """A non-init fork of an unlogged relation (a ``<relfilenode>_init`` beside it)."""
    m = RELATION_FILE.match(name)
    return m is not None and m.group(2) != "init" and f"{m.group(1)}_init" in names


@dataclass(frozen=True)
class Entry:
    """One tar member to write: ``kind`` ``f`` or ``d``; ``size`` as listed."""

    name: str
    kind: str
    size: int
    mode: int
    mtime: int
    uid: int
    gid: int


def _entry(name: str, st: os.stat_result, kind: str) -> Entry:
    mode = st.st_mode
    if kind == "d" and stat.S_ISLNK(mode):
        mode = stat.S_IFDIR | PG_DIR_MODE
    return Entry(name, kind, st.st_size if kind == "f" else 0, mode, int(st.st_mtime), st.st_uid, st.st_gid)


def list_files(root: Path, major: int, warn: Callable[[str], None]) -> list[Entry]:
    """Every member PostgreSQL's base backup would send from ``root`` except
    ``global/pg_control`` (sent last), in directory order, sizes as of now."""
    out: list[Entry] = []

    def walk(rel: str) -> None:
        path = root / rel if rel else root
        try:
            names = sorted(os.listdir(path))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _unreadable(path, exc) from None
        present = set(names)
        is_db = _is_database_dir(rel)
        for name in names:
            child = f"{rel}/{name}" if rel else name
            if excluded(rel, name) or (is_db and unlogged_skip(present, name)) or child == CONTROL_FILE:
                continue
            try:
                st = os.lstat(root / child)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _unreadable(root / child, exc) from None
            if name in EXCLUDE_DIR_CONTENTS:
                out.append(_entry(child, st, "d"))
                continue
            if child == "pg_wal":
                wal_dir = _entry(child, st, "d")
                out.append(wal_dir)
                out.append(Entry("pg_wal/archive_status", "d", 0, wal_dir.mode, wal_dir.mtime, wal_dir.uid,
                                 wal_dir.gid))
                if major >= 17:
                    out.append(Entry("pg_wal/summaries", "d", 0, wal_dir.mode, wal_dir.mtime, wal_dir.uid,
                                     wal_dir.gid))
                continue
            if stat.S_ISDIR(st.st_mode):
                out.append(_entry(child, st, "d"))
                if child != "pg_tblspc":
                    walk(child)
            elif stat.S_ISREG(st.st_mode):
                out.append(_entry(child, st, "f"))
            else:
                warn(f"skipping special file {child}")

    walk("")
    return out


def _number(value: int, length: int) -> bytes:
    if value < 1 << ((length - 1) * 3):
        return f"{value:0{length - 1}o} ".encode()
    return b"\x80" + value.to_bytes(length - 1, "big")


def tar_header(entry: Entry) -> bytes:
    """The 512-byte header PostgreSQL's ``tarCreateHeader`` writes for ``entry``."""
    name = entry.name.encode()
    if entry.kind == "d":
        name += b"/"
    if len(name) > 99:
        raise BackupToolError(f"file name too long for tar format: {entry.name}",
                              "use --method pg_basebackup (which refuses it too) or shorten the path")
    h = bytearray(TAR_BLOCK)
    h[0:len(name)] = name
    h[100:108] = _number(entry.mode & 0o7777, 8)
    h[108:116] = _number(entry.uid, 8)
    h[116:124] = _number(entry.gid, 8)
    h[124:136] = _number(entry.size if entry.kind == "f" else 0, 12)
    h[136:148] = _number(entry.mtime, 12)
    h[156:157] = b"5" if entry.kind == "d" else b"0"
    h[257:262] = b"ustar"
    h[263:265] = b"00"
    h[265:273] = b"postgres"
    h[297:305] = b"postgres"
    h[329:337] = _number(0, 8)
    h[337:345] = _number(0, 8)
    h[148:156] = _number(sum(h[:148]) + 8 * 32 + sum(h[156:]), 8)
    return bytes(h)


def _padding(size: int) -> bytes:
    return b"\0" * ((-size) % TAR_BLOCK)


def backup_manifest(files: list[tuple[str, int, int]], timeline: int, start_lsn: str, stop_lsn: str,
                    major: int, system_identifier: int) -> bytes:
    """A ``backup_manifest`` as PostgreSQL writes it with ``--manifest-checksums=NONE``:
    ``files`` are (path, size, mtime); version 2 (with the system identifier) from 17 on."""
    head = '{ "PostgreSQL-Backup-Manifest-Version": ' + ("2" if major >= 17 else "1") + ",\n"
    if major >= 17:
        head += f'"System-Identifier": {system_identifier},\n'
    lines = [f'{{ "Path": {json.dumps(p)}, "Size": {s}, "Last-Modified": '
             f'"{time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime(m))}" }}' for p, s, m in files]
    body = (head + '"Files": [\n' + ",\n".join(lines) + '\n],\n"WAL-Ranges": [\n'
            + f'{{ "Timeline": {timeline}, "Start-LSN": "{start_lsn}", "End-LSN": "{stop_lsn}" }}' + "\n],\n")
    digest = hashlib.sha256(body.encode()).hexdigest()
    return (body + f'"Manifest-Checksum": "{digest}"}}\n').encode()


@dataclass
class CopyChanges:
    """Files that changed between listing and copying (see the module docstring)."""

    files: int = 0
    grew: int = 0
    shrank: int = 0
    vanished: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"files": self.files, "grew": self.grew, "shrank": self.shrank, "vanished": self.vanished}


@dataclass(frozen=True)
class _Piece:
    """Bytes ``[offset, offset + length)`` of a file; the first piece carries the member's
    header before them and the last its padding after, so that a member's frames are
    single chunks (no copy in the compressor)."""

    entry: Entry
    offset: int
    length: int
    first: bool
    last: bool

    @property
    def stored(self) -> int:
        return (TAR_BLOCK if self.first else 0) + self.length + ((-self.entry.size) % TAR_BLOCK if self.last else 0)


@dataclass(frozen=True)
class _Read:
    """A piece as stored (header, data zero-filled where the file had shrunk, padding), or
    ``data`` None: the file is gone; ``check`` what verifying its pages found (None: not verified)."""

    data: bytearray | None
    short: bool = False
    grew: bool = False
    check: PieceCheck | None = None


class _Buffers:
    """Read buffers of :data:`PIECE` bytes, each reused once nothing but this pool refers to
    it (a consumer still holding the chunk, a memoryview of it or a numpy array over it keeps
    a reference): a fresh 4 MiB buffer costs a page fault per 4 KiB and zero-filling, a
    reused one neither. Pieces of half a :data:`PIECE` or more get a pooled buffer cut to
    their size (a bytearray keeps its allocation when shrunk by less than half); at most
    ``keep`` are pooled, beyond that and for smaller pieces buffers are plain allocations.
    The idle reference count is measured, not assumed, so an interpreter that counts
    references differently finds no buffer idle rather than a busy one idle."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.reused = 0
        self._owned: list[bytearray] = [bytearray(0)]
        self._idle = _refs(self._owned, 0)
        self._owned.clear()
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes whose content is arbitrary (zeros when new)."""
        if not PIECE // 2 <= size <= PIECE:
            return bytearray(size)
        with self._lock:
            owned = self._owned
            for i in range(len(owned)):
                if _refs(owned, i) == self._idle:
                    self.reused += 1
                    buf = owned[i]
                    if len(buf) > size:
                        del buf[size:]
                    else:
                        buf += _zeros()[:size - len(buf)]
                    return buf
            buf = bytearray(size)
            if len(owned) < self.keep:
                owned.append(buf)
            return buf

    def release(self) -> None:
        """Let go of the pooled buffers (the copy is over); :attr:`reused` stays."""
        with self._lock:
            self._owned.clear()


@functools.cache
def _zeros() -> memoryview:
    return memoryview(bytes(PIECE))


def _refs(owned: list[bytearray], i: int) -> int:
    return sys.getrefcount(owned[i])


def _read_piece(root: Path, piece: _Piece, verifier: PageVerifier | None = None,
                buffers: _Buffers | None = None) -> _Read:
    path = root / piece.entry.name
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _Read(None)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    buf = buffers.take(piece.stored) if buffers is not None else bytearray(piece.stored)
    start = TAR_BLOCK if piece.first else 0
    if piece.first:
        buf[:TAR_BLOCK] = tar_header(piece.entry)
    view = memoryview(buf)[start:start + piece.length]
    done = 0
    try:
        while done < piece.length:
            n = os.preadv(fd, [view[done:]], piece.offset + done)
            if not n:
                break
            done += n
        if done < piece.length:
            view[done:] = _zeros()[:piece.length - done]
        if piece.last and start + piece.length < len(buf):
            buf[start + piece.length:] = _zeros()[:len(buf) - start - piece.length]
        grew = piece.last and os.fstat(fd).st_size > piece.entry.size
        check = (verifier.check(fd, view[:done], piece.entry.name, piece.offset, piece.last and done == piece.length)
                 if verifier is not None else None)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    finally:
        view.release()
        os.close(fd)
    return _Read(buf, short=done < piece.length, grew=grew, check=check)


def _unreadable(path: Path, exc: OSError) -> BackupToolError:
    hint = ("run backup-tool as the cluster's OS user (or root), or use --method pg_basebackup"
            if exc.errno in (errno.EACCES, errno.EPERM) else "check the data directory's disk")
    return BackupToolError(f"cannot read {path} for the direct base backup: {exc.strerror}", hint)


def _pieces(entries: list[Entry]) -> Iterator[_Piece]:
    """Each file's pieces: the first :data:`PIECE` bytes less its header, then :data:`PIECE`
    each (a big member's frames start at its header, see :mod:`basetar`)."""
    for e in entries:
        if e.kind != "f":
            continue
        off = 0
        while True:
            n = min(PIECE - (TAR_BLOCK if off == 0 else 0), e.size - off)
            yield _Piece(e, off, n, off == 0, off + n == e.size)
            off += n
            if off == e.size:
                break


class DirectBackup:
    """One direct base backup of the data directory ``root``: :meth:`stream` is the tar,
    :attr:`changes` counts the files that changed during the copy once it has run and
    :attr:`pages_verified` the pages whose checksum was verified (``verify_checksums``: the
    cluster has data checksums on)."""

    def __init__(self, conninfo: ConnInfo, root: Path, major: int, system_identifier: int, label: str,
                 fast: bool, jobs: int, warn: Callable[[str], None], verify_checksums: bool = False) -> None:
        self.conninfo = conninfo
        self.root = root
        self.major = major
        self.system_identifier = system_identifier
        self.label = label
        self.fast = fast
        self.jobs = max(1, jobs)
        self.warn = warn
        self.verify_checksums = verify_checksums
        self.verifier: PageVerifier | None = None
        self.changes = CopyChanges()
        self.pages_verified = 0
        self.checksum_failures: dict[str, list[int]] = {}
        self._buffers = _Buffers(0)

    def stream(self) -> Iterator[bytes]:
        """The tar, start to end; backup mode begins when the first chunk is asked for and
        ends (``pg_backup_stop``, or the session closing on any failure) before the last."""
        session = self.conninfo.connect(settings={"statement_timeout": "0"})
        try:
            try:
                started = session.execute("SELECT pg_backup_start(%s, %s)::text, current_setting('block_size')::int,"
                                          " pg_size_bytes(current_setting('segment_size'))"
                                          " / current_setting('block_size')::int",
                                          (self.label, self.fast)).fetchone()
            except psycopg.Error as exc:
                raise DatabaseError(f"pg_backup_start failed: {exc}") from None
            assert started is not None
            if self.verify_checksums:
                self.verifier = _verifier(walnames.parse_lsn(started[0]), int(started[1]), int(started[2]))
            entries = list_files(self.root, self.major, self.warn)
            testhooks.pause_point("base:direct-copy")
            manifest_files: list[tuple[str, int, int]] = []
            yield from self._members(entries, manifest_files)
            if self.checksum_failures:
                raise checksum_error(self.checksum_failures)
            try:
                control_stat = os.stat(self.root / CONTROL_FILE)
                control = (self.root / CONTROL_FILE).read_bytes()
            except OSError as exc:
                raise _unreadable(self.root / CONTROL_FILE, exc) from None
            try:
                stop = session.execute("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)").fetchone()
            except psycopg.Error as exc:
                raise DatabaseError(f"pg_backup_stop failed: {exc}") from None
            assert stop is not None
        finally:
            session.close()
        stop_lsn, labelfile, spcmap = stop
        owner = os.stat(self.root / "PG_VERSION")
        now = int(time.time())
        out = bytearray()
        for name, content in (("backup_label", labelfile.encode()), ("tablespace_map", (spcmap or "").encode())):
            out += self._inline(Entry(name, "f", len(content), PG_FILE_MODE, now, owner.st_uid, owner.st_gid),
                                content, manifest_files)
        out += self._inline(Entry(CONTROL_FILE, "f", len(control), control_stat.st_mode, int(control_stat.st_mtime),
                                  control_stat.st_uid, control_stat.st_gid), control, manifest_files)
        timeline = _label_timeline(labelfile)
        manifest = backup_manifest(manifest_files, timeline, _label_start(labelfile), stop_lsn, self.major,
                                   self.system_identifier)
        out += tar_header(Entry("backup_manifest", "f", len(manifest), PG_FILE_MODE, now, owner.st_uid,
                                owner.st_gid)) + manifest + _padding(len(manifest))
        out += b"\0" * (2 * TAR_BLOCK)
        yield bytes(out)

    @staticmethod
    def _inline(entry: Entry, content: bytes, files: list[tuple[str, int, int]]) -> bytes:
        files.append((entry.name, entry.size, entry.mtime))
        return tar_header(entry) + content + _padding(len(content))

    def _members(self, entries: list[Entry], files: list[tuple[str, int, int]]) -> Iterator[bytes]:
        """Headers and data of ``entries``, file pieces read on ``jobs`` threads at most
        ``2 * jobs + 2`` pieces ahead of the writer (memory: that many :data:`PIECE`; the
        :class:`_Buffers` pool keeps no more than that, so reuse never raises the peak). Big
        pieces are passed on as the reader filled them (bytearrays, written again only once
        nothing refers to them: the compressor and the scanner only read them through the
        buffer protocol); runs of small members go out as the bytearray that gathered them,
        never written again either."""
        changes = self.changes
        pool = cf.ThreadPoolExecutor(self.jobs, thread_name_prefix="pgread")
        inflight: deque[tuple[_Piece, cf.Future[_Read]]] = deque()
        todo = _pieces(entries)
        depth = 2 * self.jobs + 2
        buffers = self._buffers = _Buffers(depth)
        out = bytearray()

        def refill() -> None:
            while len(inflight) < depth:
                piece = next(todo, None)
                if piece is None:
                    return
                inflight.append((piece, pool.submit(_read_piece, self.root, piece, self.verifier, buffers)))

        try:
            refill()
            for entry in entries:
                if entry.kind != "f":
                    out += tar_header(entry)
                    continue
                changes.files += 1
                shrank = skipping = False
                while True:
                    pipeline.check_cancelled()
                    piece, fut = inflight.popleft()
                    refill()
                    got = fut.result()
                    if got.check is not None:
                        self._checked(entry.name, got.check)
                    if piece.first:
                        skipping = got.data is None
                        if skipping:
                            changes.vanished += 1
                        else:
                            files.append((entry.name, entry.size, entry.mtime))
                    if not skipping:
                        data = got.data if got.data is not None else bytearray(piece.stored)
                        shrank = shrank or got.data is None or got.short
                        if len(data) >= FLUSH:
                            if out:
                                yield cast(bytes, out)
                                out = bytearray()
                            yield cast(bytes, data)
                        else:
                            out += data
                        if piece.last:
                            changes.shrank += shrank
                            changes.grew += got.grew and not shrank
                    if len(out) >= FLUSH:
                        yield cast(bytes, out)
                        out = bytearray()
                    if piece.last:
                        break
            if out:
                yield cast(bytes, out)
        finally:
            for _, fut in inflight:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            buffers.release()


    def _checked(self, name: str, check: PieceCheck) -> None:
        """Count a piece's verified pages and failures, warning of the first few of each
        file's failures and of a partial last page, as PostgreSQL does."""
        self.pages_verified += check.verified
        for failure in check.failures:
            blocks = self.checksum_failures.setdefault(name, [])
            blocks.append(failure.block)
            if len(blocks) <= REPORTED_PER_FILE:
                self.warn(f"checksum verification failed in file {name}, block {failure.block}: "
                          f"calculated {failure.calculated:X} but expected {failure.stored:X}")
            if len(blocks) == REPORTED_PER_FILE:
                self.warn(f"further checksum verification failures in file {name} will not be reported")
        if check.partial_tail:
            self.warn(f"could not verify the checksum of the last page of {name}: "
                      "its size is not a multiple of the page size")


def _verifier(start_lsn: int, block_size: int, segment_blocks: int) -> PageVerifier:
    """The page verifier of a backup started at ``start_lsn``; numpy is loaded here, so only
    direct backups of clusters with data checksums pay for it."""
    from backup_tool.physical import pagecheck

    return pagecheck.PageVerifier(start_lsn, block_size, segment_blocks)


def checksum_error(failures: dict[str, list[int]]) -> PageChecksumError:
    """The error of a copy whose pages failed verification (``failures``: each file's
    failing blocks, in copy order): counts, then the first files and blocks."""
    total = sum(len(b) for b in failures.values())
    shown = [f"{name} (block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks[:3]))}"
             f"{', ...' if len(blocks) > 3 else ''})" for name, blocks in list(failures.items())[:3]]
    more = f" and {len(failures) - 3} more file(s)" if len(failures) > 3 else ""
    return PageChecksumError(
        f"checksum verification failed for {total} page{'s' if total > 1 else ''} in {len(failures)} "
        f"file{'s' if len(failures) > 1 else ''} of the cluster: {'; '.join(shown)}{more}; no backup was kept",
        "the cluster's data files are damaged (PostgreSQL reports 'invalid page' reading them, and "
        "pg_basebackup fails the same way): check the storage, then repair or restore the affected "
        "relations first (pg_filenode_relation(0, N) in its database names the relation of base/<db>/N; "
        "pg_filenode_relation(1664, N) that of global/N)",
        tuple((name, block) for name, blocks in failures.items() for block in blocks))


def _label_start(label: str) -> str:
    m = re.search(r"^START WAL LOCATION: (\S+)", label, re.M)
    if not m:
        raise BackupToolError("pg_backup_stop returned a backup_label without a START WAL LOCATION",
                              "report this as a bug")
    return m.group(1)


def _label_timeline(label: str) -> int:
    m = re.search(r"^START TIMELINE: (\d+)", label, re.M)
    return int(m.group(1)) if m else 1

