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
- Push-ahead: a detached process pushes the segments PostgreSQL has marked ready
  (``pg_wal/archive_status/*.ready``) in parallel and records each, *after* it is durable,
  in a spool directory beside them (``pg_wal/backup-tool-spool``); PostgreSQL's call for a
  segment waits for that record and returns without contacting the repository. The
  writing side is :mod:`backup_tool.physical.walpush`, the records
  :mod:`backup_tool.physical.walack`.

The pure functions at the end (timeline paths, continuity, gaps) decide what the archive
covers; :mod:`backup_tool.physical.pitr` and the monitoring commands build on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from backup_tool.config.locations import repo_url
from backup_tool.config.settings import Settings
from backup_tool.core import walnames
from backup_tool.core.checks import Check
from backup_tool.core.kinds import BackupKind
from backup_tool.core.walnames import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT_RE,
    format_lsn,
    lsn_segment,
    segment_name,
    segment_number,
    segment_timeline,
)
from backup_tool.errors import (
    BackupToolError,
    IntegrityError,
    NotFoundError,
    StorageError,
)
from backup_tool.governance.walcoverage import Coverage, Gap, archive_coverage, parse_history
from backup_tool.physical.walpush import (  # noqa: F401 - re-exported: the archive's API
    DEFAULT_BATCH,
    WalConflictError,
    push,
    push_file,
    wal_lock,
)
from backup_tool.physical.walspool import (
    drop_older,
    keep_fetched,
    prefetch_dir,
)
from backup_tool.repository.catalog import Catalog
from backup_tool.repository.storage import open_repository, open_storage
from backup_tool.repository.storage.base import (
    HashingCounter,
    Storage,
)
from backup_tool.repository.walarchive import (  # noqa: F401 - object_key re-exported
    WalFile,
    WalSegment,
    find_archived,
    list_archive,
    object_key,
    segments_of,
    wal_file_kind,
)
from backup_tool.streams.pipeline import ChunkReader

if TYPE_CHECKING:
    import psycopg

READ_SIZE = 1 << 20
DEFAULT_PREFETCH = 8



class WalMissingError(NotFoundError):
    """The requested file is not in the archive (for recovery: the end of the archive)."""


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
    found = find_archived(storage, name)
    if not found:
        raise WalMissingError(f"{name} is not in the archive {storage.url}",
                              "this is the normal end of the archive during recovery")
    if len({f.sha256 for f in found}) > 1:
        raise IntegrityError(f"{name} is archived more than once with different content",
                             "keep the right copy and remove the other from the repository")
    return found[0]


def read_archived(storage: Storage, obj: WalFile) -> Iterator[bytes]:
    """Decompressed content of an archived file; raises IntegrityError at the end unless the
    content's sha256 equals the one recorded in its key (see :func:`_read_archived_into`)."""
    import zstandard

    buffer = memoryview(bytearray(READ_SIZE))
    for n in _read_archived_into(storage, obj, zstandard.ZstdDecompressor(), buffer):
        yield bytes(buffer[:n])


_THREAD: Any = None
"""A ``threading.local`` (made on first use: ``wal fetch`` starts without threading): per
thread, the zstd decompressor and the buffer :func:`_download` reuses from one segment to the
next (one segment at a time per thread)."""


def _thread_tools() -> tuple[Any, memoryview]:
    global _THREAD
    if _THREAD is None:
        import threading

        _THREAD = threading.local()
    if getattr(_THREAD, "dctx", None) is None:
        import zstandard

        _THREAD.dctx, _THREAD.buffer = zstandard.ZstdDecompressor(), memoryview(bytearray(READ_SIZE))
    return _THREAD.dctx, _THREAD.buffer


def _read_archived_into(storage: Storage, obj: WalFile, dctx: Any, buffer: memoryview) -> Iterator[int]:
    """:func:`read_archived` decompressing with ``dctx`` into ``buffer``: yields how many bytes
    of it each step filled (to be used before the next step overwrites them), with the same
    verification and errors; the stored object's chunks go to the decompressor whole.

    Why: a segment then maps no fresh memory. A new decompressor per segment maps its window
    buffer afresh, and 1 MiB ``bytes`` made and freed per step are mapped and unmapped by
    glibc each time; every first touch of a page costs a fault (and, on this VM, the host's
    work behind it): the 18 segments of the benchmark's table PITR took 37k page faults on
    one thread, 18k this way."""
    import zstandard

    counter = HashingCounter()
    try:
        reader = dctx.stream_reader(ChunkReader(storage.get(obj.key)),  # ChunkReader has read(n), all zstandard needs
                                    read_size=READ_SIZE, read_across_frames=True)
        while n := reader.readinto(buffer):
            counter.update(buffer[:n])
            yield n
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
    dctx, buffer = _thread_tools()
    try:
        with open(tmp, "wb", buffering=0) as fh:
            for n in _read_archived_into(storage, obj, dctx, buffer):
                done = 0
                while done < n:
                    done += fh.write(buffer[done:n])
                size += n
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
    url = repo_url(repo)
    fetch(open_repository(url), name, destination)
    prefetch_in_background(url, name, destination, DEFAULT_PREFETCH if prefetch is None else prefetch)


def _keep_for_asking_again(dest: Path, name: str) -> None:
    """Keep a link to a fetched segment in the read-ahead directory: at the end of the
    archive PostgreSQL asks again for the last segment it replayed. The older segments of
    its timeline there are dropped, as when one is taken from the directory."""
    folder = prefetch_dir(dest)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        keep_fetched(dest, folder / name)
        drop_older(folder, name)
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

        prefetch(open_storage(repo_url), name, destination, count, seg_size)
    except BaseException:  # noqa: BLE001 - detached read-ahead: restore_command fetches anything it missed
        pass
    finally:
        os._exit(0)


# --------------------------------------------------------------------------- health


PREFETCH_WORKERS = 4
PREFETCH_WINDOW = 16


class RecoveryPrefetch:
    """Downloads the segments a recovery will ask for into the read-ahead directory of
    ``pg_wal`` (see :func:`take_prefetched`), ``workers`` at a time and in order, while the
    ``restore pitr`` process lays out the base backup and then while the server recovers:
    PostgreSQL's ``restore_command`` then finds each one already there (pgBackRest's
    asynchronous archive-get, done by the restoring process itself).

    Guarantees: a file enters the directory only complete and verified (as :func:`fetch`
    writes it); at most ``window`` segments are held on disk (the last one recovery took,
    which it may ask for again, and those after it);
    a download that fails or a segment the archive lacks only stops the read-ahead
    (``restore_command`` then fetches from the repository as usual). While it runs, it holds
    the directory's lock, so the per-call read-ahead of ``wal fetch`` stays out of its way.
    """

    def __init__(self, storage: Storage, names: list[str], pg_wal: Path, owner: Callable[[Path], None],
                 workers: int = PREFETCH_WORKERS, window: int = PREFETCH_WINDOW) -> None:
        import threading

        self.storage = storage
        self.names = names
        self.folder = prefetch_dir(pg_wal / "RECOVERYXLOG")
        self.owner = owner
        self.workers = max(1, workers)
        self.window = max(self.workers, window)
        self._window = self.window
        self.fetched: list[str] = []
        self.failure: str | None = None
        self._next = 0
        self._limit = len(names)
        self._done: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_file: Any = None

    def start(self) -> "RecoveryPrefetch":
        import fcntl
        import threading

        if not self.names:
            return self
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.owner(self.folder.parent)
        self.owner(self.folder)
        self._lock_file = open(self.folder / ".lock", "w")
        self.owner(self.folder / ".lock")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            return self
        self._threads = [threading.Thread(target=self._work, name=f"wal-prefetch-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[str]:
        """Stop reading ahead (downloads under way finish first); the segments fetched."""
        self._stop.set()
        for t in self._threads:
            t.join()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        return list(self.fetched)

    def wait_leading(self, count: int) -> list[str]:
        """Wait until the read-ahead holds the first ``count`` segments of ``names`` (its
        window widened to that until :meth:`reset_window`), or has ended (all fetched, failed
        or stopped); the leading run of ``names`` it holds then, in order."""
        want = min(count, len(self.names))
        self.window = max(self.window, want)
        while True:
            with self._lock:
                done = set(self._done)
                ended = self.failure is not None or self._next >= self._limit and len(done) >= self._next
            leading = 0
            while leading in done:
                leading += 1
            if leading >= want or ended or self._stop.is_set() or not any(t.is_alive() for t in self._threads):
                return self.names[:leading]
            self._stop.wait(0.01)

    def reset_window(self) -> None:
        """Back to the window it started with: no more segments fetched ahead of recovery
        than that (those held already stay until recovery takes them)."""
        self.window = self._window

    def limit(self, count: int) -> None:
        """Fetch none of ``names`` from the ``count``-th on, and hold none of them: those
        downloaded already go at once, one under way when it lands. Recovery is known to
        need no more (a segment it asks for after all is fetched by ``restore_command`` as
        without the read-ahead); what they held on disk and in the page cache is free again
        for what comes next (the recovery's buffers, the restore), which reuses memory the
        kernel just freed more cheaply than memory it has not touched for a while."""
        with self._lock:
            self._limit = max(0, min(self._limit, count))
            beyond = [self.names[i] for i in self._done if i >= self._limit]
        for name in beyond:
            (self.folder / name).unlink(missing_ok=True)

    def _recovery_at(self) -> int:
        """Index in ``names`` recovery has reached at least: one past the newest segment
        downloaded here that is gone again (taking a segment drops the older ones)."""
        try:
            present = {e.name for e in os.scandir(self.folder)}
        except OSError:
            return 0
        with self._lock:
            done = list(self._done)
        return max((i + 1 for i in done if self.names[i] not in present), default=0)

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._next >= self._limit or self.failure is not None:
                    return
                index = self._next
                self._next += 1
            name = self.names[index]
            while not self._stop.is_set() and index >= self._recovery_at() + self.window and index < self._limit:
                self._stop.wait(0.05)
            if self._stop.is_set() or index >= self._limit:
                return
            target = self.folder / name
            if not target.exists():
                try:
                    _download(self.storage, open_archived(self.storage, name), target)
                    self.owner(target)
                except (BackupToolError, OSError) as exc:
                    with self._lock:
                        self.failure = self.failure or f"{name}: {exc}"
                    return
                with self._lock:
                    self.fetched.append(name)
            with self._lock:
                self._done.add(index)
                past = index >= self._limit
            if past:
                target.unlink(missing_ok=True)


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

    def checks(self, max_age: timedelta | None = None) -> list[Check]:
        """``wal_continuity`` and ``wal_newest_age`` as validation checks."""
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


def repository_health(settings: Settings, now: datetime | None = None) -> ArchiveHealth:
    """The WAL archive's continuity after the oldest base backup and its newest segment's age."""
    storage = open_repository(settings.repo_url)
    bases = [m.physical for m in Catalog(storage).of_kinds([BackupKind.BASE])[0] if m.physical]
    return archive_health(storage, [(p.timeline, walnames.parse_lsn(p.start_lsn), p.wal_segment_size)
                                    for p in bases], now)


def archiving_checks(conn: "psycopg.Connection[Any]", storage: Storage) -> list[Check]:
    """The server side of archiving, for ``check``: archive_mode and archive_command point at
    this tool, ``pg_stat_archiver`` shows no current failure, and the last segment the
    server archived is in *this* repository."""
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
