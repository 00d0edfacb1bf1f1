"""The base backup's stored tar, compressed in independent zstd frames, and its index.

A base backup is one object (``base.tar.zst``): pg_basebackup's tar through zstd, which the
compressor cuts into independent zstd frames at chosen tar member boundaries
(:class:`FramedCompressor`): every member of 1 MiB or more starts a frame of its own, and runs
of smaller members (catalogs, configuration, small tables) are grouped in frames
of about 4 MiB raw; no frame holds more than 4 MiB raw (a bigger member spans several), so
the frames of one big relation file are compressed on several threads at once. The
concatenated frames are one valid zstd stream, so the whole object restores and verifies
exactly as before, and readers that follow the index by raw offsets (ranged reads, older
versions included) need no frame to start at a member.

Beside it, ``base.index.json.zst`` (:class:`TarIndex`) records each frame (raw and stored
offsets, sizes and the sha256 of its stored bytes) and each tar member (name, kind, data
offset, size, mode, mtime). With it a restore reads one relation's files with ranged reads
of just their frames (:func:`extract`), each frame checked against its sha256 before its
content is trusted, and learns every other file's size without downloading it.

Cost: a frame boundary restarts zstd's window; with frames no smaller than 4 MiB of small
members and whole big files the stored size grows by well under 1 % (see scripts/bench).
Backups without the index (older ones) are restored by streaming the whole object.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import hashlib
import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator

import zstandard

from backup_tool.errors import IntegrityError
from backup_tool.repository.storage import Storage
from backup_tool.streams import pipeline

INDEX_KEY = "base.index.json.zst"
INDEX_VERSION = 1
FRAME_TARGET = 4 << 20
FRAME_MAX = 4 << 20
BIG_MEMBER = 1 << 20
CAPTURE_LIMIT = 64 << 20
READ_PIECE = 8 << 20
MERGE_GAP = 4 << 20
FETCH_DEPTH = 8


@dataclass(frozen=True)
class Frame:
    """One zstd frame: raw tar bytes ``[raw_start, raw_start + raw_size)`` stored at
    ``[offset, offset + size)`` of the object."""

    raw_start: int
    raw_size: int
    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Member:
    """A tar member: kind ``f`` (regular file), ``d`` (directory), ``l`` (symlink) or ``o``."""

    name: str
    kind: str
    data_offset: int
    size: int
    mode: int
    mtime: int


@dataclass(frozen=True)
class TarIndex:
    frames: tuple[Frame, ...]
    members: tuple[Member, ...]
    relations: dict[str, Any]

    def to_json(self) -> bytes:
        return json.dumps({"version": INDEX_VERSION,
                           "frames": [[f.raw_start, f.raw_size, f.offset, f.size, f.sha256] for f in self.frames],
                           "members": [[m.name, m.kind, m.data_offset, m.size, m.mode, m.mtime]
                                       for m in self.members],
                           "relations": self.relations}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TarIndex:
        body = json.loads(data)
        return cls(tuple(Frame(*f) for f in body["frames"]), tuple(Member(*m) for m in body["members"]),
                   body.get("relations") or {})


def _octal(field: bytes) -> int:
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


class TarWalker:
    """Follows a tar stream's member boundaries (absolute offsets) as bytes are fed, and keeps
    the content of the regular members named in ``capture`` (at most ``limit`` bytes each) in
    :attr:`found`: the one parser of tar headers, for the index and for ``backup_label`` and
    ``backup_manifest`` alike."""

    def __init__(self, capture: Iterable[str] = (), limit: int = CAPTURE_LIMIT) -> None:
        self.members: list[Member] = []
        self.found: dict[str, bytes] = {}
        self.parsed = 0
        self._capture = frozenset(capture)
        self._limit = limit
        self._buf = bytearray()
        self._skip = 0
        self._grab_left = 0
        self._grab = bytearray()
        self._grab_for: bytes | str = b""
        self._long_name: str | None = None
        self._big_prev = False
        self._ext_pending = False

    def feed(self, chunk: bytes, cut: Callable[[int, bool], None]) -> None:
        """Consume ``chunk``; call ``cut(offset, big)`` at every header that may start a
        frame (``big``: the member, or the one just finished, is big)."""
        view = memoryview(chunk)
        while view:
            if self._skip:
                take = min(self._skip, len(view))
                if self._grab_left:
                    grab = min(self._grab_left, take)
                    self._grab += view[:grab]
                    self._grab_left -= grab
                view = view[take:]
                self._skip -= take
                self.parsed += take
                if not self._skip and self._grab_for:
                    self._finish_grab()
                continue
            need = 512 - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) < 512:
                return
            header = bytes(self._buf)
            self._buf.clear()
            start = self.parsed
            self.parsed += 512
            if header == b"\0" * 512:
                continue
            self._header(header, start, cut)

    def _start_grab(self, what: bytes | str, size: int) -> None:
        self._grab_for, self._grab_left, self._grab = what, size, bytearray()
        if not self._skip:
            self._finish_grab()

    def _header(self, header: bytes, start: int, cut: Callable[[int, bool], None]) -> None:
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix and header[257:262] == b"ustar":
            name = f"{prefix}/{name}"
        size = _octal(header[124:136])
        kind = header[156:157]
        padded = size + (-size) % 512
        if kind in (b"L", b"x"):
            if not self._ext_pending:
                cut(start, self._big_prev)
            self._ext_pending = True
            self._skip = padded
            self._start_grab(kind, size)
            return
        if not self._ext_pending:
            cut(start, self._big_prev or size >= BIG_MEMBER)
        self._ext_pending = False
        if self._long_name is not None:
            name, self._long_name = self._long_name, None
        name = name.removeprefix("./").rstrip("/")
        letter = {b"0": "f", b"\0": "f", b"5": "d", b"2": "l"}.get(kind, "o")
        self.members.append(Member(name, letter, start + 512, size if letter == "f" else 0,
                                   _octal(header[100:108]), _octal(header[136:148])))
        self._big_prev = letter == "f" and size >= BIG_MEMBER
        self._skip = padded
        if letter == "f" and name in self._capture and size <= self._limit:
            self._start_grab(name, size)

    def _finish_grab(self) -> None:
        data, what = bytes(self._grab), self._grab_for
        self._grab_for, self._grab = b"", bytearray()
        if isinstance(what, str):
            self.found[what] = data
        elif what == b"L":
            self._long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        else:
            for line in data.decode("utf-8", "replace").splitlines():
                _, _, rest = line.partition(" ")
                key, _, value = rest.partition("=")
                if key == "path":
                    self._long_name = value


class FramedCompressor:
    """zstd compression of a tar stream in independent frames (see the module docstring);
    :attr:`frames` and :attr:`walker` hold the index once the stream is consumed, and
    ``walker.found`` the members named in ``capture``.

    With ``workers`` > 1 the frames are compressed (and their stored bytes hashed) on that
    many threads (zstd and sha256 release the GIL) while this thread reads on; they are
    emitted in stream order. Memory: the open frame plus at most ``workers`` frames in
    flight, each at most :data:`FRAME_MAX` raw bytes and its compressed form."""

    def __init__(self, level: int, stats: pipeline.StreamStats,
                 on_raw: Callable[[int], None] | None = None, workers: int = 1,
                 capture: Iterable[str] = ()) -> None:
        self.level = level
        self.stats = stats
        self.on_raw = on_raw
        self.workers = max(1, workers)
        self.walker = TarWalker(capture)
        self.frames: list[Frame] = []
        self._offset = 0
        self._cuts: list[int] = []
        self._next_start = 0

    def _cut(self, offset: int, big: bool) -> None:
        """A member header at ``offset``: end the frame there if the member (or the one
        before) is big, or the frame has reached its target size; a frame reaching
        :data:`FRAME_MAX` before any such header ends where it reaches it."""
        self._split_before(offset)
        if offset > self._next_start and (big or offset - self._next_start >= FRAME_TARGET):
            self._cuts.append(offset)
            self._next_start = offset

    def _split_before(self, offset: int) -> None:
        while offset - self._next_start > FRAME_MAX:
            self._next_start += FRAME_MAX
            self._cuts.append(self._next_start)

    @staticmethod
    def _compress_frame(cctx: zstandard.ZstdCompressor, raw_start: int, data: bytes | memoryview
                        ) -> tuple[int, int, bytes, str]:
        out = cctx.compress(data)
        return raw_start, len(data), out, hashlib.sha256(out).hexdigest()

    def _record(self, done: tuple[int, int, bytes, str]) -> bytes:
        raw_start, raw_size, out, digest = done
        self.frames.append(Frame(raw_start, raw_size, self._offset, len(out), digest))
        self._offset += len(out)
        return out

    def compress(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        held: deque[memoryview] = deque()
        held_start = 0
        fed = 0

        def take(upto: int) -> bytes | memoryview:
            """The held raw bytes before stream offset ``upto`` (removed from ``held``)."""
            nonlocal held_start
            n = upto - held_start
            out: list[memoryview] = []
            while n:
                head = held[0]
                if len(head) <= n:
                    out.append(held.popleft())
                    n -= len(head)
                else:
                    out.append(head[:n])
                    held[0] = head[n:]
                    n = 0
            held_start = upto
            return out[0] if len(out) == 1 else b"".join(out)

        inline = self.workers == 1
        with pipeline.FrameWorkers(self.level, 0 if inline else self.workers,
                                   self._compress_frame) as frames:
            for chunk in chunks:
                pipeline.check_cancelled()
                self.stats.raw_size += len(chunk)
                if self.on_raw:
                    self.on_raw(len(chunk))
                self._cuts = []
                self.walker.feed(chunk, self._cut)
                fed += len(chunk)
                self._split_before(fed)
                held.append(memoryview(chunk))
                for offset in self._cuts:
                    frames.submit(held_start, take(offset))
                    for done in frames.ready(self.workers - 1):
                        yield self._record(done)
            if fed > held_start or not (self.frames or frames.started):
                frames.submit(held_start, take(fed))
            for done in frames.ready(0):
                yield self._record(done)

    def index(self, relations: dict[str, Any]) -> TarIndex:
        return TarIndex(tuple(self.frames), tuple(self.walker.members), relations)


def load_index(storage: Storage, key: str, sha256: str, size: int) -> TarIndex:
    """The stored index, verified against its manifest entry."""
    raw = b"".join(pipeline.read_stored(storage, key, sha256, size))
    try:
        return TarIndex.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"object {key} is not a base backup index ({exc})",
                             "run 'backup-tool verify all'") from None


def frames_for(frames: tuple[Frame, ...], spans: list[tuple[int, int]]) -> set[int]:
    """Indexes of the frames holding any byte of the raw ``spans``."""
    starts = [f.raw_start for f in frames]
    wanted: set[int] = set()
    for lo, hi in spans:
        if hi <= lo:
            continue
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_right(starts, hi - 1) - 1
        wanted.update(range(max(first, 0), last + 1))
    return wanted


def runs_for(frames: tuple[Frame, ...], spans: list[tuple[int, int]], merge_gap: int = MERGE_GAP
             ) -> list[tuple[int, int]]:
    """Index ranges ``[first, last]`` of frames that cover the raw ``spans``, neighbouring
    runs merged when the stored bytes between them are under ``merge_gap`` (fewer requests)."""
    wanted = frames_for(frames, spans)
    runs: list[tuple[int, int]] = []
    for i in sorted(wanted):
        if runs and (i == runs[-1][1] + 1 or frames[i].offset - (frames[runs[-1][1]].offset
                                                                   + frames[runs[-1][1]].size) < merge_gap):
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def ranges_of(frames: tuple[Frame, ...], runs: list[tuple[int, int]], piece: int = READ_PIECE
              ) -> list[tuple[int, int]]:
    """Stored byte ranges of at most ``piece`` bytes covering ``runs`` in order (a range never
    spans two runs)."""
    out = []
    for first, last in runs:
        pos, end = frames[first].offset, frames[last].offset + frames[last].size
        while pos < end:
            out.append((pos, min(pos + piece, end)))
            pos = out[-1][1]
    return out


def fetch_ranges(storage: Storage, key: str, stored_size: int, ranges: list[tuple[int, int]],
                 depth: int = FETCH_DEPTH) -> Generator[bytes, None, None]:
    """The bytes of each range in order, up to ``depth`` ranged requests in flight (an object
    store's latency, not its bandwidth, is what many small reads pay)."""
    pool = cf.ThreadPoolExecutor(max(1, depth), thread_name_prefix="range")
    pending: deque[cf.Future[bytes]] = deque()
    todo = iter(ranges)
    try:
        for lo, hi in itertools.islice(todo, depth):
            pending.append(pool.submit(storage.get_range, key, lo, hi, stored_size))
        while pending:
            pipeline.check_cancelled()
            data = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(storage.get_range, key, nxt[0], nxt[1], stored_size))
            yield data
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_frames(pieces: Iterator[bytes], key: str, frames: tuple[Frame, ...], first: int,
                last: int, skip: frozenset[int] = frozenset()) -> Iterator[tuple[int, bytes]]:
    """(raw offset, raw bytes) of frames ``first..last`` (contiguous in the object) from
    ``pieces``, the run's stored bytes in order; each frame's stored bytes are checked against
    its sha256 when it ends (IntegrityError). The frames in ``skip`` (read only because they
    lie between wanted ones) are passed over: neither checked nor decompressed nor yielded."""
    pos, end = frames[first].offset, frames[last].offset + frames[last].size
    i = first
    digest = hashlib.sha256()
    dobj = zstandard.ZstdDecompressor().decompressobj()
    raw_pos = frames[first].raw_start
    try:
        while pos < end:
            view = memoryview(next(pieces, b""))
            if not view:
                raise IntegrityError(f"object {key} ends before frame {i}", "run 'backup-tool verify all'")
            while view:
                frame = frames[i]
                take = min(len(view), frame.offset + frame.size - pos)
                part = view[:take]
                view = view[take:]
                pos += take
                if i in skip:
                    if pos == frame.offset + frame.size:
                        raw_pos = frame.raw_start + frame.raw_size
                        i += 1
                    continue
                digest.update(part)
                out = dobj.decompress(part)
                if out:
                    yield raw_pos, out
                    raw_pos += len(out)
                if pos == frame.offset + frame.size:
                    if digest.hexdigest() != frame.sha256 or raw_pos != frame.raw_start + frame.raw_size:
                        raise _frame_error(key, i, "sha256 or size differs from its index")
                    i += 1
                    digest = hashlib.sha256()
                    dobj = zstandard.ZstdDecompressor().decompressobj()
    except zstandard.ZstdError as exc:
        raise _frame_error(key, i, f"it does not decompress ({exc})") from None


_THREAD_BUFFER = threading.local()


def _decompress_frame(data: bytes | memoryview, raw_size: int) -> memoryview | None:
    """The one zstd frame ``data`` decompressed into this thread's reusable buffer (valid
    until the thread's next call); None when it holds other than exactly ``raw_size`` bytes.

    A fresh 4 MiB result per frame, and a fresh decompression context whose window buffer
    streaming fills, are fresh mappings above glibc's mmap threshold: every page of them was
    faulted in and zeroed before being written over. Laying out 1.3 GB took ~640k page
    faults, about half a second of system CPU; the buffer and the context of each thread are
    reused instead (one context per thread: a context serves one operation at a time)."""
    buf: bytearray | None = getattr(_THREAD_BUFFER, "buf", None)
    if buf is None or len(buf) < raw_size + 1:
        buf = _THREAD_BUFFER.buf = bytearray(max(raw_size + 1, FRAME_MAX + 1))
        _THREAD_BUFFER.dctx = zstandard.ZstdDecompressor()
    view = memoryview(buf)
    have = 0
    with _THREAD_BUFFER.dctx.stream_reader(data) as reader:
        while have <= raw_size:
            got = reader.readinto(view[have:raw_size + 1])
            if not got:
                break
            have += got
    return view[:raw_size] if have == raw_size else None


def _joined(held: list[memoryview]) -> bytes | memoryview:
    """A frame's stored bytes from the pieces of the stream that hold it: the view itself when
    one piece holds all of it (most frames of a ranged read), so that no copy of it is made
    (a fresh mapping, every page faulted in, for each frame above glibc's mmap threshold)."""
    return held[0] if len(held) == 1 else b"".join(held)


def _frame_writer(key: str, frames: tuple[Frame, ...], members: list[Member],
                  write: Callable[[Member, int, memoryview], None]) -> Callable[[int, bytes | memoryview], int]:
    """``work(i, stored)``: frame ``i`` checked against its sha256 and raw size, decompressed,
    and the parts of ``members`` (sorted by data offset, not overlapping) it holds handed to
    ``write``; returns the frame's raw size. Safe to run on several threads at once. The
    data handed to ``write`` is valid only during that call (a buffer reused by the thread)."""
    starts = [m.data_offset for m in members]

    def work(i: int, data: bytes | memoryview) -> int:
        frame = frames[i]
        if hashlib.sha256(data).hexdigest() != frame.sha256:
            raise _frame_error(key, i, "sha256 differs from its index")
        try:
            view = _decompress_frame(data, frame.raw_size)
        except zstandard.ZstdError as exc:
            raise _frame_error(key, i, f"it does not decompress ({exc})") from None
        if view is None:
            raise _frame_error(key, i, "its size differs from its index")
        lo, hi = frame.raw_start, frame.raw_start + frame.raw_size
        j = max(bisect.bisect_right(starts, lo) - 1, 0)
        while j < len(members) and members[j].data_offset < hi:
            m = members[j]
            a, b = max(m.data_offset, lo), min(m.data_offset + m.size, hi)
            if a < b:
                write(m, a - m.data_offset, view[a - lo:b - lo])
            j += 1
        return frame.raw_size

    return work


def _extract_frames_parallel(pieces: Iterator[bytes], key: str, frames: tuple[Frame, ...],
                             runs: list[tuple[int, int]], needed: set[int], work: Callable[[int, bytes | memoryview], int],
                             workers: int) -> None:
    """Cut ``pieces`` (the stored bytes of ``runs``, in order) into frames and run ``work`` on
    each frame in ``needed`` on ``workers`` threads (the others, read only because they lie
    between wanted ones, are passed over). Memory: at most ``workers + 1`` frames in flight."""
    order = iter([i for first, last in runs for i in range(first, last + 1)])
    pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="unzstd")
    inflight: deque[cf.Future[int]] = deque()
    held: list[memoryview] = []
    have = 0
    i = next(order, None)
    try:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                if i is None:
                    raise IntegrityError(f"object {key} returned more bytes than its frames hold",
                                         "run 'backup-tool verify all'")
                take = min(len(view), frames[i].size - have)
                if i in needed:
                    held.append(view[:take])
                view = view[take:]
                have += take
                if have == frames[i].size:
                    if i in needed:
                        inflight.append(pool.submit(work, i, _joined(held)))
                        while len(inflight) > workers:
                            inflight.popleft().result()
                    held, have, i = [], 0, next(order, None)
        if i is not None:
            raise IntegrityError(f"object {key} ends before frame {i}", "run 'backup-tool verify all'")
        while inflight:
            inflight.popleft().result()
    finally:
        for fut in inflight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def extract(storage: Storage, key: str, stored_size: int, index: TarIndex, members: list[Member],
            write: Callable[[Member, int, bytes | memoryview], None], merge_gap: int = MERGE_GAP, workers: int = 1) -> int:
    """Read the data of ``members`` (regular files) with ranged reads of their frames only
    (runs of frames less than ``merge_gap`` stored bytes apart are read as one);
    ``write(member, offset, data)`` receives it in order. Returns the stored bytes read.

    With ``workers`` > 1 and frames of at most :data:`FRAME_MAX` raw bytes (every backup
    since frames were capped), each wanted frame is checked and decompressed whole on one
    of that many threads (zstd and sha256 release the GIL): ``write`` is then called from
    those threads, in any order across frames (pieces of one member never overlap), and
    must be thread-safe. A frame's bytes are written only once its sha256 matched."""
    wanted = sorted((m for m in members if m.kind == "f" and m.size), key=lambda m: m.data_offset)
    spans = [(m.data_offset, m.data_offset + m.size) for m in wanted]
    runs = runs_for(index.frames, spans, merge_gap)
    needed = frames_for(index.frames, spans)
    pieces = fetch_ranges(storage, key, stored_size, ranges_of(index.frames, runs))
    fetched = sum(f.size for first, last in runs for f in index.frames[first:last + 1])
    if workers > 1 and all(index.frames[i].raw_size <= FRAME_MAX for i in needed):
        try:
            _extract_frames_parallel(pieces, key, index.frames, runs, needed,
                                     _frame_writer(key, index.frames, wanted, write), workers)
        finally:
            pieces.close()
        return fetched
    try:
        cursor = 0
        for first, last in runs:
            run_end = index.frames[last].raw_start + index.frames[last].raw_size
            skip = frozenset(i for i in range(first, last + 1) if i not in needed)
            for raw_pos, data in read_frames(pieces, key, index.frames, first, last, skip):
                chunk_end = raw_pos + len(data)
                i = cursor
                while i < len(wanted) and wanted[i].data_offset < chunk_end:
                    m = wanted[i]
                    lo, hi = max(m.data_offset, raw_pos), min(m.data_offset + m.size, chunk_end)
                    if lo < hi:
                        write(m, lo - m.data_offset, data[lo - raw_pos:hi - raw_pos])
                    if m.data_offset + m.size <= chunk_end:
                        if i == cursor:
                            cursor += 1
                    i += 1
            while cursor < len(wanted) and wanted[cursor].data_offset + wanted[cursor].size <= run_end:
                cursor += 1
    finally:
        pieces.close()
    return fetched


def parallel_readable(index: TarIndex) -> bool:
    """True when :func:`extract_whole` can lay the object out: its frames are contiguous and
    hold at most :data:`FRAME_MAX` raw bytes each (older backups kept a big member in one
    frame of any size: they are streamed whole instead). Whether they cover the object
    exactly, :func:`extract_whole` finds out as it reads."""
    raw = offset = 0
    for f in index.frames:
        if f.raw_start != raw or f.offset != offset or f.raw_size > FRAME_MAX:
            return False
        raw, offset = raw + f.raw_size, offset + f.size
    return bool(index.frames)


def _frame_error(key: str, i: int, what: str) -> IntegrityError:
    return IntegrityError(f"object {key} is corrupt at frame {i}: {what}",
                          "restore from another backup and run 'backup-tool verify all'")


def extract_whole(pieces: Iterable[bytes], key: str, index: TarIndex,
                  write: Callable[[Member, int, memoryview], None], workers: int,
                  on_frame: Callable[[int], None] | None = None) -> None:
    """Every regular file's data from the whole object (``pieces``: its stored bytes in order,
    decrypted; :func:`parallel_readable` must hold). Each frame is checked against its
    sha256 and raw size, decompressed and handed to ``write(member, offset, data)`` on one
    of ``workers`` threads, so frames arrive in any order (the pieces of one member never
    overlap). A frame's bytes are written only once they matched the (verified) index;
    ``pieces`` is read to its end, so a check of the whole object upstream delivers its
    verdict before this returns. Memory: at most ``workers + 1`` frames in flight."""
    members = sorted((m for m in index.members if m.kind == "f" and m.size), key=lambda m: m.data_offset)
    frames = index.frames
    work = _frame_writer(key, frames, members, write)

    pool = cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="unzstd")
    inflight: deque[cf.Future[int]] = deque()
    held: list[memoryview] = []
    have = 0
    i = 0
    try:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                if i >= len(frames):
                    raise IntegrityError(f"object {key} is longer than its index says",
                                         "restore from another backup and run 'backup-tool verify all'")
                take = min(len(view), frames[i].size - have)
                held.append(view[:take])
                view = view[take:]
                have += take
                if have == frames[i].size:
                    inflight.append(pool.submit(work, i, _joined(held)))
                    held, have, i = [], 0, i + 1
                    while len(inflight) > max(1, workers):
                        done = inflight.popleft().result()
                        if on_frame:
                            on_frame(done)
        if i < len(frames):
            raise IntegrityError(f"object {key} ends before frame {i}", "run 'backup-tool verify all'")
        while inflight:
            done = inflight.popleft().result()
            if on_frame:
                on_frame(done)
    finally:
        for fut in inflight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
