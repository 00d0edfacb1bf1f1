"""Streaming building blocks: child processes, zstd (de)compression, checksum verification,
and the worker pool with cooperative cancellation.

Everything here works on iterators of byte chunks, so data flows from PostgreSQL to the
repository (and back) through bounded buffers: memory use depends on chunk and part sizes,
never on the size of a table. zstd releases the GIL, so parallel streams compress in
parallel.

Cancellation: on Ctrl-C or SIGTERM the CLI calls :func:`cancel`; every stream checks the
flag between chunks and every child process is killed, so workers stop within a chunk and
the operation's own cleanup (abort multipart uploads, discard partial objects, roll back
transactions, release locks) runs before the process exits.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import threading
import weakref
from collections import deque
from contextlib import contextmanager
from typing import IO, Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import zstandard

from backup_tool.errors import BackupToolError, DatabaseError, IntegrityError
from backup_tool.repository.manifest import StoredObject
from backup_tool.repository.storage.base import HashingCounter, Storage

CHUNK = 1 << 20
MIN_PIECE = 1 << 16
"""The smallest buffer :func:`decompress_views` reads an object's content into."""
R = TypeVar("R")
_CANCELLED = threading.Event()
_CHILDREN: "weakref.WeakSet[Process]" = weakref.WeakSet()


class Cancelled(BackupToolError):
    """The operation was interrupted (Ctrl-C or SIGTERM) and has cleaned up."""


def cancel() -> None:
    """Ask every stream to stop and kill every child process."""
    _CANCELLED.set()
    for child in list(_CHILDREN):
        try:
            child.proc.kill()
        except OSError:
            pass


def check_cancelled() -> None:
    if _CANCELLED.is_set():
        raise Cancelled("interrupted", "nothing was committed; run the command again")


class Process:
    """A child process whose stdout is streamed and whose stderr tail is kept for errors."""

    def __init__(self, argv: list[str], env: dict[str, str], what: str,
                 stdin: int | IO[bytes] | None = subprocess.DEVNULL, stdout: int | None = subprocess.PIPE) -> None:
        self.what = what
        self._stderr: deque[str] = deque(maxlen=20)
        try:
            self.proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                         env=env, start_new_session=True)
        except OSError as exc:
            raise DatabaseError(f"cannot run {argv[0]}: {exc.strerror}") from exc
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        _CHILDREN.add(self)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        fd = self.stdout.fileno()
        while chunk := os.read(fd, size):
            check_cancelled()
            yield chunk
        check_cancelled()

    def readinto(self, view: memoryview) -> int:
        """Read what the child has written, at most ``len(view)`` bytes, into ``view`` (no
        intermediate copy); 0 at the end of its output."""
        n = os.readv(self.stdout.fileno(), [view])
        check_cancelled()
        return n

    def error_text(self) -> str:
        return failure_line(self._stderr)

    def finish(self) -> None:
        """Wait for the process; raise DatabaseError with its error line if it failed."""
        code = self.proc.wait()
        self._reader.join(timeout=5)
        if code != 0:
            raise DatabaseError(f"{self.what} failed: {self.error_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(argv: list[str], env: dict[str, str], what: str, input_bytes: bytes | None = None) -> bytes:
    """Run a child to completion and return its stdout (for small outputs only)."""
    try:
        done = subprocess.run(argv, input=input_bytes, capture_output=True, env=env,
                              stdin=None if input_bytes is not None else subprocess.DEVNULL)
    except OSError as exc:
        raise DatabaseError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    _raise_failed(done.returncode, done.stderr, what)
    return done.stdout


def run_watching(argv: list[str], env: dict[str, str], what: str, on_line: Callable[[str], None]) -> None:
    """Run a child to completion, handing each line of its stderr to ``on_line`` as it is
    written (a tool's ``--verbose`` progress); stdout is discarded."""
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise DatabaseError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    assert proc.stderr is not None
    kept: deque[bytes] = deque(maxlen=200)
    with proc:
        for raw in proc.stderr:
            kept.append(raw)
            on_line(raw.decode("utf-8", "replace"))
    _raise_failed(proc.returncode, b"".join(kept), what)


# Lines a client tool prints as a consequence of an earlier error (a parallel pg_restore's
# leader reports its worker's death after the worker printed the real cause).
_CONSEQUENCES = ("worker process died unexpectedly", "errors ignored on restore")


def failure_line(stderr: bytes | Iterable[str]) -> str:
    """The line of a failed client tool's stderr that says what went wrong: the first error
    that is not a consequence of another, else the last line."""
    text = stderr.decode("utf-8", "replace").splitlines() if isinstance(stderr, bytes) else stderr
    lines = [ln for ln in text if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
    causes = [ln for ln in errors if not any(c in ln for c in _CONSEQUENCES)]
    line = causes[0] if causes else (errors or lines or ["no error output"])[-1]
    after = lines[lines.index(line) + 1:lines.index(line) + 2] if line in lines else []
    if after and ("HINT:" in after[0] or ": hint:" in after[0]):
        return f"{line} ({' '.join(after[0].split())})"
    return line


def _raise_failed(returncode: int, stderr: bytes, what: str) -> None:
    if returncode != 0:
        raise DatabaseError(f"{what} failed: {failure_line(stderr)}")


class StreamStats:
    """Uncompressed size and line count of a stream (COPY text has one line per row)."""

    def __init__(self) -> None:
        self.raw_size = 0
        self.lines = 0


FRAME = 4 << 20
"""Raw bytes per zstd frame of a compressed object (see :func:`compress_filled`)."""

Fill = Callable[[memoryview], int]
"""Copies the next bytes of a stream into the given buffer and returns how many (0: the
stream has ended; never called again after that)."""


class _Buffers:
    """Frame buffers kept for reuse across streams (at most ``keep``): a fresh buffer costs
    its page faults when first filled, a reused one nothing."""

    def __init__(self, keep: int) -> None:
        self._free: list[bytearray] = []
        self._keep = keep

    def take(self) -> bytearray:
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(FRAME)

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buf)


_BUFFERS = _Buffers(keep=8)


def fill_from(chunks: Iterable[bytes]) -> Fill:
    """A :data:`Fill` over an iterator of chunks (each byte copied once, into the buffer)."""
    source = iter(chunks)
    rest = memoryview(b"")

    def fill(view: memoryview) -> int:
        nonlocal rest
        while not rest:
            chunk = next(source, None)
            if chunk is None:
                return 0
            rest = memoryview(chunk).cast("B")
        n = min(len(view), len(rest))
        view[:n] = rest[:n]
        rest = rest[n:]
        return n

    return fill


def compress(chunks: Iterable[bytes], level: int, threads: int, stats: StreamStats,
             on_raw: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """:func:`compress_filled` over an iterator of chunks."""
    return compress_filled(fill_from(chunks), level, threads, stats, on_raw)


class FrameWorkers(Generic[R]):
    """Independent zstd frames compressed on worker threads, their results given back in the
    order they were submitted: the one home of parallel frame compression (logical objects
    here, a base backup's tar in :mod:`backup_tool.physical.basetar`).

    ``work(cctx, *args)`` runs on a worker with that thread's own compressor (a zstd context
    is not thread-safe, and making one per frame costs): it compresses its frame and may do
    more there (hash the output, count lines, hand a buffer back). zstd and hashlib release
    the GIL, so the workers and the submitting thread run at once. ``workers`` = 0 runs each
    frame at once on the submitting thread. The pool starts with the first :meth:`submit`, so
    a stream of one frame that goes through :meth:`here` never starts a thread.
    :meth:`close` cancels what has not started and waits for the rest (use ``with``)."""

    def __init__(self, level: int, workers: int, work: Callable[..., R], *,
                 content_size: bool = False) -> None:
        self._level = level
        self._workers = workers
        self._work = work
        self._content_size = content_size
        self._local = threading.local()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._inflight: deque[cf.Future[R]] = deque()

    def _run(self, *args: Any) -> R:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=self._content_size)
        return self._work(cctx, *args)

    def here(self, *args: Any) -> R:
        """One frame's work on this thread, outside the order of :meth:`submit`."""
        return self._run(*args)

    def submit(self, *args: Any) -> None:
        if self._workers < 1:
            done: cf.Future[R] = cf.Future()
            done.set_result(self._run(*args))
            self._inflight.append(done)
            return
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(self._workers, thread_name_prefix="zstd")
        self._inflight.append(self._pool.submit(self._run, *args))

    @property
    def started(self) -> bool:
        return bool(self._pool or self._inflight)

    def ready(self, limit: int) -> Iterator[R]:
        """Results in submission order until at most ``limit`` frames are left in flight."""
        while len(self._inflight) > limit:
            yield self._inflight.popleft().result()

    def close(self) -> None:
        for fut in self._inflight:
            fut.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "FrameWorkers[R]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compress_filled(fill: Fill, level: int, threads: int, stats: StreamStats,
                    on_raw: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The stream ``fill`` gives, as independent zstd frames of :data:`FRAME` raw bytes each
    (the last one shorter), each with its content size and checksum; an empty stream is one
    empty frame. Concatenated frames are one valid zstd stream (:func:`decompress` reads
    them, as it reads the single frame older objects hold).

    One-shot frames cost less CPU than one streaming frame (about a fifth less on wide
    rows: zstd's one-shot path carries no window over from earlier input), for a few tenths
    of a percent in size. Once a stream is longer than one frame its frames are compressed
    (and their lines counted) on ``max(1, threads)`` worker threads while this thread reads
    on (:class:`FrameWorkers`). Memory: at most ``max(1, threads) + 1`` frame buffers (kept
    for the next stream, up to eight) and the compressed frames not yet consumed. The
    stream is read with :func:`check_cancelled` between reads; ``on_raw`` is told each read's
    size as it is read."""
    workers = max(1, threads)

    def frame(cctx: zstandard.ZstdCompressor, buf: bytearray, n: int) -> tuple[bytes, int]:
        with memoryview(buf) as view, view[:n] as data:
            out = cctx.compress(data)
        lines = buf.count(b"\n", 0, n)
        _BUFFERS.give(buf)
        return out, lines

    with FrameWorkers(level, workers, frame, content_size=True) as frames:
        ended = False
        while not ended:
            buf = _BUFFERS.take()
            n = 0
            with memoryview(buf) as view:
                while n < FRAME:
                    check_cancelled()
                    got = fill(view[n:])
                    if not got:
                        ended = True
                        break
                    n += got
                    stats.raw_size += got
                    if on_raw:
                        on_raw(got)
            check_cancelled()
            if ended and not frames.started:
                out, lines = frames.here(buf, n)
                stats.lines += lines
                yield out
                return
            if n == 0:
                _BUFFERS.give(buf)
                break
            frames.submit(buf, n)
            for out, lines in frames.ready(workers):
                stats.lines += lines
                yield out
        for out, lines in frames.ready(0):
            stats.lines += lines
            yield out


class ChunkReader:
    """A read()-able view of a chunk iterator (for zstandard's streaming decompressor and
    tarfile). Small reads from a large chunk copy only what they return, never the rest."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._chunk = b""
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        while self._pos >= len(self._chunk):
            try:
                self._chunk, self._pos = next(self._it), 0
            except StopIteration:
                self._chunk, self._pos = b"", 0
                return b""
        start = self._pos
        end = len(self._chunk) if size < 0 else min(len(self._chunk), start + size)
        self._pos = end
        if start == 0 and end == len(self._chunk):
            return self._chunk
        with memoryview(self._chunk) as view:
            return view[start:end].tobytes()


def decompress(chunks: Iterable[bytes], key: str) -> Iterator[bytes]:
    """Decompress a zstd stream of object ``key`` (one frame or several, as a framed base
    backup has) with output bounded to CHUNK bytes per step.

    The input is read to its very end even after the frame is complete, so that a checking
    stage upstream (:func:`verified`) always sees every byte and delivers its verdict.
    """
    source = ChunkReader(chunks)
    with _corruption_named(key):
        reader = _reader(source)
        while out := reader.read(CHUNK):
            yield out
    _drain(source)


def decompress_views(chunks: Iterable[bytes], key: str, raw_size: int | None = None) -> Iterator[memoryview]:
    """As :func:`decompress`, each piece a view of one buffer that the next piece overwrites:
    for a consumer done with a piece before it asks for the next (a COPY that has sent it).
    ``raw_size``, the content's size as its manifest records it, sizes that buffer (never
    under :data:`MIN_PIECE`; only the pieces' size depends on it, never the content): at
    :data:`CHUNK` it is at the mmap threshold, so each object's buffer was mapped, faulted in
    and unmapped again, ~0.4 ms per object (1.3 CPU-s for 3,000 small tables).

    No buffer is made per piece. Under the 1 MiB mmap threshold the CLI fixes (see
    :func:`backup_tool.cli.entry.fixed_mmap_threshold`) each 1 MiB piece was mapped, faulted in
    page by page and unmapped again: reading the 344 MB of rows of a pgbench scale 20 plus 16
    wide tables backup from S3, 112 thousand page faults and 0.42 CPU-s, against 29 thousand
    and 0.28 CPU-s this way."""
    source = ChunkReader(chunks)
    buffer = memoryview(bytearray(CHUNK if raw_size is None else min(CHUNK, max(raw_size, MIN_PIECE))))
    with _corruption_named(key):
        reader = _reader(source)
        while n := reader.readinto(buffer):
            yield buffer[:n]
    _drain(source)


def _reader(source: ChunkReader) -> Any:
    return zstandard.ZstdDecompressor().stream_reader(
        source, read_size=CHUNK, read_across_frames=True)  # type: ignore[arg-type]  # ChunkReader has read(n)


@contextmanager
def _corruption_named(key: str) -> Iterator[None]:
    try:
        yield
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"object {key} is corrupt: it does not decompress ({exc})",
                             "restore from another backup and run 'backup-tool verify all'") from None


def _drain(source: ChunkReader) -> None:
    """Read the rest of a stream whose frames are complete, so its checks give their verdict."""
    while source.read(CHUNK):
        pass


def verified(chunks: Iterable[bytes], key: str, sha256: str, size: int,
             on_chunk: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Pass chunks through; at the end raise IntegrityError unless size and sha256 match."""
    counter = HashingCounter()
    for chunk in chunks:
        check_cancelled()
        counter.update(chunk)
        if on_chunk:
            on_chunk(len(chunk))
        yield chunk
    if counter.size != size or counter.hexdigest() != sha256:
        raise IntegrityError(
            f"object {key} is corrupt: sha256 {counter.hexdigest()[:16]}… size {counter.size},"
            f" expected {sha256[:16]}… size {size}",
            "restore from another backup and run 'backup-tool verify all'")


def run_parallel(jobs: int, tasks: Sequence[tuple[Callable[[Any], object], Any]]) -> None:
    """Run tasks on ``jobs`` threads; on the first failure cancel the rest and re-raise it."""
    with cf.ThreadPoolExecutor(jobs, thread_name_prefix="worker") as pool:
        futures = [pool.submit(fn, arg) for fn, arg in tasks]
        try:
            for fut in cf.as_completed(futures):
                fut.result()
        except BaseException as exc:
            if not isinstance(exc, BackupToolError):
                cancel()
            for fut in futures:
                fut.cancel()
            raise


READ_AHEAD = 8


class ReadAhead:
    """``chunks`` produced by a background thread started at once, at most ``depth`` chunks
    ahead of the consumer iterating this object; errors reach the consumer in order, after the
    chunks that preceded them. :meth:`close` (idempotent) stops the producer, which closes its
    source in its own thread, whether or not anything was consumed."""

    def __init__(self, chunks: Iterable[bytes], depth: int = READ_AHEAD) -> None:
        import queue

        self._box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._full = queue.Full
        self._stop = threading.Event()
        self._producer = threading.Thread(target=self._produce, args=(chunks,), name="read-ahead", daemon=True)
        self._producer.start()

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._box.put(item, timeout=0.2)
                return True
            except self._full:
                continue
        return False

    def _produce(self, chunks: Iterable[bytes]) -> None:
        source = iter(chunks)
        try:
            for chunk in source:
                if not self._put(("chunk", chunk)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(("error", exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[bytes]:
        try:
            while True:
                kind, value = self._box.get()
                if kind == "chunk":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._producer.join(timeout=5)  # a read stalled past that ends on the store's own timeout


def read_ahead(chunks: Iterable[bytes], depth: int = READ_AHEAD) -> Iterator[bytes]:
    """``chunks`` produced by a background thread (a :class:`ReadAhead` started on the first
    read), at most ``depth`` chunks ahead.

    Lets the network, the checksum and decryption of a stored object run while the caller
    decompresses and writes the previous chunks. Errors reach the caller in order, after the
    chunks that preceded them; when the caller stops early the producer stops too and
    closes its source in its own thread.
    """
    yield from ReadAhead(chunks, depth)


def read_stored(storage: Storage, key: str, sha256: str, size: int,
                on_chunk: Callable[[int], None] | None = None,
                stored: Iterable[bytes] | None = None) -> Iterator[bytes]:
    """An object's decompressed content; raises IntegrityError if it is damaged in any way.

    The sha256 (of the stored bytes, so of the ciphertext when the repository is encrypted)
    is checked as they stream; its verdict arrives when the last chunk has been read, so
    consumers must only commit what they wrote once the iterator is exhausted. Decryption
    authenticates each frame before releasing it. ``stored``: the object's stored bytes, if
    already fetched (see :class:`Prefetch`); they are checked the same way.
    """
    return decompress(_checked_source(storage, key, sha256, size, on_chunk, stored), key)


def read_stored_views(storage: Storage, key: str, sha256: str, size: int,
                      on_chunk: Callable[[int], None] | None = None,
                      stored: Iterable[bytes] | None = None, raw_size: int | None = None) -> Iterator[memoryview]:
    """As :func:`read_stored`, each piece valid only until the next is asked for (see
    :func:`decompress_views`, which ``raw_size`` is passed to)."""
    return decompress_views(_checked_source(storage, key, sha256, size, on_chunk, stored), key, raw_size)


def _checked_source(storage: Storage, key: str, sha256: str, size: int,
                    on_chunk: Callable[[int], None] | None, stored: Iterable[bytes] | None) -> Iterator[bytes]:
    source = storage.get_stored(key) if stored is None else stored
    return read_ahead(storage.decode(key, verified(source, key, sha256, size, on_chunk)))


class Prefetch:
    """Downloads small objects' stored bytes ahead of their readers, in the order given (the
    order they will be read in), at most ``depth`` held at once, on ``threads`` threads: a
    restore of thousands of small tables then does not wait for one GET per table. Nothing
    is trusted here: :meth:`take` hands the bytes to :func:`read_stored`, which checks them.
    Readers must take the objects in about the order given (each among the first ``depth``
    not yet taken), or wait for the ones before them."""

    def __init__(self, storage: Storage, objects: Sequence[StoredObject], depth: int = 16,
                 threads: int = 4) -> None:
        self._storage = storage
        self._keys = {o.key for o in objects}
        self._slots = threading.Semaphore(max(1, depth))
        self._futures: dict[str, cf.Future[bytes]] = {}
        self._ready = threading.Condition()
        self._closed = False
        self._pool = cf.ThreadPoolExecutor(max(1, threads), thread_name_prefix="prefetch")
        self._feeder = threading.Thread(target=self._feed, args=([o.key for o in objects],),
                                        name="prefetch-feeder", daemon=True)
        self._feeder.start()

    def _feed(self, keys: list[str]) -> None:
        for key in keys:
            while not self._slots.acquire(timeout=0.2):
                if self._closed:
                    return
            with self._ready:
                if self._closed:
                    return
                self._futures[key] = self._pool.submit(self._fetch, key)
                self._ready.notify_all()

    def _fetch(self, key: str) -> bytes:
        return b"".join(self._storage.get_stored(key))

    def take(self, key: str) -> list[bytes] | None:
        """The stored bytes of ``key`` (once), or None when it is not one of the objects given."""
        if key not in self._keys:
            return None
        with self._ready:
            self._keys.discard(key)
            while key not in self._futures and not self._closed:
                self._ready.wait(0.2)
            future = self._futures.pop(key, None)
        if future is None:
            return None
        try:
            return [future.result()]
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            futures, self._futures = list(self._futures.values()), {}
            self._ready.notify_all()
        for future in futures:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class EarlyRead:
    """An object's decompressed content, as :func:`read_stored` gives it, whose download
    starts now (its first ``READ_AHEAD`` chunks are fetched, checked and decrypted in the
    background before anyone reads). :meth:`close` stops it, read or not; a consumer that
    reads it to the end needs no close."""

    def __init__(self, storage: Storage, obj: StoredObject, on_chunk: Callable[[int], None] | None = None) -> None:
        self.key = obj.key
        self._ahead = ReadAhead(storage.decode(obj.key, verified(storage.get_stored(obj.key), obj.key, obj.sha256,
                                                                 obj.size, on_chunk)))

    def chunks(self) -> Iterator[bytes]:
        return decompress(self._ahead, self.key)

    def views(self) -> Iterator[memoryview]:
        """The content as :func:`decompress_views` gives it."""
        return decompress_views(self._ahead, self.key)

    def close(self) -> None:
        self._ahead.close()


def read_object(storage: Storage, obj: StoredObject,
                on_chunk: Callable[[int], None] | None = None) -> bytes:
    """A small object, checksum-verified and decompressed, in memory."""
    return b"".join(read_stored(storage, obj.key, obj.sha256, obj.size, on_chunk))
