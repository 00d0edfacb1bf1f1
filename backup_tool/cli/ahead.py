"""``restore tables`` reads its repository ahead: the entry point forks a process that makes
the command's first repository reads (S3 client start, the catalog and manifests, the schema
archive, the first data object) while the command itself loads Typer and psycopg, opens the
target session and creates the table. Threads cannot do this: importing and starting an S3
client is CPU under the GIL. The reads are journalled and answered by
:class:`backup_tool.repository.storage.ahead.ReplayBackend` (see that module for what is
answered from the journal and what goes to the store).

The modules both processes use (the catalog, the selection of tables) are loaded before
the fork, once; boto3 is loaded by the reading process only, psycopg by the command only.

Guarantees:

- Only a plain ``restore tables`` command line this module's parser fully understands, with
  an S3 repository, on a system with ``fork`` and ``memfd_create``; anything else (an option
  it does not know, ``--help``, ``--target-time``, a local repository,
  ``BACKUP_TOOL_READ_AHEAD=0``) runs the command exactly as before, without a fork.
- The reading process is a fork, not a new program: nothing reaches it through a command line
  or the environment that the command did not already hold, so no secret ever appears in
  argv. It writes nothing to the store, nothing to stdout or stderr (both /dev/null), and no
  file (its journal is an anonymous memfd).
- It never outlives the command: killed and reaped when the restore returns or fails and at
  exit (:func:`stop`), killed by the kernel if the command is killed (``PR_SET_PDEATHSIG``),
  and Ctrl-C stops it with the command.
- Its failures are never reported: a read it could not make is made by the command, which
  reports any failure exactly as it did without the read-ahead (same message, same exit code).

``backup full`` and ``backup incremental`` read ahead on a thread instead (:func:`start_backup`):
they need an S3 client of their own anyway (they write), so the entry point builds it first
and a thread makes, while Typer, psycopg and the backup's modules load, the reads the backup
starts with: the key guard's (:mod:`backup_tool.repository.keyguard`), the catalog's listing
and index, the newest manifests the index does not vouch for, and, for an incremental, the
newest manifest of the database (its parent, unless the policy starts a new chain) and the WAL
archive's identity. The listings and the identity go out at once, then the index and the
manifests, each on a daemon thread (a command that stops early exits at once). The same
journal carries them (in one process), answered with ``lists_once``: the listing the backup
makes again once it holds its lock comes from the store, as do the reads of anything it wrote.
The same command lines qualify as above (an S3 repository, options this module's parser
knows); the thread writes nothing and its failures are never reported.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from backup_tool.config.locations import repo_url
from backup_tool.core.kinds import LOGICAL_KINDS
from backup_tool.core.threads import spawn
from backup_tool.logical.selection import read_ahead, split_names
from backup_tool.repository.catalog import LOAD_THREADS, Catalog, DatabaseHint, manifest_key
from backup_tool.repository.catalog_index import IndexEntry, read_index
from backup_tool.repository.keyguard import key_marker, recorded_key_ids
from backup_tool.repository.storage import Storage, open_backend, open_repository, open_storage
from backup_tool.repository.storage.ahead import Journal, JournalReader, RecordingBackend, ReplayBackend
from backup_tool.repository.storage.encrypted import encryption_of
from backup_tool.repository.walidentity import ARCHIVE_INFO_KEY
from backup_tool.streams.pipes import widen_pipe

DISABLE_ENV = "BACKUP_TOOL_READ_AHEAD"
PAUSE_POINT = "ahead:planned"
AHEAD_TABLES = 4
"""Tables whose first object is read ahead when ``--jobs`` is not given (the policy is not
loaded for this: an object read ahead that the restore reads later is still answered)."""

_VALUES = {"--tables": "tables", "--backup": "backup", "--jobs": "jobs", "-j": "jobs", "--database": "database",
           "--repo": "repo", "--dsn": "dsn", "--policy": "",
           "--target-dsn": "", "--into-schema": "", "--wait": "", "--pg-bin": ""}
_FLAGS = {"--with-roles": "with_roles", "--replace": "", "--json": "", "--debug": ""}


@dataclass(frozen=True)
class AheadRequest:
    """What the reading process needs of a ``restore tables`` command line."""

    tables: str
    repo: str | None = None
    backup: str | None = None
    database: str | None = None
    dsn: str | None = None
    jobs: int | None = None
    with_roles: bool = False


def parse_request(argv: list[str]) -> AheadRequest | None:
    """``argv`` (after the program name) as a ``restore tables`` command the read-ahead
    serves, or None: another command, ``--help``, ``--target-time`` or ``--full-layout``, an
    option or argument it does not know, an option without its value, no ``--tables``, or a
    ``--jobs`` that is not a number from 1 to 64. The last of a repeated option wins, as in
    Click. Pure."""
    if argv[:2] != ["restore", "tables"]:
        return None
    parsed = _options(argv[2:], _VALUES, _FLAGS)
    if parsed is None:
        return None
    found, flags = parsed
    jobs = found.get("jobs")
    if not found.get("tables") or not _jobs_ok(jobs):
        return None
    return AheadRequest(tables=found["tables"], repo=found.get("repo"), backup=found.get("backup"),
                        database=found.get("database"), dsn=found.get("dsn"),
                        jobs=int(jobs) if jobs is not None else None, with_roles="with_roles" in flags)


def _options(rest: list[str], values: dict[str, str], flags: dict[str, str]) -> tuple[dict[str, str], set[str]] | None:
    """The options of a command line's ``rest`` (after the command's words): each value option's
    value under its name in ``values``, each flag's name in ``flags``; None for an option or
    argument neither knows, or an option without its value. ``-jN`` is ``-j N``; the last of a
    repeated option wins, as in Click. Pure."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    i = 0
    while i < len(rest):
        token = rest[i]
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in values and token.startswith("-j") and token[2:].isdigit():
            name, eq, value = "-j", "=", token[2:]
        if name in flags and not eq:
            seen.add(flags[name])
        elif name in values:
            if not eq:
                if i + 1 >= len(rest):
                    return None
                i += 1
                value = rest[i]
            found[values[name]] = value
        else:
            return None
        i += 1
    return found, seen


def _jobs_ok(jobs: str | None) -> bool:
    """Whether a ``--jobs`` value is one the command accepts (a number from 1 to 64), or absent."""
    return jobs is None or (jobs.isascii() and jobs.isdigit() and 1 <= int(jobs) <= 64)


_BACKUP_VALUES = {"--repo": "repo", "--dsn": "", "--policy": "", "--jobs": "jobs", "-j": "jobs", "--lock-timeout": "",
                  "--pg-bin": ""}
_BACKUP_FLAGS = {"--json": "", "--debug": ""}


@dataclass(frozen=True)
class BackupAhead:
    """What the reading thread needs of a ``backup full|incremental`` command line."""

    incremental: bool
    repo: str | None = None


def parse_backup(argv: list[str]) -> BackupAhead | None:
    """``argv`` (after the program name) as a ``backup full|incremental`` command whose reads
    are made ahead, or None: another command, ``--help``, an option or argument this parser
    does not know, an option without its value, a ``--jobs`` that is not a number from 1 to 64
    (the command refuses it at once). The last of a repeated option wins. Pure."""
    if argv[:2] not in (["backup", "full"], ["backup", "incremental"]):
        return None
    parsed = _options(argv[2:], _BACKUP_VALUES, _BACKUP_FLAGS)
    if parsed is None or not _jobs_ok(parsed[0].get("jobs")):
        return None
    found = parsed[0]
    return BackupAhead(argv[1] == "incremental", found.get("repo"))


@dataclass
class _Ahead:
    pid: int | None
    """The reading process; None: a thread of this process reads (:func:`start_backup`)."""
    url: str
    reader: JournalReader
    backend: Storage | None = None
    """The store, opened by this process (a backup's: :func:`start_backup`)."""
    database: _Told | None = None
    """The backup's database, told the reading thread by :func:`backend_for`."""


class _Told:
    """A value one thread tells another once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._value: str | None = None

    def tell(self, value: str | None) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def wait(self) -> str | None:
        self._event.wait()
        return self._value


_AHEAD: _Ahead | None = None


def start(argv: list[str]) -> None:
    """Fork the reading process for this command line, when it qualifies (module docstring)."""
    global _AHEAD
    if _AHEAD is not None or os.environ.get(DISABLE_ENV, "").strip() == "0":
        return
    request = parse_request(argv)
    if request is None or not hasattr(os, "fork") or not hasattr(os, "memfd_create"):
        return
    url = repo_url(request.repo)
    if not url.startswith("s3://"):
        return
    channel = _journal_channel()
    if channel is None:
        return
    data_fd, read_fd, write_fd = channel
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        for fd in (data_fd, read_fd, write_fd):
            os.close(fd)
        return
    if pid == 0:
        os.close(read_fd)
        _child(request, url, parent, Journal(write_fd, data_fd))
    os.close(write_fd)
    _AHEAD = _Ahead(pid, url, JournalReader(read_fd, data_fd))
    import atexit

    atexit.register(stop)


def _journal_channel() -> tuple[int, int, int] | None:
    """(data, read end, write end) of a new journal: an anonymous file for the objects' bytes
    and a pipe for the index lines, widened so the reader never makes the writer wait; None
    where the system gives neither."""
    try:
        data_fd = os.memfd_create("backup-tool-read-ahead", os.MFD_CLOEXEC)
        read_fd, write_fd = os.pipe()
    except OSError:
        return None
    widen_pipe(write_fd)
    return data_fd, read_fd, write_fd


def start_backup(argv: list[str]) -> None:
    """Open the store of a ``backup full|incremental`` command line that qualifies (module
    docstring) and start the thread reading ahead from it."""
    global _AHEAD
    if _AHEAD is not None or os.environ.get(DISABLE_ENV, "").strip() == "0" or not hasattr(os, "memfd_create"):
        return
    request = parse_backup(argv)
    if request is None:
        return
    url = repo_url(request.repo)
    if not url.startswith("s3://"):
        return
    try:
        backend = open_backend(url)
    except Exception:  # noqa: BLE001 - the command opens it again and reports why it cannot
        return
    channel = _journal_channel()
    if channel is None:
        return
    data_fd, read_fd, write_fd = channel
    journal = Journal(write_fd, data_fd)
    database = _Told()

    def read() -> None:
        try:
            journal.hello(backend.url)
            _read_for_backup(request.incremental, open_storage(url, backend=RecordingBackend(backend, journal)),
                             journal, database.wait)
        except BaseException:  # noqa: BLE001 - the backup makes the read itself and reports it
            pass
        finally:
            journal.end()

    threading.Thread(target=read, name="read-ahead", daemon=True).start()
    _AHEAD = _Ahead(None, url, JournalReader(read_fd, data_fd), backend, database)
    import atexit

    atexit.register(stop)


def _read_for_backup(incremental: bool, storage: Storage, journal: Journal,
                     database: Callable[[], str | None]) -> None:
    """The reads a backup starts with (module docstring), independent ones at once: the key
    guard's, the catalog's listing and index, the newest manifests the index does not vouch for
    (the catalog reads them), and for an incremental the WAL archive's identity and the newest
    manifest of the database, once ``database`` has said which it is (the command parses its
    DSN: psycopg, which would parse it here, must not be imported by two threads at once)."""
    key = encryption_of(storage)
    catalog = Catalog(storage)
    guard = (spawn(storage.exists, key_marker(key.key_id), name="read-ahead") if key is not None
             else spawn(recorded_key_ids, storage, name="read-ahead"))
    listing = spawn(catalog.ids, name="read-ahead")
    index = spawn(read_index, storage, name="read-ahead")
    first: list[cf.Future[Any]] = [spawn(_drain, storage, ARCHIVE_INFO_KEY, name="read-ahead")] if incremental else []
    guard.result()  # every listing recorded before the plan: past it, only planned objects are waited for
    ids, vouched = listing.result(), (index.result() or ([], {}))[1]
    unvouched = [i for i in ids if i not in vouched][-LOAD_THREADS:]  # the newest: the rest the backup reads
    loading = [spawn(catalog.load, i, name="read-ahead") for i in unvouched]
    parent = _newest_of(database(), [vouched[i] for i in ids if i in vouched]) if incremental else None
    planned = [manifest_key(i) for i in unvouched] + ([manifest_key(parent)] if parent else [])
    journal.plan(planned + ([ARCHIVE_INFO_KEY] if incremental else []))
    if parent:
        first.append(spawn(_drain, storage, manifest_key(parent), name="read-ahead"))
    for done in (*first, *loading):
        done.result()


def _newest_of(database: str | None, entries: list[IndexEntry]) -> str | None:
    """The newest logical backup of ``database`` among ``entries``: the parent an incremental
    is likeliest to take. Pure."""
    chain = [e for e in entries if database is not None and e.record.get("database") == database
             and e.record.get("kind") in LOGICAL_KINDS]
    return max(chain, key=lambda e: (e.parsed.started_at, e.id)).id if chain else None


def _drain(storage: Storage, key: str) -> None:
    for _ in storage.get_stored(key):
        pass


def backend_for(url: str, database: str | None = None) -> ReplayBackend | None:
    """The store of ``url`` answered by the reads made ahead, when they were made from it;
    else None (and the reading is stopped): the command opens its store as usual.
    ``database``: a backup's (see :func:`start_backup`), None when its DSN names none."""
    ahead = _AHEAD
    if ahead is None:
        return None
    if ahead.database is not None:
        ahead.database.tell(database)
    if url != ahead.url:
        stop()
        return None
    if ahead.backend is not None:
        opened = ahead.backend
        return ReplayBackend(ahead.reader, lambda: opened, lists_once=True)
    return ReplayBackend(ahead.reader, lambda: open_backend(url))


def stop() -> None:
    """Kill the reading process (done or not) and reap it; later reads go to the store. Its
    journal stays open until the process exits: a read still streaming from it finishes."""
    global _AHEAD
    ahead, _AHEAD = _AHEAD, None
    if ahead is None:
        return
    ahead.reader.finish()
    if ahead.pid is None:
        return
    try:
        os.kill(ahead.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(ahead.pid, 0)
    except ChildProcessError:
        pass


def _child(request: AheadRequest, url: str, parent: int, journal: Journal) -> None:
    """The reading process: never returns, never prints, exits when done or on any error.
    It runs without the cyclic garbage collector: importing boto3 and building its client
    set off collections that cost a fifth of this process's CPU (40-65 ms, on the path to
    the manifest the command waits for), and what it reads is bounded (the catalog, the
    manifests, :data:`backup_tool.logical.selection.AHEAD_DATA_BYTES` of data)."""
    code = 0
    gc.disable()
    try:
        _detach(parent)
        _read(request, url, journal)
    except BaseException:  # noqa: BLE001 - the command makes the read itself and reports it
        code = 1
    finally:
        try:
            journal.end()
        finally:
            os._exit(code)


def _detach(parent: int) -> None:
    """Default signal handling (Ctrl-C and SIGTERM end it at once), no terminal output, and
    death with the command (the kernel's parent-death signal, where there is one)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def _read(request: AheadRequest, url: str, journal: Journal) -> None:
    backend = open_backend(url)
    journal.hello(backend.url)
    storage = open_repository(url, backend=RecordingBackend(backend, journal))

    def plan(keys: list[str]) -> None:
        journal.plan(keys)
        if os.environ.get("BACKUP_TOOL_TEST_PAUSE_AT") == PAUSE_POINT:
            from backup_tool.streams import testhooks

            testhooks.pause_point(PAUSE_POINT)

    read_ahead(storage, split_names(request.tables), request.backup, DatabaseHint(request.database, _dbname(request)),
               request.jobs or AHEAD_TABLES, request.with_roles, plan)


def _dbname(request: AheadRequest) -> str | None:
    """The database the command's DSN names (``--dsn``, else ``DATABASE_URL``, else libpq's
    PGDATABASE), as :meth:`Invocation.database` reads it; psycopg loads only for a DSN."""
    dsn = request.dsn if request.dsn is not None else os.environ.get("DATABASE_URL", "")
    if not dsn:
        return os.environ.get("PGDATABASE") or None
    from backup_tool.postgres.connection import database_of

    return database_of(dsn)
