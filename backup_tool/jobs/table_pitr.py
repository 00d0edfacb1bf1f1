"""Table point-in-time recovery: ``restore tables --target-time``.

It combines the two paths: a temporary cluster is recovered to the time from a base backup and
the WAL archive (:mod:`backup_tool.physical.pitr`), and the tables are copied straight from it
into the target by the selective restore (:mod:`backup_tool.logical.restore_tables`: same
refusal rules, ``into_schema`` / ``replace``, validation) with the recovered database as its
source (:mod:`backup_tool.logical.live_tables`: COPY piped into COPY, checksums in the same
snapshot, definitions from ``pg_dump --table`` of it). Everything temporary is removed on
success, failure, Ctrl-C or SIGTERM. The temporary cluster is a scratch one
(``lay_out(scratch=True)``: no fsync, WAL linked from the read-ahead by the shell). It
pauses at the time as a read-only hot standby and the tables are read there, in the state
promotion would leave them, unless ``into_schema`` must move them in it first: then it is
asked to promote while it replays, and promotes at the time instead of pausing, without an
end-of-recovery checkpoint (:func:`backup_tool.physical.pitr.recover` with ``promote``;
:func:`backup_tool.physical.pitr.promote_paused` when the request came after the pause). Once
the tables' rows and checksums are read from it, it is stopped and removed while the target
checksums and indexes them.

The temporary cluster is laid out partially when the base backup allows it: only the files
the tables need are read and written, every other relation is a sparse file
(:mod:`backup_tool.physical.partial` says why that is exact). After recovery the lay-out is
checked against the tables as recovered (replay skipped no block outside the sparse files;
no target file was left sparse); when it does not hold them, the whole base backup is laid
out and recovered instead, so the result never depends on which lay-out was used. The
result's ``recovery_layout`` says which one served and why it fell back, and
``read_paused`` whether the tables were read from the cluster paused at the time.

Recovery to the time stops at the last commit it replays, named by its LSN, when the WAL
read ahead during the lay-out shows where that is (``lay_out(stop_early=True)``; the
result's ``recovery_layout.stopped_at_commit``): the tables are those recovery to the time
gives, without replaying the WAL of transactions in flight at the time.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import fcntl
import functools
import os
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import psycopg

from backup_tool.config.settings import Settings
from backup_tool.core.kinds import BackupKind
from backup_tool.core.report import NullReporter, Reporter
from backup_tool.core.walnames import format_lsn
from backup_tool.errors import (
    BackupToolError,
    DatabaseError,
    NotFoundError,
    UsageError,
)
from backup_tool.logical.live_tables import LiveTables
from backup_tool.logical.loading import BackupOrigin
from backup_tool.logical.restore_tables import check_request, restore_tables_from
from backup_tool.logical.selection import split_name
from backup_tool.physical.pitr import (
    Layout,
    PartialRequest,
    RecoveryPoint,
    Target,
    free_port,
    lay_out,
    parse_time,
    partial_shortfall,
    plan_recovery,
    promote_paused,
    recover,
    server_for,
    terminate_as_interrupt,
)
from backup_tool.postgres import connection as postgres
from backup_tool.postgres.cluster import (
    LocalServer,
    find_bin_dir,
    leftover_postmaster,
    server_os_user,
    stop_leftover,
)
from backup_tool.postgres.connection import ConnInfo, find_tool, quoted_table
from backup_tool.repository.catalog import Catalog
from backup_tool.repository.manifest import Manifest, utc_iso
from backup_tool.repository.storage import open_repository
from backup_tool.streams.background import Background


def restore_tables_at(settings: Settings, target_dsn: str, tables: list[str], target_time: str | datetime,
                      into_schema: str | None = None, replace: bool = False, jobs: int | None = None,
                      reporter: Reporter | None = None, os_user: str | None = None,
                      server_command: str | None = None, wait: float = 0.0, partial_layout: bool = True) -> Any:
    """Restore ``tables`` as they were at ``target_time`` into the target database.

    A temporary cluster is recovered to the time in a private temporary directory (with
    ``partial_layout``, from just the files the tables need when the base backup allows it,
    else from all of it), and the tables are copied from it into the target with the
    selective restore (same refusal rules, ``into_schema`` / ``replace``, validation against
    the recovered rows). The temporary cluster is removed on success, failure, Ctrl-C or SIGTERM;
    when recovery fails its server log is first copied out and named in the error.
    A time the archive cannot reach yet is refused before anything is written (``wait``:
    seconds to wait for it, see :func:`backup_tool.physical.pitr.plan_recovery`). The result's
    ``source`` says the moment recovered: the last commit replayed before ``target_time``.
    """
    check_request(tables, into_schema, replace)
    reporter = reporter or NullReporter()
    bases = Catalog(open_repository(settings.repo_url)).of_kinds([BackupKind.BASE])[0]
    warming = Background(_warm_programs, frozenset(m.server_version_num // 10000 for m in bases),
                         name="probe-programs")
    try:
        return _restore_tables_at(bases, settings, target_dsn, tables, target_time, into_schema, replace, jobs,
                                  reporter, os_user, server_command, wait, partial_layout)
    finally:
        warming.join()


def _restore_tables_at(bases: list[Manifest], settings: Settings, target_dsn: str, tables: list[str],
                       target_time: str | datetime, into_schema: str | None, replace: bool, jobs: int | None,
                       reporter: Reporter, os_user: str | None, server_command: str | None, wait: float,
                       partial_layout: bool) -> Any:
    when = target_time if isinstance(target_time, datetime) else parse_time(target_time)
    target = Target("time", time=when, timeline=_live_timeline(bases, ConnInfo(target_dsn)))
    named = ConnInfo(settings.dsn).params.get("dbname")
    source_db = named or ConnInfo(target_dsn).dbname
    if not source_db:
        raise UsageError("cannot tell which database the tables come from",
                         "name it in --target-dsn (or --dsn)")
    absent = functools.partial(_absent, source_db, when, "--dsn" if named else "--target-dsn")
    with terminate_as_interrupt():
        plan = plan_recovery(settings, target, None, reporter, wait)
        cleared = clear_leftovers(Path(tempfile.gettempdir()))
        if cleared:
            reporter.event("removed scratch directories of interrupted runs", paths=[str(p) for p in cleared])
        work = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
        owner = _claim(work)
        server: LocalServer | None = None
        retiring: threading.Thread | None = None
        removing = False
        succeeded = False
        try:
            work.chmod(0o711)
            user = server_os_user(work / "data", os_user)
            request = PartialRequest(source_db, tuple(split_name(t.strip()) for t in tables)) if partial_layout else None
            layout = lay_out(settings, target, work / "data", None, user, archive=False,
                             server_command=server_command, reporter=reporter, plan=plan,
                             server_binaries=True, partial_for=request, scratch=True, pause=True,
                             stop_early=True)
            priv = work / "s"
            server = server_for(layout, priv, free_port())
            try:
                point = _recover_keeping_log(server, layout, reporter, bool(into_schema),
                                             _first_look(server, layout, source_db, absent))
                wanted, missed = _tables_as_recovered(server, layout, source_db, tables, when, absent)
            except _OtherDatabase as exc:
                missed = [str(exc)]
            if missed:
                reporter.event("the partial lay-out does not hold the tables as recovered; laying out the "
                               "whole base backup", missed=missed)
                server.stop("immediate")
                server = None
                shutil.rmtree(work / "data")
                layout = lay_out(settings, target, work / "data", None, user, archive=False,
                                 server_command=server_command, reporter=reporter, plan=layout.plan,
                                 server_binaries=True, scratch=True, pause=True, stop_early=True)
                server = server_for(layout, priv, free_port())
                point = _recover_keeping_log(server, layout, reporter, bool(into_schema))
                wanted, _ = _tables_as_recovered(server, layout, source_db, tables, when, absent)
            if into_schema and point.paused:
                promote_paused(server)
                point = dataclasses.replace(point, paused=False)
            reporter.event("temporary cluster recovered", time=utc_iso(point.last_transaction_time)
                           if point.last_transaction_time else None, lsn=point.redo_done_lsn,
                           layout="partial" if layout.choice is not None else "full")
            started = time.monotonic()

            def retire_now() -> None:
                nonlocal server, retiring
                retiring = threading.Thread(target=retire, args=(server,), name="retire-scratch-cluster")
                retiring.start()
                server = None

            def retire(scratch: LocalServer) -> None:
                nonlocal removing
                _retire(scratch, None)
                removing = _remove_detached(work)

            jobs = jobs or settings.policy.backup.jobs
            with LiveTables(server.conninfo(source_db), wanted, layout.plan.backup.id, into_schema, jobs,
                            on_settled=retire_now) as live:
                result = restore_tables_from(live, target_dsn, tables, into_schema=into_schema, replace=replace,
                                             jobs=jobs, reporter=reporter, started=started)
            succeeded = True
            return dataclasses.replace(result, backup_id=layout.plan.backup.id, source=BackupOrigin(
                source_db, when, layout.plan.backup.finished_at), recovered_to=point.last_transaction_time,
                recovery_layout={
                    "kind": "partial" if layout.choice is not None else "full",
                    "bytes_written": layout.bytes_written, "bytes_fetched": layout.bytes_fetched,
                    "fallback_because": missed or None, "seconds": round(layout.seconds, 2),
                    "stopped_at_commit": format_lsn(layout.stop.lsn) if layout.stop is not None else None,
                    "read_paused": point.paused})
        finally:
            if retiring is not None:
                retiring.join()
            if server is not None:
                _retire(server, None)
            if not (succeeded and removing):
                shutil.rmtree(work, ignore_errors=True)
            os.close(owner)


PROGRAMS = ("pg_waldump", "psql", "pg_dump", "pg_restore")
"""Run by every table PITR (the plan's reach check, the copy, the definitions), beside
``pg_ctl`` and ``postgres`` (:func:`find_bin_dir`)."""


def _warm_programs(majors: frozenset[int]) -> None:
    """Probe the versions of the PostgreSQL programs a table PITR runs, for ``majors`` (those
    of the repository's base backups), all at once on threads. Each probe is a process start
    that :mod:`backup_tool.postgres.tools` caches per path; made here, they overlap the plan
    instead of each waiting in front of the step that first needs its program. Changes no
    outcome: a program missing or unusable is reported by that step's own lookup."""
    probes: list[Callable[[], object]] = [functools.partial(find_bin_dir, major) for major in majors]
    probes += [functools.partial(find_tool, name, major) for major in majors for name in PROGRAMS]
    with cf.ThreadPoolExecutor(max(1, len(probes)), thread_name_prefix="probe") as pool:
        for future in [pool.submit(probe) for probe in probes]:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - see the docstring: the real lookup reports it
                pass


SCRATCH_PREFIX = "backup-tool-tables-at-"
OWNER_FILE = ".owner"
"""In each scratch directory: locked (``flock``) by the run using it for as long as it runs."""


def _claim(work: Path) -> int:
    """Lock ``work`` for this run (released when the process ends, however it ends)."""
    fd = os.open(work / OWNER_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _remove_detached(work: Path) -> bool:
    """Hand ``work`` (its server stopped) to a detached ``rm -rf``, so that the command ends
    without waiting for the file system to free it; False when that cannot start."""
    try:
        subprocess.Popen(["rm", "-rf", "--", str(work)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError:
        return False
    return True


def clear_leftovers(tmp: Path, min_age: float = 60.0) -> list[Path]:
    """Remove the scratch directories under ``tmp`` that no live run holds (a run killed
    with SIGKILL, or a detached removal that did not finish), stopping the scratch server
    still running in one; returns them. A directory without its owner file (a run claims
    its own a moment after creating it; older versions did not) is taken only when older
    than ``min_age`` seconds and no server runs in it."""
    removed = []
    for path in sorted(tmp.glob(SCRATCH_PREFIX + "*")):
        try:
            fd: int | None = os.open(path / OWNER_FILE, os.O_RDONLY)
        except FileNotFoundError:
            try:
                if time.time() - path.stat().st_mtime < min_age or leftover_postmaster(path / "data") is not None:
                    continue
            except OSError:
                continue
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                stop_leftover(path / "data")
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _retire(server: LocalServer, data: Path | None) -> None:
    """Stop the scratch server and remove its data directory (``data``; None: left to the
    caller). Run beside the restore into the target once the tables are copied out: nothing
    reads the scratch cluster any more."""
    try:
        server.stop("immediate")
    except Exception:  # noqa: BLE001 - the scratch server dies with its directory, removed next
        pass
    if data is not None:
        shutil.rmtree(data, ignore_errors=True)


def _recover_keeping_log(server: LocalServer, layout: Layout, reporter: Reporter,
                         promote: bool, first: Callable[[], None] | None = None) -> RecoveryPoint:
    """Recover (``promote``: promoted at the target; ``first``: the first connection's check;
    see :func:`recover`); on failure keep a copy of the server log and name it. The WAL
    read-ahead stops either way once recovery is over."""
    try:
        return recover(server, layout, None, reporter, promote=promote, first=first)
    except DatabaseError as exc:
        raise DatabaseError(exc.message, f"the server log is kept at {_keep_log(server)}") from exc
    finally:
        layout.stop_prefetch()


def _keep_log(server: LocalServer) -> Path:
    """A copy of the temporary server's log outside the directory about to be removed."""
    fd, name = tempfile.mkstemp(prefix="backup-tool-recovery-", suffix=".log")
    with os.fdopen(fd, "w") as out:
        out.write(server.log_text())
    return Path(name)


class _OtherDatabase(Exception):
    """The database a partial lay-out's scratch cluster connects to is not the one laid out."""


def _absent(source_db: str, when: datetime, named_by: str) -> NotFoundError:
    """The error for a source database the recovered cluster does not have: the tables are
    read from the database ``--dsn`` names, else from the one of ``--target-dsn``'s name."""
    how = ("check the name and the time" if named_by == "--dsn" else
           "the tables are read from the database of --target-dsn's name unless --dsn names "
           "the one they come from; check the name and the time")
    return NotFoundError(f"database {source_db} did not exist at {utc_iso(when)}", how)


def _first_look(server: LocalServer, layout: Layout, source_db: str,
                absent: Callable[[], NotFoundError]) -> Callable[[], None] | None:
    """For a table request's partial lay-out (every other database left out, ``postgres``
    included): the check :func:`recover` makes on its first connection, to ``source_db``.

    The database of that name at the target must be the backup's one, the one laid out
    (renamed or created after the backup, it may be another, maybe a file copy of a database
    left out, whose catalogs are not there). A connection to such a database fails
    (PostgreSQL PANICs on a missing critical catalog and restarts) or, were the catalogs it
    needs there, is answered from ``pg_database``, a shared catalog laid out in full, with
    the other oid: either way :class:`_OtherDatabase` is raised, nothing else has connected,
    and the whole base backup is laid out instead. It runs once recovery reached the time:
    before, the database of that name may still be the backup's one. A database of that
    name the server says does not exist there is reported as such (NotFoundError) at once,
    as without the partial lay-out."""
    choice = layout.choice
    if choice is None or choice.database is None:
        return None
    expected = choice.database

    def look() -> None:
        try:
            with psycopg.connect(server.conninfo(source_db).tool_conninfo(), autocommit=True,
                                 connect_timeout=10) as conn:
                row = conn.execute("SELECT oid::bigint FROM pg_database WHERE datname = current_database()").fetchone()
        except psycopg.Error as exc:
            if f'database "{source_db}" does not exist' in str(exc):
                raise absent() from None
            raise _OtherDatabase(f"database {source_db} cannot be read from the partial lay-out: "
                                 f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
        if row is None or int(row[0]) != expected:
            raise _OtherDatabase(f"database {source_db} (oid {row[0] if row else None}) is not the database of "
                                 "that name in the base backup")
    return look


def _tables_as_recovered(server: LocalServer, layout: Layout, source_db: str, tables: list[str],
                         when: datetime, absent: Callable[[], NotFoundError]
                         ) -> tuple[set[tuple[str, str]], list[str]]:
    """The (schema, name) of ``tables`` in the recovered database, and why a partial
    lay-out does not hold them as recovered (empty: it does, or the lay-out is full). A
    partial lay-out's database was checked to be the backup's one (:func:`_first_look`);
    a database the full lay-out does not have is named (``absent``), not reported as a
    connection failure with a hint for another command."""
    choice = layout.choice
    try:
        conn = server.conninfo(source_db).connect()
    except DatabaseError as exc:
        if f'database "{source_db}" does not exist' in str(exc):
            raise absent() from None
        raise
    with conn:
        wanted = _resolve_live(postgres.list_tables(conn), tables, when)
        if choice is None:
            return wanted, []
        oids = [int(postgres.scalar(conn, "SELECT %s::regclass::oid::bigint", (quoted_table(s, n),)))
                for s, n in sorted(wanted)]
        return wanted, partial_shortfall(conn, layout, server.log_text(), oids)


def _live_timeline(bases: list[Manifest], target: Any) -> int | None:
    """The target server's current timeline when it is the backed-up cluster itself (one of
    ``bases``, the repository's base backups, is of it), so that the tables come from *its*
    history, not from a timeline another recovery forked off."""
    try:
        with target.connect() as conn:
            row = conn.execute("SELECT (SELECT system_identifier FROM pg_control_system())::text,"
                               " (SELECT timeline_id FROM pg_control_checkpoint())").fetchone()
    except (BackupToolError, psycopg.Error):
        return None
    if row is None:
        return None
    same = any(m.system_identifier == row[0] for m in bases)
    return int(row[1]) if same else None


def _resolve_live(live: list[Any], names: list[str], when: datetime) -> set[tuple[str, str]]:
    """(schema, name) of each requested table in the recovered database (exact, then case-insensitive)."""
    known = [(t.schema, t.name) for t in live]
    chosen = set()
    for raw in names:
        schema_name, name = split_name(raw.strip())
        matches = [k for k in known if k[1] == name and (schema_name is None or k[0] == schema_name)]
        if not matches:
            matches = [k for k in known if k[1].lower() == name.lower()
                       and (schema_name is None or k[0].lower() == (schema_name or "").lower())]
        if len(matches) != 1:
            if matches:
                raise UsageError(f"table name {raw!r} is ambiguous at {utc_iso(when)}", "qualify it with its schema")
            raise NotFoundError(f"table {raw!r} did not exist at {utc_iso(when)}",
                                "check the name and the time")
        chosen.add(matches[0])
    return chosen
