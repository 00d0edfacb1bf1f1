"""The WAL archive: ``wal push`` (archive_command), ``wal fetch`` (restore_command), and
what the archive covers.

Layout (keys relative to the repository root)::

    wal/<timeline+log>/<segment>-<sha256>.zst     a WAL segment (also ``<segment>.partial``)
    wal/history/<name>-<sha256>.zst               timeline history (``00000002.history``) and
                                                  backup history (``...00000028.backup``) files

``<timeline+log>`` is the first 16 hex digits of the segment name, so one directory holds
at most 256 segments (with 16 MiB segments) and fetching a segment is one LIST of
``wal/<dir>/<segment>-`` plus one GET. The sha256 in the key is that of the file's
*uncompressed* content: it identifies the content independently of the compressor, and
``fetch`` checks it (plus zstd's own frame checksum) before handing PostgreSQL anything.

Guarantees:

- ``push`` acknowledges a file only once its object is durable in the repository. Pushing
  the same name with the same content again succeeds without writing; the same name with
  different content is refused and nothing is overwritten (objects are never replaced).
- ``fetch`` writes the destination only after the content's sha256 matched, via a
  temporary file renamed into place: PostgreSQL never sees a partial or damaged segment.
  A file absent from the archive raises :class:`WalMissingError` (the normal end of the
  archive during recovery); anything else is a different error.
- Cluster identity: the first push records the pushing cluster (system identifier,
  PostgreSQL major) in ``wal/archive.info``; a push from another cluster is refused
  before anything is written (:mod:`backup_tool.repository.walidentity`).
- Batching: ``push`` of segment N may also push other segments PostgreSQL has marked
  ready (``pg_wal/archive_status/*.ready``) and record each, *after* it is durable, in a
  spool directory beside them (``pg_wal/backup-tool-spool``). PostgreSQL's next calls for
  those segments are then acknowledged from the spool (:func:`fast_ack`) without
  contacting the repository; a spool entry is only trusted while the segment file is the
  very same file (inode, size, modification time) that was pushed, to the same repository.

The pure functions at the end (timeline paths, continuity, gaps) decide what the archive
covers; :mod:`backup_tool.physical.pitr` and the monitoring commands build on them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from backup_tool.core import testhooks, walnames
from backup_tool.repository import walidentity
from backup_tool.errors import (
    BackupToolError,
    IntegrityError,
    NotFoundError,
    StorageError,
    UsageError,
)
from backup_tool.repository.storage.base import (
    HashingCounter,
    ObjectExistsError,
    ObjectLock,
    Storage,
)
from backup_tool.core.walnames import (  # noqa: F401  (re-exported: callers name them wal.<name>)
    DEFAULT_SEGMENT_SIZE,
    SEGMENT_RE,
    format_lsn,
    lsn_segment,
    parse_lsn,
    segment_name,
    segment_number,
    segment_timeline,
    segments_per_log,
)
from backup_tool.physical.walspool import (  # noqa: F401  (re-exported: the spool is part of this module's contract)
    SPOOL_DIR,
    fast_ack,
    keep_fetched,
    prefetch_dir,
    repo_identity,
    spool_dir,
    take_prefetched,
    try_fast_fetch,
    try_fast_push,
    write_marker,
)

if TYPE_CHECKING:
    import psycopg

    from backup_tool.validation.validate import Check

WAL_PREFIX = "wal/"
HISTORY_PREFIX = "wal/history/"
READ_SIZE = 1 << 20
DEFAULT_BATCH = 16
DEFAULT_PREFETCH = 8
SPOOL_IN_MEMORY = 1 << 20
PUSH_THREADS = 2

PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")
BACKUP_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
KEY_RE = re.compile(r"^(?P<name>[0-9A-F.a-z]+)-(?P<sha>[0-9a-f]{64})\.zst$")


class WalMissingError(NotFoundError):
    """The requested file is not in the archive (for recovery: the end of the archive)."""


class WalConflictError(BackupToolError):
    """A file of that name is already archived with different content."""


# --------------------------------------------------------------------------- names


def wal_file_kind(name: str) -> str:
    """``segment``, ``partial``, ``backup`` or ``history``; UsageError for anything else."""
    if SEGMENT_RE.match(name):
        return "segment"
    if PARTIAL_RE.match(name):
        return "partial"
    if BACKUP_RE.match(name):
        return "backup"
    if HISTORY_RE.match(name):
        return "history"
    raise UsageError(f"{name!r} is not a WAL file name",
                     "expected a segment (24 hex digits), a .partial, .backup or .history file")


def archive_dir(name: str) -> str:
    kind = wal_file_kind(name)
    if kind in ("history", "backup"):
        return HISTORY_PREFIX
    return f"{WAL_PREFIX}{name[:16]}/"


def object_key(name: str, sha256: str) -> str:
    return f"{archive_dir(name)}{name}-{sha256}.zst"


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class WalSegment:
    """One archived WAL segment (retention and monitoring read these)."""

    name: str
    timeline: int
    key: str
    size: int
    modified: datetime

    @property
    def sha256(self) -> str:
        return self.key.rsplit("-", 1)[1].removesuffix(".zst")

    def segno(self, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        return segment_number(self.name, seg_size)


@dataclass(frozen=True)
class WalFile:
    """Any archived WAL-related file: segment, partial segment, history or backup label."""

    name: str
    kind: str
    key: str
    size: int
    modified: datetime
    sha256: str


def _parse_key(key: str) -> tuple[str, str] | None:
    match = KEY_RE.match(key.rsplit("/", 1)[-1])
    if not match:
        return None
    return match["name"], match["sha"]


def list_archive(storage: Storage) -> list[WalFile]:
    """Every archived WAL file (segments, partials, history and backup files), by key."""
    found = []
    for info in storage.list(WAL_PREFIX):
        parsed = _parse_key(info.key)
        if parsed is None:
            continue
        name, sha = parsed
        try:
            kind = wal_file_kind(name)
        except UsageError:
            continue
        found.append(WalFile(name, kind, info.key, info.size, info.modified, sha))
    return found


def list_segments(storage: Storage) -> list[WalSegment]:
    """Every archived full WAL segment, sorted by name (timeline, then position)."""
    return segments_of(list_archive(storage))


def segments_of(files: Iterable[WalFile]) -> list[WalSegment]:
    return sorted((WalSegment(f.name, segment_timeline(f.name), f.key, f.size, f.modified)
                   for f in files if f.kind == "segment"), key=lambda s: (s.name, s.key))


def _find(storage: Storage, name: str) -> list[WalFile]:
    prefix = f"{archive_dir(name)}{name}-"
    found = []
    for info in storage.list(prefix):
        parsed = _parse_key(info.key)
        if parsed and parsed[0] == name:
            found.append(WalFile(name, wal_file_kind(name), info.key, info.size, info.modified, parsed[1]))
    return found


# --------------------------------------------------------------------------- push


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    raw_size: int
    stored_size: int
    sha256: str
    already_archived: bool
    ahead: tuple[str, ...] = ()
    from_spool: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "raw_size": self.raw_size,
                "stored_size": self.stored_size, "sha256": self.sha256,
                "already_archived": self.already_archived, "pushed_ahead": list(self.ahead),
                "from_spool": self.from_spool}


def _file_chunks(path: Path, counter: HashingCounter | None = None) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(READ_SIZE):
                if counter is not None:
                    counter.update(chunk)
                yield chunk
    except FileNotFoundError:
        raise NotFoundError(f"WAL file {path} does not exist",
                            "archive_command must be 'backup-tool wal push %p' (%p, not %f)") from None
    except OSError as exc:
        raise StorageError(f"cannot read WAL file {path}: {exc.strerror}") from None


def push_file(storage: Storage, path: Path, level: int = 3,
              archive: walidentity.ClusterIdentity | None = None) -> PushResult:
    """Archive one WAL file; idempotent for identical content, refuses different content,
    and refuses a segment whose own header names a cluster other than ``archive``'s.

    The file is read once: hashed and compressed together into a spooled buffer (memory up
    to 1 MiB, then a temporary file: the store's upload buffers are the only copy in
    memory), which is uploaded under the content's sha256 only if no object of that name
    exists yet.
    """
    import tempfile

    import zstandard

    name = path.name
    kind = wal_file_kind(name)
    if archive is not None and kind in ("segment", "partial"):
        own = walidentity.segment_identity(path)
        if own is not None and own.system_identifier != archive.system_identifier:
            raise walidentity.refusal(archive, own, storage.url, f"archiving {name}")
    counter = HashingCounter()
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as buf:
        chunker = cctx.chunker(chunk_size=READ_SIZE)
        for chunk in _file_chunks(path, counter):
            for out in chunker.compress(chunk):
                buf.write(out)
        for out in chunker.finish():
            buf.write(out)
        sha, size = counter.hexdigest(), counter.size
        existing = _find(storage, name)
        for obj in existing:
            if obj.sha256 == sha:
                return PushResult(name, obj.key, size, obj.size, sha, True)
        if existing:
            raise WalConflictError(
                f"{name} is already archived with different content ({existing[0].key}); nothing was overwritten",
                "two clusters may be archiving into the same repository: give each its own --repo")
        key = object_key(name, sha)
        buf.seek(0)

        def spooled() -> Iterator[bytes]:
            while chunk := buf.read(READ_SIZE):
                yield chunk
            buf.truncate(0)  # the store holds its own copy for retries: drop ours now

        try:
            result = storage.put(key, testhooks.paused_stream("wal:upload", spooled()))
        except ObjectExistsError:
            return PushResult(name, key, size, 0, sha, True)
    return PushResult(name, key, size, result.size, sha, False)


def _ready_ahead(path: Path, limit: int) -> list[Path]:
    status = path.parent / "archive_status"
    if limit <= 0 or not status.is_dir():
        return []
    names = []
    for entry in os.scandir(status):
        if entry.name.endswith(".ready"):
            name = entry.name[:-len(".ready")]
            if name != path.name:
                try:
                    wal_file_kind(name)
                except UsageError:
                    continue
                names.append(name)
    names.sort(key=lambda n: (not n.endswith(".history"), n))
    return [path.parent / n for n in names[:limit]]


def _sweep_spool(path: Path) -> None:
    spool = spool_dir(path)
    if not spool.is_dir():
        return
    if (spool / "prefetch").is_dir():
        import shutil

        shutil.rmtree(spool / "prefetch", ignore_errors=True)
    for entry in os.scandir(spool):
        if entry.name.endswith(".pushed") and not (path.parent / entry.name[:-len(".pushed")]).exists():
            Path(entry.path).unlink(missing_ok=True)


def _archive_identity(storage: Storage, path: Path, repo_url: str) -> walidentity.ClusterIdentity | None:
    """The pushing cluster, verified against (or recorded as) the archive's owner; from the
    spool's cache when this repository was verified before. None: the cluster is unknown."""
    local = walidentity.wal_file_identity(path)
    if local is None:
        return None
    repo_id, spool = repo_identity(repo_url), spool_dir(path)
    if not walidentity.cached(spool, repo_id, local):
        walidentity.claim_archive(storage, local, f"archiving {path.name}")
        walidentity.remember(spool, repo_id, local)
    return local


def push(storage: Storage, wal_path: str | Path, repo_url: str, level: int = 3,
         batch: int = DEFAULT_BATCH, lock: ObjectLock | None = None,
         warn: Callable[[str], None] | None = None) -> PushResult:
    """``archive_command``: archive ``wal_path``; with ``batch`` > 1 also push up to
    ``batch - 1`` other ready files in parallel and spool their acknowledgements.

    Returns only when ``wal_path`` itself is durable. Failures of files pushed ahead are
    reported through ``warn`` and leave no spool entry (PostgreSQL's own call retries them).
    """
    import concurrent.futures as cf

    path = Path(wal_path)
    if lock is not None:
        storage.lock_new_objects(lock)
    archive = _archive_identity(storage, path, repo_url)
    _sweep_spool(path)
    ahead = _ready_ahead(path, batch - 1)
    if not ahead:
        result = push_file(storage, path, level, archive)
        testhooks.pause_point("wal:before-ack")
        return result
    pushed: list[str] = []
    with cf.ThreadPoolExecutor(min(PUSH_THREADS, len(ahead) + 1), thread_name_prefix="wal-push") as pool:
        own = pool.submit(push_file, storage, path, level, archive)
        others = {pool.submit(push_file, storage, p, level, archive): p for p in ahead}
        for fut in cf.as_completed(others):
            p = others[fut]
            try:
                result = fut.result()
                write_marker(p, repo_identity(repo_url), result)
                pushed.append(p.name)
            except BackupToolError as exc:
                if warn is not None:
                    warn(f"pushing {p.name} ahead failed (PostgreSQL will retry it): {exc}")
            except OSError:
                pass
        result = own.result()
    testhooks.pause_point("wal:before-ack")
    return PushResult(result.name, result.key, result.raw_size, result.stored_size, result.sha256,
                      result.already_archived, tuple(sorted(pushed)))


def wal_lock(mode: str, pitr_days: int, now: datetime | None = None) -> ObjectLock | None:
    """Object Lock for newly archived WAL: kept immutable as long as the PITR window needs it."""
    if mode == "none":
        return None
    return ObjectLock(mode, (now or datetime.now(timezone.utc)) + timedelta(days=pitr_days))


# --------------------------------------------------------------------------- fetch


@dataclass(frozen=True)
class FetchResult:
    name: str
    key: str
    raw_size: int
    destination: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "raw_size": self.raw_size,
                "destination": self.destination}


def open_archived(storage: Storage, name: str) -> WalFile:
    """The archive's object for ``name``; WalMissingError if absent, IntegrityError if ambiguous."""
    found = _find(storage, name)
    if not found:
        raise WalMissingError(f"{name} is not in the archive {storage.url}",
                              "this is the normal end of the archive during recovery")
    if len({f.sha256 for f in found}) > 1:
        raise IntegrityError(f"{name} is archived more than once with different content",
                             "keep the right copy and remove the other from the repository")
    return found[0]


def read_archived(storage: Storage, obj: WalFile) -> Iterator[bytes]:
    """Decompressed content of an archived file; raises IntegrityError at the end unless the
    content's sha256 equals the one recorded in its key."""
    import zstandard

    counter = HashingCounter()
    dctx = zstandard.ZstdDecompressor()
    try:
        from backup_tool.streams.pipeline import ChunkReader

        reader = dctx.stream_reader(ChunkReader(storage.get(obj.key)),  # type: ignore[arg-type]
                                   read_across_frames=True)
        while chunk := reader.read(READ_SIZE):
            counter.update(chunk)
            yield chunk
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"archived {obj.name} is corrupt: it does not decompress ({exc})",
                             "recover to an earlier point, and take a new base backup") from None
    if counter.hexdigest() != obj.sha256:
        raise IntegrityError(
            f"archived {obj.name} is corrupt: content sha256 {counter.hexdigest()[:16]}… "
            f"does not match {obj.sha256[:16]}… recorded when it was archived",
            "recover to an earlier point, and take a new base backup")


def _download(storage: Storage, obj: WalFile, dest: Path) -> int:
    tmp = dest.with_name(f".{dest.name}.backup-tool-{os.getpid()}")
    size = 0
    try:
        with open(tmp, "wb") as fh:
            for chunk in read_archived(storage, obj):
                fh.write(chunk)
                size += len(chunk)
        os.replace(tmp, dest)
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return size


def fetch(storage: Storage, name: str, destination: str | Path) -> FetchResult:
    """``restore_command``: write archived ``name`` to ``destination`` once verified."""
    wal_file_kind(name)
    obj = open_archived(storage, name)
    dest = Path(destination)
    size = _download(storage, obj, dest)
    if SEGMENT_RE.match(name):
        _keep_for_asking_again(dest, name)
    return FetchResult(name, obj.key, size, str(dest))


def quick_fetch(name: str, destination: str, repo: str | None, prefetch: int | None) -> None:
    """``wal fetch`` as the executable's entry point runs it before loading the command line
    (PostgreSQL starts it once per file): the same steps as the command, repository from
    ``--repo``, ``BACKUP_TOOL_REPO`` or the default. Raises like :func:`fetch`."""
    from backup_tool.config.settings import repo_url
    from backup_tool.repository.storage import open_repository

    url = repo_url(repo)
    fetch(open_repository(url), name, destination)
    prefetch_in_background(url, name, destination, DEFAULT_PREFETCH if prefetch is None else prefetch)


def _keep_for_asking_again(dest: Path, name: str) -> None:
    """Keep a link to a fetched segment in the read-ahead directory: at the end of the
    archive PostgreSQL asks again for the last segment it replayed."""
    folder = prefetch_dir(dest)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        keep_fetched(dest, folder / name)
    except OSError:
        pass


# --------------------------------------------------------------------------- read-ahead for recovery


def segment_size_of(path: str | Path) -> int | None:
    """WAL segment size from a segment's first page header (``xlp_seg_size``), if it looks valid."""
    header = walnames.read_long_header(path)
    return header.segment_size if header else None


def prefetch(storage: Storage, name: str, destination: str | Path, count: int,
             seg_size: int = DEFAULT_SEGMENT_SIZE) -> list[str]:
    """Download and verify the ``count`` segments after ``name`` into the read-ahead
    directory (those not there yet), stopping at the first one not archived."""
    import fcntl

    folder = prefetch_dir(Path(destination))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return []
        tli = segment_timeline(name)
        start = segment_number(name, seg_size)
        fetched = []
        for segno in range(start + 1, start + 1 + count):
            next_name = segment_name(tli, segno, seg_size)
            target = folder / next_name
            if target.exists():
                continue
            try:
                obj = open_archived(storage, next_name)
            except WalMissingError:
                break
            _download(storage, obj, target)
            fetched.append(next_name)
        return fetched


def prefetch_in_background(repo_url: str, name: str, destination: str | Path, count: int) -> bool:
    """Fork a detached process that reads ahead ``count`` segments after ``name``; return at once.

    The child opens its own repository connection and never touches ``destination``; the
    restore_command that needs one of its files later takes it with :func:`take_prefetched`.
    """
    if count <= 0 or not SEGMENT_RE.match(name):
        return False
    seg_size = segment_size_of(destination)
    if seg_size is None:
        return False
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return True
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if os.fork():
            os._exit(0)
        from backup_tool.repository.storage import open_storage

        prefetch(open_storage(repo_url), name, destination, count, seg_size)
    except BaseException:  # noqa: BLE001 - detached read-ahead: restore_command fetches anything it missed
        pass
    finally:
        os._exit(0)


# --------------------------------------------------------------------------- coverage (pure)


@dataclass(frozen=True)
class TimelineSpan:
    """The WAL of ``timeline`` that a recovery along some timeline path reads: [begin, end)."""

    timeline: int
    begin: int
    end: int | None


def parse_history(text: str) -> list[tuple[int, int]]:
    """``(parent timeline, switch point LSN)`` entries of a timeline history file, oldest first."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2:
            entries.append((int(parts[0]), parse_lsn(parts[1])))
    return entries


def timeline_path(target: int, history: list[tuple[int, int]]) -> list[TimelineSpan]:
    """The spans a recovery to ``target`` replays, given ``target``'s history entries."""
    spans = []
    begin = 0
    for tli, switch in history:
        spans.append(TimelineSpan(tli, begin, switch))
        begin = switch
    spans.append(TimelineSpan(target, begin, None))
    return spans


def newest_timeline(start: int, history_timelines: Iterable[int]) -> int:
    """What ``recovery_target_timeline = 'latest'`` picks: probe start+1, start+2... while the
    archive holds their history files (as PostgreSQL does)."""
    have = set(history_timelines)
    newest = start
    while newest + 1 in have:
        newest += 1
    return newest


def timeline_for(path: list[TimelineSpan], segno: int, seg_size: int) -> int:
    """The timeline whose file recovery reads for segment ``segno`` (the newest one whose
    span begins in or before that segment)."""
    chosen = path[0].timeline
    for span in path:
        if span.begin // seg_size <= segno:
            chosen = span.timeline
    return chosen


@dataclass(frozen=True)
class Gap:
    """Missing WAL along a timeline path: from ``first_missing`` to ``last_missing``, with
    ``next_present`` the segment recovery would need to resume at."""

    first_missing: str
    next_present: str
    last_missing: str = ""

    def __str__(self) -> str:
        return f"missing from {self.first_missing} up to {self.next_present}"


@dataclass(frozen=True)
class Coverage:
    """Continuous WAL along a timeline path, from a starting segment.

    ``end_lsn`` is the first byte *not* covered (the end of the last continuous segment);
    ``archived_until`` the time that last segment was archived, so every record before
    that moment up to ``end_lsn`` can be replayed. ``gaps`` are holes followed by more WAL
    (a gap makes recovery past it impossible).
    """

    start_segment: str
    last_segment: str | None
    end_lsn: int
    archived_until: datetime | None
    gaps: tuple[Gap, ...] = field(default_factory=tuple)
    timeline: int = 1

    @property
    def continuous(self) -> bool:
        return not self.gaps


def _walk(present: Mapping[str, datetime | None], path: list[TimelineSpan], start: int,
          seg_size: int) -> tuple[str | None, int, tuple[Gap, ...]]:
    """(last continuous segment, its number + 1, gaps) along ``path`` from segment ``start``.

    Linear in the number of names plus the span walked: every segment number from ``start``
    to the newest one on the path is looked at once.
    """
    def name_at(segno: int) -> str:
        return segment_name(timeline_for(path, segno, seg_size), segno, seg_size)

    relevant = [segno for n in present if SEGMENT_RE.match(n)
                and (segno := segment_number(n, seg_size)) >= start
                and segment_timeline(n) == timeline_for(path, segno, seg_size)]
    top = max(relevant, default=start - 1)
    last: str | None = None
    end = start
    gaps: list[Gap] = []
    segno = start
    broken = False
    while segno <= top:
        name = name_at(segno)
        if name not in present:
            nxt = segno + 1
            while nxt <= top and name_at(nxt) not in present:
                nxt += 1
            if nxt <= top:
                gaps.append(Gap(name, name_at(nxt), name_at(nxt - 1)))
            broken = True
            segno = nxt
            continue
        if not broken:
            last, end = name, segno + 1
        segno += 1
    return last, end, tuple(gaps)


def coverage(segments: Iterable[WalSegment], path: list[TimelineSpan], start_lsn: int,
             seg_size: int = DEFAULT_SEGMENT_SIZE) -> Coverage:
    """How far the archive lets recovery go from ``start_lsn`` along ``path``."""
    present: dict[str, datetime | None] = {s.name: s.modified for s in segments}
    start = lsn_segment(start_lsn, seg_size)
    last, end, gaps = _walk(present, path, start, seg_size)
    return Coverage(segment_name(timeline_for(path, start, seg_size), start, seg_size),
                    last, end * seg_size, present[last] if last else None, gaps, path[-1].timeline)


def timeline_paths(start_timeline: int, hist: Mapping[int, Sequence[tuple[int, int]]]) -> list[list[TimelineSpan]]:
    """Every timeline path a recovery starting on ``start_timeline`` can follow: that
    timeline itself and each later one whose archived history descends from it."""
    paths = []
    for target in sorted({start_timeline, *[t for t in hist if t > start_timeline]}):
        history = list(hist.get(target, []))
        if target != start_timeline and start_timeline not in {p for p, _ in history}:
            continue
        paths.append(timeline_path(target, history))
    return paths


def archive_coverage(segments: Iterable[WalSegment], hist: Mapping[int, Sequence[tuple[int, int]]],
                     start_timeline: int, start_lsn: int,
                     seg_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[tuple[Coverage, ...], tuple[Gap, ...]]:
    """Coverage along every timeline path from (``start_timeline``, ``start_lsn``) and the
    union of their gaps: what ``check``, ``wal status``, ``status`` and ``audit`` report."""
    segments = list(segments)
    covs = tuple(coverage(segments, path, start_lsn, seg_size) for path in timeline_paths(start_timeline, hist))
    gaps: list[Gap] = []
    for cov in covs:
        gaps.extend(g for g in cov.gaps if g not in gaps)
    return covs, tuple(gaps)


def archive_gaps(names: Iterable[str], hist: Mapping[int, Sequence[tuple[int, int]]], start: str | None,
                 seg_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[Gap, ...]:
    """The gaps :func:`archive_coverage` finds, from segment names alone: from ``start`` (the
    oldest base backup's first segment), or from the oldest archived segment without one."""
    names = [n for n in names if SEGMENT_RE.match(n)]
    if start is None:
        if not names:
            return ()
        start = min(names, key=lambda n: (segment_number(n, seg_size), n))
    segments = [WalSegment(n, segment_timeline(n), "", 0, _EPOCH) for n in dict.fromkeys(names)]
    return archive_coverage(segments, hist, segment_timeline(start),
                            segment_number(start, seg_size) * seg_size, seg_size)[1]


_EPOCH = datetime.fromtimestamp(0, timezone.utc)


# --------------------------------------------------------------------------- health


def histories(storage: Storage, files: Iterable[WalFile]) -> dict[int, list[tuple[int, int]]]:
    """Parsed timeline history of every timeline that has an archived history file."""
    found: dict[int, list[tuple[int, int]]] = {}
    for f in files:
        if f.kind == "history":
            text = b"".join(read_archived(storage, f)).decode("utf-8", "replace")
            found[int(f.name[:8], 16)] = parse_history(text)
    return found


@dataclass(frozen=True)
class ArchiveHealth:
    """The archive's state as monitoring sees it (``check``, ``verify``, ``wal status``).

    ``gaps`` are holes in the WAL after the start of the oldest base backup, on every
    timeline path the archive holds: PITR past a gap is impossible. ``newest`` is the most
    recently archived segment; its age tells whether archiving is still running.
    """

    repository: str
    segments: int
    timelines: tuple[int, ...]
    newest: WalSegment | None
    newest_age_seconds: float | None
    oldest_base_start: str | None
    gaps: tuple[Gap, ...]
    coverage: tuple[Coverage, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "repository": self.repository, "segments": self.segments, "timelines": list(self.timelines),
            "newest_segment": self.newest.name if self.newest else None,
            "newest_archived_at": self.newest.modified.isoformat() if self.newest else None,
            "newest_age_seconds": self.newest_age_seconds,
            "oldest_base_start": self.oldest_base_start,
            "gaps": [str(g) for g in self.gaps],
            "coverage": [{"timeline": c.timeline, "from": c.start_segment, "to": c.last_segment,
                          "end_lsn": format_lsn(c.end_lsn),
                          "archived_until": c.archived_until.isoformat() if c.archived_until else None}
                         for c in self.coverage],
        }

    def checks(self, max_age: timedelta | None = None) -> list["Check"]:
        """``wal_continuity`` and ``wal_newest_age`` as validation checks."""
        from backup_tool.validation.validate import Check

        if self.oldest_base_start is None:
            cont = Check("wal_continuity", True, f"{self.segments} segments archived; no base backup yet")
        elif self.gaps:
            cont = Check("wal_continuity", False,
                         f"gap in the WAL archive: {'; '.join(str(g) for g in self.gaps[:3])} "
                         "(point-in-time recovery past a gap is impossible: take a new base backup)")
        else:
            ends = ", ".join(f"timeline {c.timeline} to {c.last_segment}" for c in self.coverage)
            cont = Check("wal_continuity", True,
                         f"continuous from {self.oldest_base_start} ({ends})")
        if self.newest is None:
            age = Check("wal_newest_age", False, "no WAL segment archived yet: check archive_command")
        else:
            seconds = self.newest_age_seconds or 0.0
            stale = max_age is not None and seconds > max_age.total_seconds()
            age = Check("wal_newest_age", not stale,
                        f"newest segment {self.newest.name} archived {_age(seconds)} ago"
                        + (f" (more than {_age(max_age.total_seconds())}: is archiving stuck?)"
                           if stale and max_age else ""))
        return [cont, age]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def archive_health(storage: Storage, base_starts: Iterable[tuple[int, int, int]],
                   now: datetime | None = None) -> ArchiveHealth:
    """Continuity and freshness of the archive after the oldest base backup.

    ``base_starts`` are ``(timeline, start LSN, segment size)`` of the base backups (e.g.
    from their manifests' ``physical`` sections).
    """
    now = now or datetime.now(timezone.utc)
    files = list_archive(storage)
    segments = segments_of(files)
    hist = histories(storage, files)
    timelines = tuple(sorted({s.timeline for s in segments} | set(hist)))
    newest = max(segments, key=lambda s: s.modified, default=None)
    starts = sorted(base_starts, key=lambda b: b[1])
    gaps: tuple[Gap, ...] = ()
    covs: tuple[Coverage, ...] = ()
    oldest = None
    if starts:
        tli, start_lsn, seg_size = starts[0]
        oldest = segment_name(tli, lsn_segment(start_lsn, seg_size), seg_size)
        covs, gaps = archive_coverage(segments, hist, tli, start_lsn, seg_size)
    return ArchiveHealth(storage.url, len(segments), timelines, newest,
                         (now - newest.modified).total_seconds() if newest else None,
                         oldest, gaps, covs)


def archiving_checks(conn: "psycopg.Connection[Any]", storage: Storage) -> list["Check"]:
    """The server side of archiving, for ``check``: archive_mode and archive_command point at
    this tool, ``pg_stat_archiver`` shows no current failure, and the last segment the
    server archived is in *this* repository."""
    from backup_tool.validation.validate import Check

    row = conn.execute(
        "SELECT current_setting('archive_mode'), current_setting('archive_command'),"
        " archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal,"
        " last_failed_time FROM pg_stat_archiver").fetchone()
    assert row is not None
    mode, command, archived, last_wal, last_time, failed, failed_wal, failed_time = row
    checks = []
    if mode not in ("on", "always"):
        checks.append(Check("archive_mode", False, f"archive_mode = {mode}: set it to on (needs a restart) "
                                                   "for point-in-time recovery"))
        return checks
    if "wal push" not in (command or ""):
        checks.append(Check("archive_command", False,
                            f"archive_command = {command!r} does not call 'backup-tool wal push %p'"))
    else:
        checks.append(Check("archive_command", True, command))
    if failed_time is not None and (last_time is None or failed_time > last_time):
        checks.append(Check("archiver_failures", False,
                            f"archiving is failing: {failed} failures, last for {failed_wal} at "
                            f"{failed_time:%Y-%m-%d %H:%M:%S%z}; see the server log for the archive_command's error"))
    else:
        checks.append(Check("archiver_failures", True,
                            f"{archived} archived, {failed} failed earlier, none failing now"))
    if last_wal:
        try:
            open_archived(storage, last_wal)
            checks.append(Check("archive_destination", True,
                                f"last archived {last_wal} is in {storage.url}"))
        except WalMissingError:
            checks.append(Check("archive_destination", False,
                                f"the server archived {last_wal} but it is not in {storage.url}: "
                                "archive_command pushes to another repository"))
    return checks
