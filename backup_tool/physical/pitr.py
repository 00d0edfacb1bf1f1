"""Point-in-time recovery: a base backup plus the WAL archive, replayed to a target.

``restore pitr`` chooses the newest base backup that ends before the target and from
which the archive is continuous up to the target (:func:`choose_base_backup`, a pure
function of the backups, the archive listing and the target); a target outside what the
repository covers is refused, naming the covered window. It then lays the backup out in
an empty data directory (never a non-empty one), writes the recovery settings
(``restore_command`` through this tool and repository, the target in PostgreSQL's own
syntax, ``recovery_target_action = 'promote'``, ``recovery_target_timeline``) and
``recovery.signal``. With ``start`` it runs the server privately (see
:mod:`backup_tool.postgres.cluster`), waits until recovery reached the target and promoted,
reports where it stopped (time, LSN, new timeline), validates every database, and restarts
the server with its own configuration.

Table-level PITR (:mod:`backup_tool.jobs.table_pitr`) recovers a temporary private cluster to the
time, takes a logical backup of just the chosen tables from it into a temporary local
repository, restores them into the target database with selective restore's semantics,
and removes the temporary cluster and repository whatever happens (failure, Ctrl-C,
SIGTERM).

Partial lay-outs (``lay_out(partial_for=...)``, used by table PITR and ``--only-database``):
from a base backup with an index only the files needed are read, by ranged requests, and
every other user relation is a sparse file (:mod:`backup_tool.physical.partial` states why
that is exact and what makes it fall back). The private start then adds
``ignore_invalid_pages`` and turns autovacuum off on its command line only, so neither
outlives recovery; :func:`partial_shortfall` checks the result before anything is read.

Restore points: ``--target-name`` needs to know *where* the named point is to choose a
base backup before it; the archive is scanned with ``pg_waldump`` for the RESTORE_POINT
record, newest base backup first.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import dataclasses
import functools
import mmap
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg

from backup_tool.config.settings import Settings
from backup_tool.core import walnames
from backup_tool.core.kinds import BackupKind
from backup_tool.core.report import NullReporter, Reporter
from backup_tool.core.timestamps import parse_ts
from backup_tool.errors import (
    BackupToolError,
    DatabaseError,
    IntegrityError,
    NotFoundError,
    RefusedError,
    UsageError,
)
from backup_tool.governance import walcoverage
from backup_tool.physical import basetar, partial, wal, walscan, walspool
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import database_level
from backup_tool.postgres.cluster import (
    LocalServer,
    chown_to,
    conf_quote,
    find_bin_dir,
    is_root,
    server_os_user,
    server_tool_command,
    tool_candidates,
    user_can_write,
)
from backup_tool.postgres.connection import find_tool
from backup_tool.repository import walarchive
from backup_tool.repository.catalog import Catalog, of_cluster_holding
from backup_tool.repository.manifest import Manifest, PhysicalInfo, utc_iso
from backup_tool.repository.storage import Storage, open_repository
from backup_tool.streams import pipeline
from backup_tool.streams.background import Background
from backup_tool.validation.validate import Check, ValidationReport, validate

CONF_MARK = "# --- backup-tool restore pitr"
INIT_SYNC = {"recovery_init_sync_method": "syncfs"}


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Where recovery should stop: a time, an LSN, a named restore point, or the archive's end."""

    kind: str
    time: datetime | None = None
    lsn: int | None = None
    name: str | None = None
    timeline: int | None = None

    def describe(self) -> str:
        if self.kind == "time" and self.time is not None:
            return f"time {utc_iso(self.time)}"
        if self.kind == "lsn" and self.lsn is not None:
            return f"LSN {wal.format_lsn(self.lsn)}"
        if self.kind == "name":
            return f"restore point {self.name!r}"
        return "the end of the archive"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "time": utc_iso(self.time) if self.time else None,
                "lsn": wal.format_lsn(self.lsn) if self.lsn is not None else None,
                "name": self.name, "timeline": self.timeline or "latest"}


def parse_time(text: str) -> datetime:
    """The ``--target-time`` value: ISO 8601; a time without zone is UTC."""
    return parse_ts(text, "--target-time")


def make_target(target_time: str | None = None, target_lsn: str | None = None,
                target_name: str | None = None, latest: bool = False,
                timeline: str | None = None) -> Target:
    given = [x for x in (target_time, target_lsn, target_name) if x] + (["latest"] if latest else [])
    if len(given) != 1:
        raise UsageError("give exactly one of --target-time, --target-lsn, --target-name or --latest")
    tli = None
    if timeline and timeline != "latest":
        try:
            tli = int(timeline)
        except ValueError:
            raise UsageError(f"--target-timeline {timeline!r} is not a number or 'latest'") from None
    if target_time:
        return Target("time", time=parse_time(target_time), timeline=tli)
    if target_lsn:
        return Target("lsn", lsn=walnames.parse_lsn(target_lsn), timeline=tli)
    if target_name:
        return Target("name", name=target_name, timeline=tli)
    return Target("latest", timeline=tli)


def pg_timestamp(ts: datetime) -> str:
    """PostgreSQL's own timestamptz text form (``2026-11-24 20:38:49.40895+00``)."""
    text = ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    if ts.microsecond:
        text += f".{ts.astimezone(timezone.utc).microsecond:06d}".rstrip("0")
    return text + "+00"


def recovery_settings(target: Target, restore_command: str, timeline: int | None = None,
                      action: str = "promote") -> dict[str, str]:
    """PostgreSQL's recovery settings for ``target``; ``timeline``: follow exactly this one
    (default: the target's, else the newest in the archive); ``action``: what the server
    does at the target (``promote``, or ``pause`` to be read there as a hot standby)."""
    tli = timeline or target.timeline
    settings = {"restore_command": restore_command,
                "recovery_target_timeline": str(tli) if tli else "latest"}
    if target.kind == "time" and target.time is not None:
        settings["recovery_target_time"] = pg_timestamp(target.time)
    elif target.kind == "lsn" and target.lsn is not None:
        settings["recovery_target_lsn"] = wal.format_lsn(target.lsn)
    elif target.kind == "name" and target.name is not None:
        settings["recovery_target_name"] = target.name
    if target.kind != "latest":
        settings["recovery_target_action"] = action
        settings["recovery_target_inclusive"] = "on"
    return settings


# --------------------------------------------------------------------------- choosing (pure)


@dataclass(frozen=True)
class Plan:
    """The chosen base backup and what the archive lets recovery from it reach."""

    backup: Manifest
    timeline: int
    coverage: wal.Coverage
    window: tuple[datetime, datetime | None]
    path: list[walcoverage.TimelineSpan] = dataclasses.field(default_factory=list)

    @property
    def physical(self) -> PhysicalInfo:
        assert self.backup.physical is not None
        return self.backup.physical


@dataclass(frozen=True)
class _Candidate:
    backup: Manifest
    physical: PhysicalInfo
    timeline: int
    coverage: wal.Coverage
    path: list[walcoverage.TimelineSpan]

    @property
    def usable(self) -> bool:
        return self.coverage.end_lsn >= walnames.parse_lsn(self.physical.stop_lsn)


def _candidates(backups: list[Manifest], segments: list[wal.WalSegment],
                histories: dict[int, list[tuple[int, int]]], timeline: int | None) -> list[_Candidate]:
    found = []
    for m in sorted((m for m in backups if m.kind == BackupKind.BASE and m.physical is not None),
                    key=lambda m: walnames.parse_lsn(m.physical.stop_lsn) if m.physical else 0, reverse=True):
        p = m.physical
        assert p is not None
        tli = timeline or walcoverage.newest_timeline(p.timeline, histories)
        history = histories.get(tli, []) if tli != p.timeline else []
        path = walcoverage.timeline_path(tli, history)
        span = next((s for s in path if s.timeline == p.timeline), None)
        if span is None or (span.end is not None and walnames.parse_lsn(p.stop_lsn) > span.end):
            continue
        cov = walcoverage.coverage(segments, path, walnames.parse_lsn(p.start_lsn), p.wal_segment_size)
        found.append(_Candidate(m, p, tli, cov, path))
    return found


def covered_window(backups: list[Manifest], segments: list[wal.WalSegment],
                   histories: dict[int, list[tuple[int, int]]],
                   timeline: int | None = None) -> tuple[datetime, datetime | None] | None:
    """Earliest and latest moment a time target can have (None: nothing is restorable)."""
    usable = [c for c in _candidates(backups, segments, histories, timeline) if c.usable]
    if not usable:
        return None
    return (min(c.physical.stop_time for c in usable),
            max((c.coverage.archived_until for c in usable if c.coverage.archived_until), default=None))


def choose_base_backup(backups: list[Manifest], segments: list[wal.WalSegment],
                       histories: dict[int, list[tuple[int, int]]], target: Target,
                       restore_point_lsn: int | None = None, where: str = "the repository") -> Plan:
    """The newest base backup that ends before ``target`` with continuous WAL up to it.

    Raises NotFoundError without base backups and RefusedError, naming the covered window,
    when no backup can reach the target.
    """
    candidates = _candidates(backups, segments, histories, target.timeline)
    if not any(m.kind == BackupKind.BASE for m in backups):
        raise NotFoundError(f"no base backup in {where}", "take one with 'backup-tool backup base'")
    usable = [c for c in candidates if c.usable]
    window = covered_window(backups, segments, histories, target.timeline)
    if not usable or window is None:
        broken = candidates[0] if candidates else None
        detail = (f": the WAL from {broken.coverage.start_segment} is incomplete"
                  f" ({'; '.join(str(g) for g in broken.coverage.gaps) or 'not archived yet'})"
                  if broken else "")
        raise RefusedError(f"no base backup in {where} can be recovered{detail}",
                           "check archiving ('backup-tool check') and take a new base backup")
    for c in usable:
        stop_lsn = walnames.parse_lsn(c.physical.stop_lsn)
        if target.kind == "latest":
            ok = True
        elif target.kind == "time":
            assert target.time is not None
            ok = (c.physical.stop_time <= target.time and c.coverage.archived_until is not None
                  and c.coverage.archived_until >= target.time)
        elif target.kind == "lsn":
            assert target.lsn is not None
            ok = stop_lsn <= target.lsn < c.coverage.end_lsn
        else:
            ok = restore_point_lsn is not None and stop_lsn <= restore_point_lsn < c.coverage.end_lsn
        if ok:
            return Plan(c.backup, c.timeline, c.coverage, (c.physical.stop_time, c.coverage.archived_until),
                        c.path)
    raise _outside(target, usable, window, where, restore_point_lsn)


def _outside(target: Target, usable: list[_Candidate], window: tuple[datetime, datetime | None],
             where: str, restore_point_lsn: int | None) -> RefusedError:
    first, last = window
    newest = usable[0]
    span = f"{utc_iso(first)} .. {utc_iso(last) if last else '?'}"
    gaps = [g for c in usable for g in c.coverage.gaps]
    gap_note = f"; the archive has a gap ({gaps[0]})" if gaps else ""
    if target.kind == "time":
        assert target.time is not None
        if target.time < first:
            why = f"it is before the oldest base backup finished ({utc_iso(first)})"
        else:
            why = (f"WAL after {utc_iso(last) if last else '?'} is not archived yet{gap_note}")
        return RefusedError(f"cannot recover to {target.describe()}: {where} covers {span}; {why}",
                            "choose a time inside that window; for a very recent time wait for the source's "
                            "archive_timeout, or run SELECT pg_switch_wal() on the source, then retry "
                            "(or add --wait SECONDS)")
    lsn_span = (f"{min(c.physical.stop_lsn for c in usable)} .. "
                f"{wal.format_lsn(max(c.coverage.end_lsn for c in usable))} (timeline {newest.timeline})")
    if target.kind == "name":
        where_rp = (f"at {wal.format_lsn(restore_point_lsn)}" if restore_point_lsn is not None
                    else "not found in the archived WAL")
        return RefusedError(f"cannot recover to {target.describe()} ({where_rp}): {where} covers LSN "
                            f"{lsn_span}, times {span}{gap_note}",
                            "list restore points with pg_waldump, or use --target-time")
    return RefusedError(f"cannot recover to {target.describe()}: {where} covers LSN {lsn_span}, "
                        f"times {span}{gap_note}", "choose an LSN inside that range")


# --------------------------------------------------------------------------- reaching a time


XACT_TIME = re.compile(r"desc: (?:COMMIT|ABORT)(?:_PREPARED \d+:)? "
                       r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


class ArchiveBehindError(RefusedError):
    """The archive cannot reach a time target *yet*: the first commit after it is not archived.
    Waiting (``--wait``) or a WAL switch on the source makes the same request succeed."""


def xact_times(waldump_output: str) -> list[datetime]:
    """Timestamps of the commit/abort records in ``pg_waldump -r Transaction`` output (run
    with TZ=UTC): the records a time target is compared with during recovery."""
    return [datetime.fromisoformat(m.group(1)).replace(tzinfo=timezone.utc)
            for m in XACT_TIME.finditer(waldump_output)]


XACT_END = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F]+/[0-9A-F]+, desc: (?:COMMIT|ABORT)"
                      r"(?:_PREPARED \d+:)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def xact_ends(waldump_output: str) -> list[tuple[int, datetime]]:
    """(LSN, timestamp) of the commit/abort records in ``pg_waldump -r Transaction`` output
    (run with TZ=UTC), in WAL order."""
    return [(walnames.parse_lsn(m.group(1)), datetime.fromisoformat(m.group(2)).replace(tzinfo=timezone.utc))
            for m in XACT_END.finditer(waldump_output)]


@dataclass(frozen=True)
class TimeStop:
    """Where recovery to a time stops, from the commit/abort records read in WAL order."""

    last_before: int | None
    """LSN of the last commit/abort record replayed (None: none in the records read)."""
    stop: int | None
    """LSN of the first commit/abort record timestamped after the time, where recovery stops
    (None: not among the records read)."""


def time_stop(ends: list[tuple[int, datetime]], target: datetime) -> TimeStop:
    """Where recovery to ``target`` (``recovery_target_inclusive``) stops, from ``ends``: the
    commit/abort records from the start of replay on, in WAL order, with none left out (pure).

    PostgreSQL stops before the first of them whose timestamp is after ``target``, whatever
    the timestamps of the later ones; what it replays between the last one before that and
    the stop is WAL of transactions not committed at the stop, which no snapshot there sees
    (and sequence advances, not transactional, drawn by them)."""
    last = None
    for lsn, at in ends:
        if at > target:
            return TimeStop(last, lsn)
        last = lsn
    return TimeStop(last, None)


@dataclass(frozen=True)
class CommitStop:
    """The last commit/abort record recovery to a time replays: its LSN and timestamp."""

    lsn: int
    time: datetime


EARLY_STOP_SCAN_BYTES = 512 << 20
"""How much WAL the read-ahead may hold before a scratch recovery starts, for
:func:`commit_stop` to find where recovery to a time stops: twice its usual window of 16
segments of 16 MiB. When the stop lies further, recovery started that much later than it
could have (the fetching of 16 more segments, less what the lay-out overlapped); when it lies
within, the WAL in flight at the time is not replayed (in the benchmark's table PITR, half a
second of replay, against a tenth of a second of ``pg_waldump``)."""


SCAN_STEP = 1
"""Segments :func:`commit_stop` waits for beyond those it read before reading on: it reads
what the read-ahead holds (often more) while the next ones are fetched."""

SCAN_LEAD = 2
"""Segments the read-ahead may fetch beyond those :func:`commit_stop` is waiting for while it
looks for the stop (:func:`_early_stop`): enough to keep the downloads going while
``pg_waldump`` reads, few enough that little is fetched past the stop. Each segment fetched
past what the scan needs is decompressed, verified and written for nothing (25 to 60 ms of
CPU per 16 MiB segment on the benchmark's machine); with the usual window of 16 segments
the read-ahead filled it before the scan had found a stop in the third."""


def commit_stop(waldump: str, folder: Path, held: Callable[[int], list[str]], start: int, consistent: int,
                target: datetime, seg_size: int, limit: int) -> CommitStop | None:
    """The last commit/abort record recovery to ``target`` replays, read with ``pg_waldump``
    from ``start`` (the base backup's redo point) through the segments in ``folder``:
    ``held(n)`` waits for the first ``n`` segments of the recovery there and names those
    it holds (consecutive, in order; fewer only when there are no more), asked for more,
    up to ``limit``, until the stop is among them. None when it cannot be told exactly from
    them: they change timeline, a record cannot be read before the stop, the stop is not in
    the first ``limit`` segments, or the record is before ``consistent`` (the base backup's
    end: recovery must be consistent first). Each run of ``pg_waldump`` resumes at the last
    commit/abort record read or, when the run before read to its end, at the page where the
    record it left unread begins (:func:`_resume_page`), whichever is later: none is left out
    or counted twice, and each segment is read once (a page twice), however long no
    transaction ends.

    Recovery to its LSN (inclusive) leaves every table as recovery to the time does (see
    :func:`time_stop`) without replaying the WAL of the transactions in progress at the stop:
    a table PITR whose time falls inside a long transaction replays none of it."""
    ends: list[tuple[int, datetime]] = []
    resume = start
    want = 1
    first = walnames.lsn_segment(start, seg_size)
    while True:
        segments = held(want)[:limit]
        numbers = [walnames.segment_number(name, seg_size) for name in segments]
        if not segments or len({walnames.segment_timeline(name) for name in segments}) != 1 \
                or numbers != list(range(first, first + len(numbers))):
            return None
        done = subprocess.run([waldump, "-r", "Transaction", "-t", str(walnames.segment_timeline(segments[0])),
                               "-p", str(folder), "-s", walnames.format_lsn(resume),
                               "-e", walnames.format_lsn(walnames.segment_start_lsn(numbers[-1] + 1, seg_size))],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={**os.environ, "TZ": "UTC"})
        ends += [(lsn, at) for lsn, at in xact_ends(done.stdout) if not ends or lsn > ends[-1][0]]
        found = time_stop(ends, target)
        if found.stop is not None:
            if found.last_before is None or found.last_before < consistent:
                return None
            return CommitStop(found.last_before, dict(ends)[found.last_before])
        if len(segments) < want or len(segments) >= limit:
            return None
        resume = max(ends[-1][0] if ends else start,
                     _resume_page(folder / segments[-1], numbers[-1], seg_size) if done.returncode == 0 else 0)
        want = len(segments) + SCAN_STEP


def _resume_page(path: Path, segno: int, seg_size: int) -> int:
    """Where the next run of ``pg_waldump`` over the segments after ``path`` may start once a
    run read through the end of ``path`` without an error: the page on which the record left
    unread there (one running into the next segment) begins (:func:`walscan.last_record_page`);
    0 when the page headers do not say (the run resumes at its last commit/abort record)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return walscan.last_record_page(data, segno, seg_size) or 0  # type: ignore[arg-type]
    except (OSError, ValueError):
        return 0


def reaches_time(target: datetime, newest_first: list[tuple[str, tuple[datetime, ...]]]) -> bool | None:
    """Whether replaying the archive stops at ``target``, from the commit/abort times found in
    the covered segments, newest segment first (pure).

    Recovery to a time stops at the first commit or abort whose timestamp is after the target;
    without one it runs out of WAL and fails. So the archive reaches the target exactly when a
    fully archived commit/abort record has a later timestamp. The newest segment holding any
    such record decides: its latest time is after the target (True) or not (False: a later
    timestamp further back would need the clock to have gone backwards, so refusing is safe).
    None: no record in the segments given (scan further back).
    """
    for _, times in newest_first:
        if times:
            return max(times) > target
    return None


def _segments_back(plan: Plan) -> Iterator[str]:
    """Names of the covered segments along the plan's timeline path, newest first, down to the
    base backup's first segment."""
    seg_size = plan.physical.wal_segment_size
    cov = plan.coverage
    if cov.last_segment is None:
        return
    first = wal.lsn_segment(walnames.parse_lsn(plan.physical.start_lsn), seg_size)
    path = plan.path
    for segno in range(wal.lsn_segment(cov.end_lsn - 1, seg_size), first - 1, -1):
        yield wal.segment_name(walcoverage.timeline_for(path, segno, seg_size), segno, seg_size)


class CommitScanner:
    """Reads the commit/abort times of archived segments with ``pg_waldump``, each segment once
    (archived segments never change, so a poll under ``--wait`` reads only new ones)."""

    def __init__(self, storage: Storage, major: int) -> None:
        self.storage = storage
        self.major = major
        self.seen: dict[str, tuple[datetime, ...]] = {}

    def times(self, segment: str, tmp: Path) -> tuple[datetime, ...]:
        if segment not in self.seen:
            dest = tmp / segment
            wal.fetch(self.storage, segment, dest)
            done = subprocess.run([find_tool("pg_waldump", self.major), "-r", "Transaction", str(dest)],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  env={**os.environ, "TZ": "UTC"})
            dest.unlink(missing_ok=True)
            self.seen[segment] = tuple(xact_times(done.stdout))
        return self.seen[segment]

    def reaches(self, plan: Plan, target: datetime) -> bool:
        with tempfile.TemporaryDirectory(prefix="backup-tool-waldump-") as tmp:
            for segment in _segments_back(plan):
                decided = reaches_time(target, [(segment, self.times(segment, Path(tmp)))])
                if decided is not None:
                    return decided
        return False


def _newest_commit(scanner: CommitScanner) -> datetime | None:
    return max((t for times in scanner.seen.values() for t in times), default=None)


def _behind(target: Target, scanner: CommitScanner, where: str) -> ArchiveBehindError:
    assert target.time is not None
    newest = _newest_commit(scanner)
    seen = f" (the newest archived commit is at {utc_iso(newest)})" if newest else ""
    return ArchiveBehindError(
        f"cannot recover to {target.describe()} yet: no commit after it is archived in {where}{seen}",
        "wait for the source's archive_timeout, or run SELECT pg_switch_wal() on the source, then retry "
        "(or add --wait SECONDS)")


def plan_recovery(settings: Settings, target: Target, database: str | None = None,
                  reporter: Reporter | None = None, wait: float = 0.0,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep, storage: Storage | None = None) -> Plan:
    """Choose the base backup for ``target`` from the repository, before anything is written.

    A time target is accepted only when the archive holds a commit or abort record timestamped
    after it (:func:`reaches_time`): recovery stops there, and without it PostgreSQL would
    replay to the end of the archive and fail after the base backup was laid out. When the
    archive is merely behind (:class:`ArchiveBehindError`), ``wait`` seconds of polling give
    the source's archiver time to catch up; any other refusal is immediate. ``storage``: the
    repository already opened by the caller.
    """
    reporter = reporter or NullReporter()
    storage = storage or open_repository(settings.repo_url)
    backups = of_cluster_holding(Catalog(storage).of_kinds([BackupKind.BASE])[0], database, storage.url)
    scanner = CommitScanner(storage, backups[-1].server_version_num // 10000 if backups else 0)
    deadline = clock() + max(0.0, wait)
    announced = False
    while True:
        try:
            return _plan_once(storage, backups, target, scanner, reporter)
        except ArchiveBehindError as exc:
            if clock() >= deadline:
                raise
            if not announced:
                reporter.event("waiting for the archive to reach the target", target=target.describe(),
                               seconds=wait, reason=exc.message)
                announced = True
            sleep(min(2.0, max(0.1, deadline - clock())))


def _plan_once(storage: Storage, backups: list[Manifest], target: Target, scanner: CommitScanner,
               reporter: Reporter) -> Plan:
    files = wal.list_archive(storage)
    segments = wal.segments_of(files)
    hist = wal.histories(storage, files)
    rp_lsn = None
    if target.kind == "name" and target.name is not None and backups:
        rp_lsn = locate_restore_point(storage, backups, segments, hist, target.name, target.timeline,
                                      backups[-1].server_version_num // 10000, reporter)
    try:
        plan = choose_base_backup(backups, segments, hist, target, rp_lsn, storage.url)
    except RefusedError as exc:
        window = covered_window(backups, segments, hist, target.timeline)
        if target.kind == "time" and target.time is not None and window is not None and target.time >= window[0]:
            raise ArchiveBehindError(exc.message, exc.hint) from None
        raise
    if target.kind == "time" and target.time is not None and not scanner.reaches(plan, target.time):
        raise _forked_before(backups, segments, hist, target, plan, scanner, storage.url) \
            or _behind(target, scanner, storage.url)
    return plan


def _forked_before(backups: list[Manifest], segments: list[wal.WalSegment],
                   histories: dict[int, list[tuple[int, int]]], target: Target, plan: Plan,
                   scanner: CommitScanner, where: str) -> RefusedError | None:
    """When the timeline followed was forked (by an earlier recovery) off an ancestor whose own
    archived WAL does reach the time target, the refusal naming that ancestor: waiting for the
    source's archiver cannot help, since new commits of the source land on the ancestor."""
    assert target.time is not None
    for span in reversed(plan.path[:-1]):
        try:
            ancestor = choose_base_backup(backups, segments, histories,
                                          dataclasses.replace(target, timeline=span.timeline), None, where)
        except RefusedError:
            continue
        if scanner.reaches(ancestor, target.time):
            switch = wal.format_lsn(span.end) if span.end is not None else "?"
            return RefusedError(
                f"cannot recover to {target.describe()} along timeline {plan.timeline}: it branched off timeline "
                f"{span.timeline} at LSN {switch} (a recovery promoted there) and no commit after the target is "
                f"archived on it; timeline {span.timeline} reaches the target",
                f"pass --target-timeline {span.timeline} to restore pitr (restore tables --target-time follows "
                f"timeline {span.timeline} when --target-dsn is the cluster still on it)")
    return None


# --------------------------------------------------------------------------- restore points


def locate_restore_point(storage: Storage, backups: list[Manifest], segments: list[wal.WalSegment],
                         histories: dict[int, list[tuple[int, int]]], name: str, timeline: int | None,
                         major: int, reporter: Reporter) -> int | None:
    """LSN of the newest RESTORE_POINT record called ``name`` in the archived WAL, scanning
    from the newest base backup backwards; None if it is not there."""
    waldump = postgres.find_tool("pg_waldump", major)
    candidates = [c for c in _candidates(backups, segments, histories, timeline) if c.usable]
    scanned_until: int | None = None
    pattern = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: RESTORE_POINT (.*)$")
    with tempfile.TemporaryDirectory(prefix="backup-tool-waldump-") as tmp:
        for c in candidates:
            seg_size = c.physical.wal_segment_size
            start = walnames.parse_lsn(c.physical.start_lsn)
            end = c.coverage.end_lsn if scanned_until is None else min(scanned_until, c.coverage.end_lsn)
            if start >= end:
                continue
            history = histories.get(c.timeline, []) if c.timeline != c.physical.timeline else []
            path = walcoverage.timeline_path(c.timeline, history)
            reporter.event("looking for the restore point in the archived WAL", name=name,
                           start=wal.format_lsn(start), end=wal.format_lsn(end))
            found: list[int] = []
            for span in path:
                lo = max(start, span.begin)
                hi = end if span.end is None else min(end, span.end)
                if lo >= hi:
                    continue
                for segno in range(wal.lsn_segment(lo, seg_size), wal.lsn_segment(hi - 1, seg_size) + 1):
                    seg_name = wal.segment_name(walcoverage.timeline_for(path, segno, seg_size), segno, seg_size)
                    file_name = wal.segment_name(span.timeline, segno, seg_size)
                    dest = Path(tmp) / file_name
                    if not dest.exists():
                        try:
                            wal.fetch(storage, seg_name, dest)
                        except wal.WalMissingError:
                            break
                done = subprocess.run(
                    [waldump, "-p", tmp, "-t", str(span.timeline), "-s", wal.format_lsn(lo),
                     "-e", wal.format_lsn(hi), "-r", "XLOG"], capture_output=True, text=True,
                    stdin=subprocess.DEVNULL)
                for line in done.stdout.splitlines():
                    m = pattern.search(line)
                    if m and m.group(2).strip() == name:
                        found.append(walnames.parse_lsn(m.group(1)))
            if found:
                return max(found)
            scanned_until = start
    return None


# --------------------------------------------------------------------------- laying out


def _check_empty(pgdata: Path) -> None:
    if pgdata.exists():
        if not pgdata.is_dir():
            raise RefusedError(f"--pgdata {pgdata} exists and is not a directory",
                               "choose an empty or new directory")
        entries = sorted(os.listdir(pgdata))
        if entries:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise RefusedError(f"--pgdata {pgdata} is not empty ({len(entries)} entries: {shown})",
                               "restore pitr never overwrites: choose an empty or new directory")


def _safe_member(name: str) -> str:
    clean = name.removeprefix("./")
    parts = clean.split("/")
    if clean.startswith("/") or any(p == ".." for p in parts):
        raise IntegrityError(f"base backup tar member {name!r} escapes the data directory",
                             "the backup is damaged or forged; use another one")
    return clean


def extract_base(storage: Storage, manifest: Manifest, pgdata: Path, os_user: str,
                 reporter: Reporter, workers: int = 1, guard: Callable[[], None] = lambda: None,
                 durable: bool = False) -> int:
    """Lay the base backup's tar out in ``pgdata`` (verified, decompressed); return bytes
    written. A backup whose index allows it (:func:`basetar.parallel_readable`) is read in
    one stream and its frames decompressed and written on ``workers`` threads
    (:func:`extract_frames`); older ones stream through one tar reader. ``guard`` is called
    as the data advances: what it raises stops the lay-out. ``durable``: the directory will
    be synced before it is used (see :func:`extract_frames`)."""
    obj = manifest.extra_objects[0]
    if len(manifest.extra_objects) > 1 and manifest.extra_objects[1].key.endswith(basetar.INDEX_KEY):
        idx = manifest.extra_objects[1]
        index = basetar.load_index(storage, idx.key, idx.sha256, idx.size)
        if basetar.parallel_readable(index):
            return extract_frames(storage, manifest, index, pgdata, os_user, reporter, workers, guard, durable)
    progress = reporter.task(f"restoring base backup {manifest.id}", total=obj.raw_size or None)
    written = 0
    stream = pipeline.read_stored(storage, obj.key, obj.sha256, obj.size)
    with tarfile.open(fileobj=pipeline.ChunkReader(iter(stream)), mode="r|",  # type: ignore[call-overload]  # ChunkReader has read(n), all tarfile needs
                      bufsize=pipeline.CHUNK) as tar:
        for member in tar:
            rel = _safe_member(member.name)
            if not rel or rel == ".":
                continue
            dest = pgdata / rel
            if member.isdir():
                dest.mkdir(mode=0o700, parents=True, exist_ok=True)
            elif member.isfile():
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, member.mode & 0o600 or 0o600)
                with os.fdopen(fd, "wb") as out:
                    while chunk := src.read(pipeline.CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        progress.advance(len(chunk))
                        guard()
                os.utime(dest, (member.mtime, member.mtime))
            elif member.issym():
                raise RefusedError(f"the base backup holds a symbolic link ({rel}): tablespaces are not supported")
            chown_to(dest, os_user)
    for _ in stream:
        pass
    progress.finish()
    return written


def extract_frames(storage: Storage, manifest: Manifest, index: basetar.TarIndex, pgdata: Path, os_user: str,
                   reporter: Reporter, workers: int, guard: Callable[[], None] = lambda: None,
                   durable: bool = False) -> int:
    """Every directory of the index created first (owned, modes as in the tar), then the
    object read once and its frames written in place on ``workers`` threads
    (:func:`basetar.extract_whole`), then the files dated. Returns bytes written.

    A file with data is created by its first write (owned, mode as in the tar; the index
    naming a file twice is refused before anything is written, as creating it twice
    would be), the empty ones on a thread of their own meanwhile: creating ~1,400 files
    one after the other before the download began took half a second in the benchmark.
    Every file exists, with its owner, mode, size and mtime, once this returns; on failure
    what was written is the caller's to remove. A symbolic link found where a file goes (the
    directory belongs to the server's user meanwhile) is never written through: the lay-out
    fails, as creating the file with ``O_EXCL`` made it fail before.

    The frames of one big file are written one at a time (a lock per file): the kernel
    serialises writes to one file anyway, and a second thread waiting for it there spins
    on a core (14 % of the lay-out's CPU in the benchmark) that the download, the checksum
    and the next frame's decompression need. ``durable`` (the server syncs the directory
    before recovery): each write's writeback to disk is started at once
    (:func:`_start_writeback`), so the sync at the start finds little left to write
    instead of the whole backup; it still makes everything durable itself."""
    obj = manifest.extra_objects[0]
    ids = _owner_ids(os_user)
    files: list[basetar.Member] = []
    made: set[Path] = set()
    for m in index.members:
        rel = _safe_member(m.name)
        if not rel or rel == ".":
            continue
        if m.kind == "d":
            (pgdata / rel).mkdir(mode=0o700, parents=True, exist_ok=True)
            chown_to(pgdata / rel, os_user)
            made.add(pgdata / rel)
        elif m.kind == "l":
            raise RefusedError(f"the base backup holds a symbolic link ({rel}): tablespaces are not supported")
        elif m.kind == "f":
            files.append(m)
    names = [_safe_member(m.name) for m in files]
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise IntegrityError(f"base backup index names {twice} twice", "the backup is damaged; use another one")
    for rel in names:
        parent = (pgdata / rel).parent
        if parent not in made:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            made.add(parent)
    progress = reporter.task(f"restoring base backup {manifest.id}", total=obj.raw_size or None)
    locks = {m.name: threading.Lock() for m in files}

    def open_member(m: basetar.Member) -> int:
        return _open_owned(pgdata / m.name, m.mode, ids)

    def create(members: list[basetar.Member]) -> None:
        for m in members:
            os.close(open_member(m))

    def write(member: basetar.Member, offset: int, data: memoryview) -> None:
        with locks[member.name]:
            fd = open_member(member)
            try:
                start, length = offset, len(data)
                while data:
                    n = os.pwrite(fd, data, offset)
                    data, offset = data[n:], offset + n
                if durable:
                    _start_writeback(fd, start, length)
            finally:
                os.close(fd)

    def advance(raw: int) -> None:
        guard()
        progress.advance(raw)

    creating = Background(create, [m for m in files if not m.size], name="create-files")
    try:
        stream = storage.decode(obj.key, pipeline.verified(storage.get_stored(obj.key), obj.key, obj.sha256,
                                                           obj.size))
        basetar.extract_whole(pipeline.read_ahead(stream), obj.key, index, write, workers, advance)
    finally:
        creating.join()
    creating.result()
    for m in files:
        os.utime(pgdata / m.name, (m.mtime, m.mtime))
    progress.finish()
    return sum(m.size for m in files)


def _open_owned(path: Path, mode: int, ids: tuple[int, int] | None) -> int:
    """``path`` opened for writing, created (owner-only ``mode`` bits) and given to ``ids``
    if new. A symbolic link there is never written through (``O_NOFOLLOW``): the data
    directory belongs to the server's user while it is laid out."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode & 0o600 or 0o600)
    if ids is not None:
        try:
            os.fchown(fd, *ids)
        except BaseException:
            os.close(fd)
            raise
    return fd


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``fd``'s range to disk without waiting for it (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing). It guarantees nothing
    about durability — the server's sync at start does — it only moves the disk writes
    from that sync to the time of the lay-out, which they then overlap."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


PARTIAL_SETTINGS = {"ignore_invalid_pages": "on", "autovacuum": "off"}
"""Given on the private start's command line only: never part of the restored configuration."""


def extract_partial(storage: Storage, manifest: Manifest, index: basetar.TarIndex, choice: partial.Choice,
                    pgdata: Path, os_user: str, reporter: Reporter, workers: int = 1) -> tuple[int, int]:
    """Lay out ``choice``: directories, sparse files of the recorded size, and the full
    files read through ranged reads of their frames only, checked and decompressed on
    ``workers`` threads. Returns (bytes written, stored bytes read).

    A file receiving data is created by its first write; the sparse files and the empty
    full ones are created on a thread of their own meanwhile (a few hundred file creations
    cost as much as decompressing tens of MB). Every file exists, with its size, owner and
    (full files) recorded mtime, once this returns; on failure what was written is the
    caller's to remove."""
    obj = manifest.extra_objects[0]
    made: set[Path] = set()
    for m in index.members:
        rel = _safe_member(m.name)
        if m.kind == "d" and rel:
            (pgdata / rel).mkdir(mode=0o700, parents=True, exist_ok=True)
            chown_to(pgdata / rel, os_user)
            made.add(pgdata / rel)
        elif m.kind == "l":
            raise RefusedError(f"the base backup holds a symbolic link ({rel}): tablespaces are not supported")
    ids = _owner_ids(os_user)
    files = [m for m in choice.full if m.kind == "f"]
    for m in (*choice.sparse, *files):
        parent = (pgdata / _safe_member(m.name)).parent
        if parent not in made:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            made.add(parent)

    def open_member(m: basetar.Member) -> int:
        return _open_owned(pgdata / m.name, m.mode, ids)

    def create(members: list[basetar.Member]) -> None:
        for m in members:
            fd = open_member(m)
            try:
                if m.size:
                    os.ftruncate(fd, m.size)
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)

    progress = reporter.task(f"restoring the needed files of base backup {manifest.id}", total=choice.full_bytes)

    def write(member: basetar.Member, offset: int, data: bytes | memoryview) -> None:
        fd = open_member(member)
        try:
            view = memoryview(data)
            while view:
                done = os.pwrite(fd, view, offset)
                view, offset = view[done:], offset + done
        finally:
            os.close(fd)
        progress.advance(len(data))

    creating = Background(create, [*choice.sparse, *(m for m in files if not m.size)], name="create-files")
    try:
        fetched = basetar.extract(storage, obj.key, obj.size, index, files, write, workers=workers)
    finally:
        creating.join()
    creating.result()
    for m in files:
        os.utime(pgdata / m.name, (m.mtime, m.mtime))
    progress.finish()
    return choice.full_bytes, fetched


def _owner_ids(os_user: str) -> tuple[int, int] | None:
    """(uid, gid) to give laid-out files to ``os_user`` (None: not root, files stay ours)."""
    if not is_root():
        return None
    pw = pwd.getpwnam(os_user)
    return pw.pw_uid, pw.pw_gid


def _append_conf(pgdata: Path, settings: dict[str, str], why: str) -> None:
    conf = pgdata / "postgresql.auto.conf"
    lines = [f"{CONF_MARK}: {why}"] + [f"{k} = {conf_quote(v)}" for k, v in settings.items()]
    with conf.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def _ensure_config(pgdata: Path, os_user: str, reporter: Reporter) -> None:
    """Clusters whose configuration lives outside the data directory (Debian) get a minimal one."""
    for name, text in (("postgresql.conf", "# written by backup-tool restore pitr: the backed-up cluster "
                                           "kept its configuration outside the data directory\n"),
                       ("pg_hba.conf", "# written by backup-tool restore pitr (the original was outside the data "
                                       "directory)\nlocal all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n"
                                       "host all all ::1/128 scram-sha-256\n"),
                       ("pg_ident.conf", "")):
        path = pgdata / name
        if not path.exists():
            path.write_text(text)
            path.chmod(0o600)
            chown_to(path, os_user)
            reporter.warning(f"{name} was not in the base backup: wrote a minimal one", path=str(path))


@dataclass(frozen=True)
class PartialRequest:
    """Lay out only what copying ``tables`` (schema or None, name) of ``database`` needs;
    ``tables`` None: all of ``database`` (and of ``postgres``), the other databases sparse."""

    database: str
    tables: tuple[tuple[str | None, str], ...] | None


@dataclass(frozen=True)
class Layout:
    plan: Plan
    pgdata: Path
    os_user: str
    restore_command: str
    settings: dict[str, str]
    bytes_written: int
    seconds: float
    bin_dir: Path | None = None
    choice: partial.Choice | None = None
    databases_in_backup: frozenset[int] = frozenset()
    bytes_fetched: int | None = None
    prefetch: wal.RecoveryPrefetch | None = None
    scratch: bool = False
    stop: CommitStop | None = None
    """Set when the recovery settings name the LSN of the last commit recovery to the time
    replays instead of the time (``lay_out(stop_early=True)``)."""
    repo_url: str = ""
    """The repository's URL as opened (for messages)."""
    database: str = "postgres"
    """The database the recovered server's own connections go to (:func:`server_for`): the
    tables' database when a table request's partial lay-out left every other one out."""

    def stop_prefetch(self) -> int:
        """Stop reading WAL ahead of recovery (idempotent); the number of segments it fetched."""
        return len(self.prefetch.stop()) if self.prefetch is not None else 0


def _partial_choice(storage: Storage, backup: Manifest, request: PartialRequest,
                    reporter: Reporter) -> tuple[partial.Choice, basetar.TarIndex] | None:
    """The partial lay-out for ``request``, or None (with the reason reported) when this
    backup cannot have one: taken before base backups carried an index. For tables, every
    other database (``postgres``, the templates and any database the backup's map does not
    name included) is left out entirely: the scratch cluster connects to the tables'
    database alone (``Layout.database``), and the first connection checks that the
    database of that name at the target is the backup's one (:func:`recover`'s ``first``,
    see :mod:`backup_tool.jobs.table_pitr`), else the whole backup is laid out."""
    if len(backup.extra_objects) < 2 or not backup.extra_objects[1].key.endswith(basetar.INDEX_KEY):
        reporter.event("partial lay-out unavailable: this base backup has no index (taken by an older "
                       "backup-tool); laying out all of it", id=backup.id)
        return None
    obj = backup.extra_objects[1]
    index = basetar.load_index(storage, obj.key, obj.sha256, obj.size)
    dbs = partial.relations_from_json(index.relations)
    leave_out: frozenset[int] = frozenset()
    if request.tables is None:
        keep = {d.oid: frozenset(r.oid for r in d.relations) for d in dbs.values()
                if d.name in (request.database, "postgres")}
    else:
        db = next((d for d in dbs.values() if d.name == request.database), None)
        keep = {db.oid: partial.needed(db, request.tables)} if db is not None else {}
        if db is not None:
            leave_out = frozenset(d.oid for d in dbs.values() if d.oid != db.oid)
            leave_out |= partial.databases_in(index.members) - {db.oid}
            return dataclasses.replace(partial.choose(index.members, dbs, keep, leave_out, lean=True),
                                       database=db.oid), index
    return partial.choose(index.members, dbs, keep, leave_out), index


def lay_out(settings: Settings, target: Target, pgdata: Path, port: int | None = None,
            os_user: str | None = None, archive: bool = True, server_command: str | None = None,
            reporter: Reporter | None = None, database: str | None = None, plan: Plan | None = None,
            wait: float = 0.0, server_binaries: bool = False,
            partial_for: PartialRequest | None = None, scratch: bool = False, recovering: bool = False,
            pause: bool = False, stop_early: bool = False) -> Layout:
    """Choose the base backup (of a cluster holding ``database``, if given; ``plan``: already
    chosen by :func:`plan_recovery`), fill the empty ``pgdata`` and write the recovery settings.
    With ``server_binaries``, the base backup's major's server programs are found first: without
    them nothing is written. With ``partial_for`` only what copying those tables (or that
    database) needs is read and written (:mod:`backup_tool.physical.partial`), when the backup
    allows it; the Layout's ``choice`` says whether it did. ``scratch``: a throw-away cluster
    recovered to a time only to read from it (table PITR; see :func:`recover`): recovery
    follows the plan's timeline, and ``restore_command`` answers what it can without running
    this tool (:func:`_scratch_restore_command`); with ``pause`` it pauses at the target as a
    read-only hot standby instead of promoting (see :func:`recover`). ``recovering``: the caller starts the
    recovery at once and removes the answers afterwards (:func:`settle_restore_command`), so
    ``restore_command`` may answer from the read-ahead and "not archived" for what the
    archive did not hold when the plan was made (:func:`known_absent`). ``stop_early``: a time
    target is named in the recovery settings by the LSN of the last commit recovery to it
    replays when the WAL read ahead during the lay-out shows it (:func:`commit_stop`; the
    Layout's ``stop``), which recovers the same tables without replaying what was in flight
    at the time."""
    reporter = reporter or NullReporter()
    started = time.monotonic()
    pgdata = pgdata.expanduser().absolute()
    _check_empty(pgdata)
    storage = open_repository(settings.repo_url)
    plan = plan or plan_recovery(settings, target, database, reporter, wait, storage=storage)
    Catalog(storage).require_key(plan.backup)
    bin_dir = find_bin_dir(plan.backup.server_version_num // 10000) if server_binaries else None
    reporter.event("base backup chosen", id=plan.backup.id, stop_lsn=plan.physical.stop_lsn,
                   timeline=plan.physical.timeline, target=target.describe(),
                   recovery_timeline=plan.timeline)
    user = server_os_user(pgdata, os_user)
    created = not pgdata.exists()
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    prefetch: wal.RecoveryPrefetch | None = None
    scan: Background[CommitStop | None] | None = None
    try:
        chown_to(pgdata, user)
        pgdata.chmod(0o700)
        if not user_can_write(user, pgdata):
            raise RefusedError(f"OS user {user} cannot reach {pgdata}",
                               "choose a directory whose parents that user may enter (not under /root)")
        with cf.ThreadPoolExecutor(1, thread_name_prefix="tool-check") as checking:
            # the lay-out overlaps the server user's run of `<tool> version` (an interpreter
            # start); when that user cannot run the tool the full lay-out stops as soon as the
            # check says so, and what was written goes (below)
            tool = checking.submit(server_tool_command, user, tool_candidates(
                server_command, plan.physical.archive_command, sys.argv[0], sys.executable))

            def guard() -> None:
                if tool.done():
                    tool.result()
            early = stop_early and target.kind == "time" and target.time is not None
            prefetch = _start_prefetch(storage, plan, pgdata, user, 1 + SCAN_LEAD if early else None)
            scan = Background(_early_stop, plan, prefetch, target, reporter, name="early-stop-scan") if early else None
            found = _partial_choice(storage, plan.backup, partial_for, reporter) if partial_for else None
            choice = found[0] if found else None
            fetched: int | None = None
            if found is not None:
                written, fetched = extract_partial(storage, plan.backup, found[1], found[0], pgdata, user, reporter,
                                                   settings.policy.backup.jobs)
            else:
                written = extract_base(storage, plan.backup, pgdata, user, reporter, settings.policy.backup.jobs,
                                       guard, durable=not scratch)
                fetched = plan.backup.extra_objects[0].size
            restore_command = (f"{tool.result()} wal fetch %f %p --abort-on-error "
                               f"--repo {shlex.quote(storage.url)}")
        plain_command = restore_command
        if scratch:
            restore_command = _scratch_restore_command(restore_command, pgdata, plan, user)
        elif recovering:
            restore_command = _scratch_restore_command(restore_command, pgdata, plan, user,
                                                       known_absent(plan, _archived_histories(storage)))
        for stale in ("standby.signal", "recovery.signal", "postmaster.pid", "postmaster.opts"):
            (pgdata / stale).unlink(missing_ok=True)
        for sub in ("pg_wal", "pg_wal/archive_status"):
            (pgdata / sub).mkdir(mode=0o700, exist_ok=True)
            chown_to(pgdata / sub, user)
        _ensure_config(pgdata, user, reporter)
        stop = scan.result() if scan is not None else None
        if stop is not None:
            target = Target("lsn", lsn=stop.lsn, timeline=target.timeline)
        conf = recovery_settings(target, restore_command, timeline=plan.timeline if scratch else None,
                                 action="pause" if scratch and pause else "promote")
        if port is not None:
            conf["port"] = str(port)
        if not archive:
            conf["archive_mode"] = "off"
        _append_conf(pgdata, conf, f"recovery to {target.describe()} from {plan.backup.id}")
        signal_file = pgdata / "recovery.signal"
        signal_file.touch()
        chown_to(signal_file, user)
        chown_to(pgdata / "postgresql.auto.conf", user)
    except BaseException:
        if prefetch is not None:
            prefetch.stop()
        if scan is not None:
            scan.join()
        _empty_dir(pgdata, remove=created)
        raise
    reporter.event("data directory laid out", pgdata=str(pgdata), bytes=written, os_user=user,
                   partial=choice is not None, bytes_fetched=fetched,
                   wal_prefetched=len(prefetch.fetched) if prefetch else 0)
    return Layout(plan, pgdata, user, restore_command if scratch else plain_command, conf, written, time.monotonic() - started, bin_dir,
                  choice=choice, databases_in_backup=partial.databases_in(found[1].members) if found else frozenset(),
                  bytes_fetched=fetched, prefetch=prefetch, scratch=scratch, stop=stop, repo_url=storage.url,
                  database=partial_for.database if choice is not None and choice.database is not None
                  and partial_for is not None else "postgres")


UNNEEDED_DIR = "unneeded"


def _early_stop(plan: Plan, prefetch: wal.RecoveryPrefetch, target: Target,
                reporter: Reporter) -> CommitStop | None:
    """:func:`commit_stop` over the segments the read-ahead fetches, run on a thread beside
    the base backup's lay-out (those up to the stop recovery needs first, so waiting for them
    delays the start of recovery, not its end). While it looks, the read-ahead runs at most
    :data:`SCAN_LEAD` segments ahead of it (:func:`_held_leading`); once the stop is known, no
    segment after the one following the stop's is fetched: recovery stops there, and each
    segment fetched is decompressed, verified and written on the cores the restore needs.
    Either way the read-ahead then goes back to its usual window, for the recovery. Nothing
    is fetched twice. A scan that cannot run only costs the saving: the read-ahead goes on as
    usual."""
    assert target.time is not None
    p = plan.physical
    stop: CommitStop | None = None
    try:
        stop = commit_stop(find_tool("pg_waldump", plan.backup.server_version_num // 10000), prefetch.folder,
                           functools.partial(_held_leading, prefetch), walnames.parse_lsn(p.start_lsn),
                           walnames.parse_lsn(p.stop_lsn),
                           target.time, p.wal_segment_size, max(1, EARLY_STOP_SCAN_BYTES // p.wal_segment_size))
    except (BackupToolError, OSError):
        stop = None
    finally:
        if stop is not None:
            prefetch.limit(stop_segments(walnames.parse_lsn(p.start_lsn), stop.lsn, p.wal_segment_size))
        prefetch.reset_window()
    if stop is not None:
        reporter.event("recovery stops at the last commit before the time", lsn=walnames.format_lsn(stop.lsn),
                       time=utc_iso(stop.time))
    return stop


def _held_leading(prefetch: wal.RecoveryPrefetch, count: int) -> list[str]:
    """:meth:`wal.RecoveryPrefetch.wait_leading` for the stop's scan, the read-ahead's window
    kept at :data:`SCAN_LEAD` segments past ``count`` (the lay-out started it that narrow):
    it fetches ahead of what the scan reads, not ahead of a recovery that has not started."""
    prefetch.window = count + SCAN_LEAD
    return prefetch.wait_leading(count)


def stop_segments(start: int, stop: int, seg_size: int) -> int:
    """How many segments from the one holding ``start`` (the base backup's redo point) a
    recovery stopping at the record at ``stop`` may ask for: through the segment after the
    record's (a record may cross into it, and recovery's read-ahead may look there). Pure."""
    return walnames.lsn_segment(stop, seg_size) - walnames.lsn_segment(start, seg_size) + 2


def scratch_unneeded(plan: Plan) -> tuple[str, ...]:
    """Files a scratch recovery to a time inside the archive asks ``restore_command`` for
    but never needs (pure): the segment after the archive's last continuous one (WAL
    read-ahead asks for it; the target's first later commit is archived before it, so the
    stop is reached without it), the history file of the next timeline (probed when
    choosing the new timeline at promotion: a scratch cluster never archives, so a clash
    with a timeline in the repository changes nothing) and, on timeline 1, timeline 1's
    history file (asked for when the new one is written; it never exists)."""
    names = [f"{plan.timeline + 1:08X}.history"]
    if plan.timeline == 1:
        names.append("00000001.history")
    last = plan.coverage.last_segment
    if last is not None:
        seg_size = plan.physical.wal_segment_size
        after = walnames.segment_number(last, seg_size) + 1
        names.append(walnames.segment_name(walcoverage.timeline_for(plan.path, after, seg_size), after, seg_size)
                     if plan.path else walnames.segment_name(plan.timeline, after, seg_size))
    return tuple(names)


def known_absent(plan: Plan, histories: frozenset[str]) -> tuple[str, ...]:
    """Files a recovery from ``plan`` started now asks ``restore_command`` for and that the
    archive, as listed for the plan (``histories``: its history files), does not hold (pure):
    :func:`scratch_unneeded` less the history files it has. Answering "not archived" for
    them ends a ``--latest`` recovery at the archive's end as the plan saw it, which is
    where :func:`_check_reached_end` expects it."""
    return tuple(name for name in scratch_unneeded(plan) if name not in histories)


def _archived_histories(storage: Storage) -> frozenset[str]:
    found = (walarchive.KEY_RE.match(info.key.rsplit("/", 1)[-1]) for info in storage.list(walarchive.HISTORY_PREFIX))
    return frozenset(m["name"] for m in found if m and walarchive.HISTORY_RE.match(m["name"]))


def settle_restore_command(layout: Layout) -> None:
    """After a recovery run by this process: the read-ahead answers go (directories
    removed) and the configuration keeps the plain ``restore_command`` (``wal fetch``), so a
    later recovery of this cluster asks the repository for everything."""
    spool = walspool.spool_dir(layout.pgdata / "pg_wal" / "RECOVERYXLOG")
    for sub in (spool / UNNEEDED_DIR, walspool.prefetch_dir(layout.pgdata / "pg_wal" / "RECOVERYXLOG")):
        shutil.rmtree(sub, ignore_errors=True)
    used = layout.settings.get("restore_command")
    if used is None or used == layout.restore_command:
        return
    conf = layout.pgdata / "postgresql.auto.conf"
    if not conf.exists():
        return  # a failed run emptied the directory: nothing to settle, its own error stands
    text = conf.read_text()
    line = f"restore_command = {conf_quote(used)}"
    if line in text:
        conf.write_text(text.replace(line, f"restore_command = {conf_quote(layout.restore_command)}"))


def _scratch_restore_command(restore_command: str, pgdata: Path, plan: Plan, user: str,
                             unneeded: tuple[str, ...] | None = None) -> str:
    """``restore_command`` for a scratch recovery: a shell prologue answers, without starting
    this tool, the requests it can answer from files alone: "not archived" for ``unneeded``
    (default :func:`scratch_unneeded`; a marker file each), and a segment the read-ahead
    (:class:`wal.RecoveryPrefetch`) already downloaded and verified, linked into place. The
    segment taken is renamed ``NAME.taken`` (the one before it removed): the read-ahead sees
    it gone and reads further, and PostgreSQL, which asks again for the last segment it
    replayed, finds it there. Anything else (or any failure of the prologue) runs the tool."""
    spool = walspool.spool_dir(pgdata / "pg_wal" / "RECOVERYXLOG")
    folder = spool / UNNEEDED_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    chown_to(folder.parent, user)
    chown_to(folder, user)
    for name in scratch_unneeded(plan) if unneeded is None else unneeded:
        (folder / name).touch()
    markers = shlex.quote(str(folder)).replace("%", "%%")
    ahead = shlex.quote(str(walspool.prefetch_dir(pgdata / "pg_wal" / "RECOVERYXLOG"))).replace("%", "%%")
    return (f"if [ -e {markers}/%f ]; then exit 1; fi; "
            f"if ln -f {ahead}/%f %p 2>/dev/null; then "
            f"rm -f {ahead}/*.taken; mv -f {ahead}/%f {ahead}/%f.taken; exit 0; fi; "
            f"ln -f {ahead}/%f.taken %p 2>/dev/null || {{ {restore_command}; }}")


def _start_prefetch(storage: Storage, plan: Plan, pgdata: Path, user: str,
                    window: int | None = None) -> wal.RecoveryPrefetch:
    """Start downloading the WAL the recovery from ``plan`` will replay (see
    :class:`wal.RecoveryPrefetch`), in parallel with the base backup's lay-out; ``window``:
    segments it may hold at first, until its ``reset_window`` (None: its usual window)."""
    p = plan.physical
    names = walcoverage.recovery_segments(plan.path, walnames.parse_lsn(p.start_lsn), plan.coverage.last_segment,
                                          p.wal_segment_size)
    (pgdata / "pg_wal").mkdir(mode=0o700, exist_ok=True)
    chown_to(pgdata / "pg_wal", user)
    prefetch = wal.RecoveryPrefetch(storage, names, pgdata / "pg_wal", lambda path: chown_to(path, user))
    if window is not None:
        prefetch.window = max(1, window)
    return prefetch.start()


def _empty_dir(path: Path, remove: bool) -> None:
    if not path.exists():
        return
    if remove:
        shutil.rmtree(path, ignore_errors=True)
        return
    for entry in os.listdir(path):
        full = path / entry
        if full.is_dir() and not full.is_symlink():
            shutil.rmtree(full, ignore_errors=True)
        else:
            full.unlink(missing_ok=True)


# --------------------------------------------------------------------------- recovering


@dataclass(frozen=True)
class RecoveryPoint:
    """Where recovery stopped, as PostgreSQL reported it."""

    stop_reason: str
    last_transaction_time: datetime | None
    redo_done_lsn: str | None
    timeline: int | None
    segments_restored: int
    paused: bool = False
    """Recovery paused at the target (a read-only hot standby, not promoted)."""

    def to_dict(self) -> dict[str, Any]:
        return {"stop_reason": self.stop_reason,
                "time": utc_iso(self.last_transaction_time) if self.last_transaction_time else None,
                "lsn": self.redo_done_lsn, "timeline": self.timeline,
                "segments_restored": self.segments_restored}


LOG_STOP = re.compile(r"LOG:\s+(recovery stopping .*)$")
LOG_REDO = re.compile(r"LOG:\s+redo done at ([0-9A-F]+/[0-9A-F]+)")
LOG_LAST_TX = re.compile(r"last completed transaction was at log time (.+?)$")
LOG_TIMELINE = re.compile(r"LOG:\s+selected new timeline ID: (\d+)")
LOG_RESTORED = re.compile(r'LOG:\s+restored log file "([0-9A-F]{24})" from archive')


def parse_recovery_log(text: str) -> RecoveryPoint:
    stop = redo = tli = None
    last_tx: datetime | None = None
    restored = set()
    for line in text.splitlines():
        if m := LOG_STOP.search(line):
            stop = m.group(1).strip()
        if m := LOG_REDO.search(line):
            redo = m.group(1)
        if m := LOG_LAST_TX.search(line):
            try:
                last_tx = _parse_pg_time(m.group(1))
            except ValueError:
                pass
        if m := LOG_TIMELINE.search(line):
            tli = int(m.group(1))
        if m := LOG_RESTORED.search(line):
            restored.add(m.group(1))
    return RecoveryPoint(stop or "end of the archived WAL", last_tx, redo, tli, len(restored))


def _parse_pg_time(text: str) -> datetime:
    text = text.strip()
    if re.search(r"[+-]\d\d$", text):
        text += ":00"
    return datetime.fromisoformat(text.replace(" ", "T", 1)).astimezone(timezone.utc)


@dataclass(frozen=True)
class PitrResult:
    backup_id: str
    pgdata: str
    target: Target
    os_user: str
    port: int | None
    started: bool
    recovered: RecoveryPoint | None
    validation: ValidationReport | None
    layout_seconds: float
    recovery_seconds: float
    bytes_restored: int
    databases: tuple[str, ...] = ()
    backup_finished_at: datetime | None = None
    only_database: str | None = None
    dropped: tuple[str, ...] = ()
    layout: str = "full"
    bytes_fetched: int | None = None
    wal_prefetched: int = 0

    @property
    def ok(self) -> bool:
        return self.validation is None or self.validation.ok

    def to_dict(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "pgdata": self.pgdata, "target": self.target.to_dict(),
                "os_user": self.os_user, "port": self.port, "started": self.started,
                "recovered_to": self.recovered.to_dict() if self.recovered else None,
                "wal_prefetched": self.wal_prefetched,
                "ok": self.ok if self.validation else None,
                "validation": self.validation.to_dict() if self.validation else None,
                "bytes_restored": self.bytes_restored, "databases": list(self.databases),
                "backup_finished_at": utc_iso(self.backup_finished_at) if self.backup_finished_at else None,
                "layout": {"kind": self.layout, "bytes_fetched": self.bytes_fetched,
                           "only_database": self.only_database, "dropped": list(self.dropped)},
                "seconds": {"layout": round(self.layout_seconds, 2), "recovery": round(self.recovery_seconds, 2),
                            "total": round(self.layout_seconds + self.recovery_seconds, 2)}}


def server_for(layout: Layout, private_dir: Path, port: int) -> LocalServer:
    p = layout.plan.physical
    return LocalServer(pgdata=layout.pgdata, os_user=layout.os_user,
                       bin_dir=layout.bin_dir or find_bin_dir(layout.plan.backup.server_version_num // 10000),
                       port=port, private_dir=private_dir,
                       log_file=layout.pgdata / "log" / "backup-tool-recovery.log", superuser=p.superuser,
                       database=layout.database)


LOG_PROMOTED = "database system is ready to accept connections"
LOG_PAUSED = "pausing at the end of recovery"
LOG_HOT_STANDBY = "database system is ready to accept read-only connections"


class LogWatch:
    """Which of ``needles`` the server log has shown since ``offset`` (read on from where the
    last look stopped): a look every few milliseconds costs one small read, no connection."""

    def __init__(self, server: LocalServer, needles: tuple[str, ...], offset: int = 0) -> None:
        self.server = server
        self.needles = needles
        self.offset = offset
        self.tail = ""
        self.found: set[str] = set()

    def saw(self, needle: str) -> bool:
        if needle not in self.found:
            chunk, self.offset = self.server.log_since(self.offset)
            text = self.tail + chunk
            self.found.update(n for n in self.needles if n in text)
            self.tail = text[-max(len(n) for n in self.needles):]
        return needle in self.found


def _promoted(server: LocalServer, log: LogWatch) -> bool:
    """Recovery is over and the server accepts writes: asked of the server once its log says
    it accepts connections (not read-only ones) and ``postmaster.pid`` says "ready"."""
    if not log.saw(LOG_PROMOTED) or not _ready(server):
        return False
    return _ask(server, "SELECT NOT pg_is_in_recovery()")


def _paused_or_promoted(server: LocalServer, log: LogWatch) -> bool:
    """Recovery paused at its target (``recovery_target_action = 'pause'``) and the server
    reads as a hot standby, or it ended and promoted: PostgreSQL promotes instead of pausing
    when it cannot take hot-standby connections yet at the target."""
    if log.saw(LOG_PAUSED) and _ready(server):
        return _ask(server, "SELECT pg_get_wal_replay_pause_state() = 'paused'") or _promoted(server, log)
    return _promoted(server, log)


def _ready(server: LocalServer) -> bool:
    found = server.postmaster()
    return found is not None and found[1] == "ready"


def _ask(server: LocalServer, query: str) -> bool:
    try:
        with psycopg.connect(server.conninfo().tool_conninfo(), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(query).fetchone()
            return row is not None and bool(row[0])
    except psycopg.Error:
        return False


SCRATCH_SETTINGS = {"fsync": "off", "hot_standby": "on", "huge_pages": "off"}
"""The private start of a scratch cluster (``Layout.scratch``): it is removed after use, so
nothing in it needs to reach the disk; it is read at its target as a paused hot standby. No
huge pages: the live server may hold them all. The buffer pool stays as configured: a smaller
one would spare promotion's end-of-recovery checkpoint the writing of the pages replay dirtied,
but replay then writes and rereads a page for every pass over it (six updates of a 44 MB table
replayed in 0.75 s instead of 0.45 s)."""


def recover(server: LocalServer, layout: Layout, timeout: float | None, reporter: Reporter,
            promote: bool = False, first: Callable[[], None] | None = None) -> RecoveryPoint:
    """Start ``server`` privately and wait until recovery reached the target and promoted
    (or, for ``recovery_target_action = 'pause'``, paused there).

    ``promote`` (with ``'pause'``): promotion is asked for (``pg_promote``) as soon as the
    server takes read-only connections, while it still replays. Outside standby mode
    PostgreSQL looks at that request only where it would pause: replay goes on to the
    target, and there, instead of pausing, the server promotes at once without the
    end-of-recovery checkpoint of every page replay dirtied (0.1 s, 135 MB, in the
    benchmark's table PITR; ``'promote'`` takes it). A request too late for that leaves
    the server paused (the point's ``paused``): :func:`promote_paused` finishes it.

    On Linux the start syncs the laid-out data directory with one ``syncfs`` instead of an
    ``fsync`` per file (``recovery_init_sync_method``, for this start only): a server starting
    from a backup label first makes every file durable, and with thousands of files the
    per-file flushes alone took seconds.

    A scratch lay-out (``Layout.scratch``) starts with ``fsync`` off (no sync of the laid-out
    directory at start) and may pause at its target: it is read there as a hot standby, in
    the state promotion would leave it in (the same transactions visible), without the
    end-of-recovery checkpoint and timeline switch, when its lay-out asked for that
    (``lay_out(pause=True)``). The point's ``paused`` says which state it is in.

    ``first`` is called once, before this function connects to the server at all, once
    recovery reached the target (paused or promoted there); what it raises ends the wait (the
    server left running, for the caller to stop). A table request's partial lay-out, which
    left every database but the tables' one out, checks there that it is that one it
    connects to: before the target, the database of that name may be another one, and a
    connection to a database left out makes the server PANIC. So with ``first`` the early
    promotion is asked for without a connection (``pg_ctl promote``)."""
    settings = {**(INIT_SYNC if sys.platform.startswith("linux") and not layout.scratch else {}),
                **(PARTIAL_SETTINGS if layout.choice is not None else {}),
                **(SCRATCH_SETTINGS if layout.scratch else {})}
    log = LogWatch(server, (LOG_PROMOTED, LOG_PAUSED, LOG_HOT_STANDBY), server.log_offset())
    server.start_private(settings or None)
    reporter.event("recovery started", target=layout.settings.get("recovery_target_time")
                   or layout.settings.get("recovery_target_lsn") or layout.settings.get("recovery_target_name")
                   or "end of archive")
    seen = [0]

    def tick() -> None:
        restored = len(set(LOG_RESTORED.findall(server.log_text())))
        if restored >= seen[0] + 10:
            reporter.event("recovering", segments_restored=restored)
            seen[0] = restored

    pausing = layout.settings.get("recovery_target_action") == "pause"
    asking = [pausing and promote]
    looking = [first]

    def reached() -> bool:
        look = looking[0]
        if look is not None:
            if asking[0] and log.saw(LOG_HOT_STANDBY):
                asking[0] = not server.request_promotion()
            if not ((log.saw(LOG_PAUSED) or log.saw(LOG_PROMOTED)) and _ready(server)):
                return False
            look()
            looking[0] = None
        if asking[0] and log.saw(LOG_HOT_STANDBY):
            asking[0] = not _ask(server, "SELECT pg_promote(false)")
        return _paused_or_promoted(server, log) if pausing else _promoted(server, log)
    try:
        server.wait_until(reached, timeout, "recovery", tick)
    except DatabaseError as exc:
        fetch_errors = [ln.strip() for ln in server.log_text().splitlines() if "backup-tool: error" in ln]
        if fetch_errors:
            raise DatabaseError(f"recovery failed: {fetch_errors[-1]}", f"see {server.log_file}") from exc
        raise
    point = parse_recovery_log(server.log_text())
    if layout.stop is not None:
        point = dataclasses.replace(point, last_transaction_time=layout.stop.time)
    with server.conninfo().connect() as conn:
        row = conn.execute("SELECT pg_last_xact_replay_timestamp(),"
                           " (SELECT timeline_id FROM pg_control_checkpoint()), pg_is_in_recovery(),"
                           " pg_last_wal_replay_lsn()::text").fetchone()
    if row is not None:
        point = RecoveryPoint(point.stop_reason, point.last_transaction_time or row[0],
                              point.redo_done_lsn or (row[3] if row[2] else None), point.timeline or row[1],
                              point.segments_restored, paused=bool(row[2]))
    reporter.event("recovery finished", stop=point.stop_reason, lsn=point.redo_done_lsn,
                   time=utc_iso(point.last_transaction_time) if point.last_transaction_time else None,
                   timeline=point.timeline, segments_restored=point.segments_restored, paused=point.paused)
    return point


PROMOTE_RETRY_SECONDS = 0.05
PROMOTE_TRIES = 20
"""How long :func:`promote_paused` lets a paused startup process take a promotion before
ending its pause again, and how many times, before it just ends the pause."""


def promote_paused(server: LocalServer, timeout: float = 60.0) -> None:
    """Promote a cluster paused at its recovery target (:func:`recover` with
    ``recovery_target_action = 'pause'``) without an end-of-recovery checkpoint; returns once
    it accepts writes.

    PostgreSQL (15) promotes without that checkpoint (an end-of-recovery record, the
    checkpoint left to the checkpointer's own pace) only when promotion was asked for with
    ``pg_promote`` and the startup process sees it; paused, it looks only once a second.
    Ending the pause wakes it at once, but then it promotes with the immediate checkpoint
    of every page replay dirtied (0.1 s in the benchmark's table PITR, the same as
    ``recovery_target_action = 'promote'``). So the promotion is asked for, then the pause
    is ended and asked for again in one statement: the woken startup process finds the
    pause still wanted and, in the loop that waits for it to end, the promotion. The pair
    is repeated every :data:`PROMOTE_RETRY_SECONDS`; after :data:`PROMOTE_TRIES` (or when
    the promotion could not be asked for) the pause is just ended. However it goes, the
    cluster ends up promoted from the same target, replaying nothing more, at worst with
    that checkpoint."""
    deadline = time.monotonic() + timeout
    with server.conninfo().connect() as conn:
        row = conn.execute("SELECT pg_promote(false)").fetchone()
        tries = PROMOTE_TRIES if row is not None and row[0] else 0
        while True:
            try:
                conn.execute("SELECT pg_wal_replay_resume(), pg_wal_replay_pause()" if tries > 0
                             else "SELECT pg_wal_replay_resume()")
            except psycopg.errors.ObjectNotInPrerequisiteState:
                pass
            tries -= 1
            retry = time.monotonic() + PROMOTE_RETRY_SECONDS
            while time.monotonic() < retry:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    return
                time.sleep(0.002)
            if time.monotonic() > deadline:
                raise DatabaseError(f"the recovered cluster did not promote within {timeout:.0f} s",
                                    f"see {server.log_file}")


def _check_reached_end(point: RecoveryPoint, layout: Layout, where: str) -> None:
    """After --latest: recovery must not have stopped before the archive's end."""
    if point.redo_done_lsn is None:
        return
    cov = layout.plan.coverage
    seg_size = layout.plan.physical.wal_segment_size
    if wal.lsn_segment(walnames.parse_lsn(point.redo_done_lsn), seg_size) + 1 < wal.lsn_segment(cov.end_lsn, seg_size):
        raise DatabaseError(f"recovery ended at {point.redo_done_lsn} although the archive continues to "
                            f"{cov.last_segment} in {where}",
                            "a segment could not be fetched: check the server log and 'backup-tool wal status'")


def validate_cluster(server: LocalServer, jobs: int, reporter: Reporter) -> ValidationReport:
    """The health checks that need no manifest, on every database of the recovered cluster, as
    on a physical copy: states WAL replay copies from the source (invalid indexes, logged
    sequences behind their columns) are listed, not failed."""
    with server.conninfo().connect() as conn:
        dbs = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND datname NOT IN ('template0', 'template1')"
            " ORDER BY 1").fetchall()]
    checks: list[Check] = []
    for db in dbs:
        report = validate(server.conninfo(db), None, None, jobs=jobs, reporter=reporter, physical_copy=True)
        checks.extend(Check(f"{db}: {c.name}", c.ok, c.detail) for c in report.checks)
    return ValidationReport(str(server.pgdata), None, tuple(checks))


def restore_pitr(settings: Settings, target: Target, pgdata: str | Path, port: int | None = None,
                 start: bool = True, os_user: str | None = None, archive: bool = True,
                 server_command: str | None = None, run_validation: bool | None = None,
                 timeout: float | None = None, reporter: Reporter | None = None,
                 database: str | None = None, wait: float = 0.0, only_database: str | None = None) -> PitrResult:
    """``restore pitr``: lay out, and with ``start`` recover, validate and start the server.
    ``database``: use only base backups of a cluster that held this database. ``wait``: seconds
    to wait for the archive to reach a time target (see :func:`plan_recovery`).
    ``only_database``: restore that database alone (with ``postgres`` and the templates):
    the others are laid out as sparse files when the backup allows it
    (:mod:`backup_tool.physical.partial`) and dropped once recovery has promoted, before
    validation; when the partial lay-out cannot hold the database as recovered, the whole
    backup is laid out and recovered instead.

    A failed validation does not raise (the server is recovered and running either way):
    the result's ``ok`` is False and its ``validation`` names the failed checks.
    """
    reporter = reporter or NullReporter()
    if start and port is not None and _port_in_use(port):
        raise RefusedError(f"port {port} is already in use on this machine",
                           "pass another --port for the restored server")
    if only_database and not start:
        raise UsageError("--only-database needs the server started (the other databases are dropped after "
                         "recovery)", "leave out --no-start")
    request = PartialRequest(only_database, None) if only_database else None
    layout = lay_out(settings, target, Path(pgdata), port, os_user, archive, server_command, reporter, database,
                     server_binaries=start, wait=wait, partial_for=request, recovering=start)
    if not start:
        return PitrResult(layout.plan.backup.id, str(layout.pgdata), target, layout.os_user, port, False,
                          None, None, layout.seconds, 0.0, layout.bytes_written, layout.plan.physical.databases,
                          layout.plan.backup.finished_at, wal_prefetched=layout.stop_prefetch())
    started = time.monotonic()
    with private_dir(layout.os_user) as priv:
        server = server_for(layout, priv, port or 5432)
        try:
            point = recover(server, layout, timeout, reporter)
            prefetched = layout.stop_prefetch()
            dropped: tuple[str, ...] = ()
            if only_database:
                layout, point = _only_database_recovered(settings, target, layout, point, server, only_database,
                                                         port, os_user, archive, server_command, timeout,
                                                         database, reporter)
                try:
                    dropped = _keep_only(server, only_database, reporter)
                except BaseException:
                    server.stop("immediate")
                    _empty_dir(layout.pgdata, remove=False)
                    raise
            host = Background(_host_changes, server, name="host-settings")
            if target.kind == "latest":
                _check_reached_end(point, layout, layout.repo_url)
            do_validate = settings.policy.validation.after_restore if run_validation is None else run_validation
            report = validate_cluster(server, settings.policy.backup.jobs, reporter) if do_validate else None
        finally:
            layout.stop_prefetch()
            server.stop("fast")
            settle_restore_command(layout)
    _adapt_to_this_host(server, reporter, host.result())
    server.start_normal()
    seconds = time.monotonic() - started
    reporter.event("server running", pgdata=str(layout.pgdata), port=port or "as configured")
    result = PitrResult(layout.plan.backup.id, str(layout.pgdata), target, layout.os_user, port, True,
                        point, report, layout.seconds, seconds, layout.bytes_written, layout.plan.physical.databases,
                        layout.plan.backup.finished_at, only_database, dropped,
                        "partial" if layout.choice is not None else "full", layout.bytes_fetched,
                        wal_prefetched=prefetched)
    if report is not None and not report.ok:
        reporter.warning(f"the recovered cluster failed {len(report.failed)} check(s)",
                         failed=[c.name for c in report.failed])
    return result


def _only_database_recovered(settings: Settings, target: Target, layout: Layout, point: RecoveryPoint,
                             server: LocalServer, name: str, port: int | None, os_user: str | None, archive: bool,
                             server_command: str | None, timeout: float | None, database: str | None,
                             reporter: Reporter) -> tuple[Layout, RecoveryPoint]:
    """Check the recovered cluster holds database ``name`` and that the partial lay-out served
    it; otherwise lay out the whole backup in the same directory and recover again."""
    try:
        with psycopg.connect(server.conninfo(name).tool_conninfo(), autocommit=True) as conn:
            missed = partial_shortfall(conn, layout, server.log_text(), None)
    except psycopg.OperationalError as exc:
        server.stop("immediate")
        _empty_dir(layout.pgdata, remove=False)
        raise NotFoundError(f"database {name} does not exist at {target.describe()} ({exc})".splitlines()[0],
                            "check the name and the target; nothing was left in --pgdata") from None
    except BaseException:
        server.stop("immediate")
        _empty_dir(layout.pgdata, remove=False)
        raise
    if not missed:
        return layout, point
    reporter.event("the partial lay-out does not hold the database as recovered; laying out the whole "
                   "base backup", missed=missed)
    server.stop("immediate")
    _empty_dir(layout.pgdata, remove=False)
    full = lay_out(settings, target, layout.pgdata, port, os_user, archive, server_command, reporter, database,
                   plan=layout.plan, server_binaries=True, recovering=True)
    return full, recover(server, full, timeout, reporter)


def partial_shortfall(conn: Any, layout: Layout, log_text: str, table_oids: list[int] | None) -> list[str]:
    """After recovery from a partial lay-out: why it does not hold the tables ``table_oids``
    (None: the whole database ``conn`` is in) as recovered; empty when it does, or when the
    lay-out was full. Raises IntegrityError when replay skipped a block of a file laid out in
    full (a full lay-out would have stopped there: the backup or the archive is damaged)."""
    if layout.choice is None:
        return []
    bad = partial.unexplained_invalid_pages(log_text, layout.choice.sparse_files)
    if bad:
        raise IntegrityError(f"recovery met WAL records for pages the base backup does not hold, in {bad[0]}"
                             f"{' ...' if len(bad) > 1 else ''}",
                             "the base backup or the WAL archive is damaged: run 'backup-tool verify all' "
                             "and recover from another base backup")
    if table_oids is None:
        row = conn.execute(partial.DATABASE_FILES_SQL).fetchone()
    else:
        row = conn.execute(partial.FILES_AT_TARGET_SQL, (table_oids,)).fetchone()
    return partial.missed_files(int(row[0]), [int(f) for f in row[1]], layout.choice, layout.databases_in_backup)


def _keep_only(server: LocalServer, database: str, reporter: Reporter) -> tuple[str, ...]:
    """Drop every database but ``database`` and the templates / ``postgres`` (whose sparse
    files were never meant to be read); returns the dropped names."""
    with server.conninfo(database).connect() as conn:
        names = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname NOT IN (%s, 'postgres', 'template0', 'template1') "
            "ORDER BY 1", (database,)).fetchall()]
        for name in names:
            database_level.drop_database(conn, name)
    reporter.event("other databases dropped", kept=database, dropped=names)
    return tuple(names)


def _adapt_to_this_host(server: LocalServer, reporter: Reporter, changes: dict[str, str]) -> None:
    """Override, with a warning, the settings :func:`_host_changes` found."""
    if changes:
        _append_conf(server.pgdata, changes, "settings this host cannot honour")
        reporter.warning("restored configuration adjusted for this host", **changes)


def _host_changes(server: LocalServer) -> dict[str, str]:
    """Settings of the backed-up server that would stop it from starting here (socket
    directories or TLS files that do not exist on this machine), as they should be. Read
    with ``postgres -C`` from the restored configuration files, which recovery and
    validation do not change, so it runs beside them."""
    changes: dict[str, str] = {}
    sockets = [d.strip() for d in server.config_value("unix_socket_directories").split(",")]
    if any(d and not d.startswith("@") and not Path(d).is_dir() for d in sockets):
        changes["unix_socket_directories"] = "/var/run/postgresql" if Path("/var/run/postgresql").is_dir() else "/tmp"
    if server.config_value("ssl") == "on":
        files = [server.config_value(k) for k in ("ssl_cert_file", "ssl_key_file")]
        if any(not (server.pgdata / f).exists() for f in files if f):
            changes["ssl"] = "off"
    return changes


@contextmanager
def private_dir(os_user: str) -> Iterator[Path]:
    """A short-path directory only ``os_user`` (and root) can enter, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="bt-"))
    try:
        path.chmod(0o700)
        chown_to(path, os_user)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- tables at a time


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so cleanup runs as for Ctrl-C."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
