"""What a failed client tool's error message keeps; objects compressed in independent frames
(and the single-frame objects older versions wrote) read back by every reader; early reads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import zstandard

from backup_tool.errors import DatabaseError, IntegrityError
from backup_tool.repository.manifest import StoredObject
from backup_tool.repository.storage.local import LocalStorage
from backup_tool.streams.pipeline import (
    CHUNK,
    FRAME,
    MIN_PIECE,
    READ_AHEAD,
    EarlyRead,
    Prefetch,
    Process,
    StreamStats,
    compress,
    compress_filled,
    decompress,
    decompress_views,
    failure_line,
    read_object,
    read_stored,
    read_stored_views,
)


def test_parallel_pg_restore_names_the_cause_not_the_worker_death() -> None:
    stderr = (b"pg_restore: error: could not execute query: ERROR:  constraint \"fk\" does not exist\n"
              b"Command was: COMMENT ON CONSTRAINT fk ON public.child IS 'x';\n"
              b"pg_restore: error: a worker process died unexpectedly\n")
    assert failure_line(stderr) == ("pg_restore: error: could not execute query: ERROR:  "
                                    "constraint \"fk\" does not exist")


def test_a_lone_consequence_or_plain_output_is_still_reported() -> None:
    assert failure_line(b"pg_restore: error: a worker process died unexpectedly\n") == \
        "pg_restore: error: a worker process died unexpectedly"
    assert failure_line(b"first\nsecond\n") == "second"
    assert failure_line(b"") == "no error output"


def test_a_failing_child_raises_with_its_cause() -> None:
    script = "echo 'tool: error: the real cause' >&2; echo 'tool: error: a worker process died unexpectedly' >&2; exit 1"
    proc = Process(["sh", "-c", script], {}, "the tool")
    with pytest.raises(DatabaseError, match="the tool failed: tool: error: the real cause"):
        for _ in proc.chunks():
            pass
        proc.finish()


class _WatchedStorage(LocalStorage):
    """A real local repository that records when each object's read starts."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.started: dict[str, threading.Event] = {}

    def get_stored(self, key: str) -> Iterator[bytes]:
        self.started.setdefault(key, threading.Event()).set()
        yield from super().get_stored(key)


def _stored(storage: LocalStorage, key: str, raw: bytes) -> StoredObject:
    put = storage.put(key, [zstandard.ZstdCompressor().compress(raw)])
    return StoredObject(key, put.size, put.sha256, len(raw))


def _read_aheads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "read-ahead" and t.is_alive()]


def test_an_early_read_starts_before_it_is_read_and_gives_the_object(tmp_path: Path) -> None:
    storage = _WatchedStorage(tmp_path)
    raw = b"".join(b"%d\tline %d\n" % (i, i * 7) for i in range(300_000))
    obj = _stored(storage, "backups/b/data/1.copy.zst", raw)
    early = EarlyRead(storage, obj)
    assert storage.started.setdefault(obj.key, threading.Event()).wait(5)
    assert b"".join(early.chunks()) == raw == b"".join(read_stored(storage, obj.key, obj.sha256, obj.size))
    assert not _read_aheads()


def test_an_early_read_nobody_takes_stops_on_close(tmp_path: Path) -> None:
    storage = _WatchedStorage(tmp_path)
    obj = _stored(storage, "backups/b/data/2.copy.zst", os.urandom(READ_AHEAD * 3 << 20))
    early = EarlyRead(storage, obj)
    assert storage.started.setdefault(obj.key, threading.Event()).wait(5)
    early.close()
    assert not _read_aheads()


def test_a_damaged_object_read_early_still_fails_its_check(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    obj = _stored(storage, "backups/b/data/3.copy.zst", b"1\ta\n" * 1000)
    damaged = StoredObject(obj.key, obj.size, "0" * 64, obj.raw_size)
    with pytest.raises(IntegrityError, match="is corrupt"):
        b"".join(EarlyRead(storage, damaged).chunks())


def _copy_text(rows: int) -> bytes:
    """COPY text as psql writes it: escapes, NULLs, long and short lines, non-ASCII."""
    return b"".join(b"%d\t%s\t\\N\tcaf\xc3\xa9 \\t tab \\\\ back \\n line %s\n"
                    % (i, b"x" * (i % 300), str(i * 7919).encode()) for i in range(rows))


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(content size the frame header records, compressed length) of each zstd frame."""
    out = []
    while data:
        params = zstandard.get_frame_parameters(data)
        assert params.has_checksum
        dobj = zstandard.ZstdDecompressor().decompressobj()
        dobj.decompress(data)
        used = len(data) - len(dobj.unused_data)
        out.append((params.content_size, used))
        data = data[used:]
    return out


@pytest.mark.parametrize("threads", [0, 2])
def test_a_stream_longer_than_a_frame_is_stored_in_independent_frames_every_reader_reads(
        tmp_path: Path, threads: int) -> None:
    raw = _copy_text(60_000)
    assert len(raw) > 2 * FRAME
    stats = StreamStats()
    seen: list[int] = []
    cuts = [0]
    while cuts[-1] < len(raw):
        cuts.append(cuts[-1] + (1000, 65536, 3 << 20, 7)[len(cuts) % 4])
    chunks = [raw[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    stored = b"".join(compress(iter(chunks), 3, threads, stats, seen.append))
    frames = _frames(stored)
    assert [size for size, _ in frames] == [FRAME] * (len(raw) // FRAME) + [len(raw) % FRAME]
    assert (stats.raw_size, stats.lines, sum(seen)) == (len(raw), raw.count(b"\n"), len(raw))

    storage = LocalStorage(tmp_path)
    put = storage.put("backups/b/data/1.copy.zst", [stored])
    obj = StoredObject(put.key, put.size, put.sha256, len(raw))
    assert read_object(storage, obj) == raw
    assert b"".join(read_stored(storage, obj.key, obj.sha256, obj.size)) == raw
    assert b"".join(EarlyRead(storage, obj).chunks()) == raw
    assert b"".join(decompress(iter([stored[i:i + 1000] for i in range(0, len(stored), 1000)]), obj.key)) == raw


def test_frames_do_not_depend_on_the_number_of_workers_or_on_chunking() -> None:
    raw = _copy_text(40_000)
    one = b"".join(compress([raw], 3, 0, StreamStats()))
    assert b"".join(compress([raw[i:i + 4096] for i in range(0, len(raw), 4096)], 3, 3, StreamStats())) == one


def test_an_old_single_frame_object_still_reads(tmp_path: Path) -> None:
    """What versions before frames wrote: one frame from the streaming compressor."""
    raw = _copy_text(60_000)
    chunker = zstandard.ZstdCompressor(level=3, write_checksum=True).chunker(chunk_size=1 << 20)
    stored = b"".join([*(out for i in range(0, len(raw), 65536) for out in chunker.compress(raw[i:i + 65536])),
                       *chunker.finish()])
    assert len(_frames(stored)) == 1
    storage = LocalStorage(tmp_path)
    put = storage.put("backups/old/data/1.copy.zst", [stored])
    obj = StoredObject(put.key, put.size, put.sha256, len(raw))
    assert read_object(storage, obj) == raw == b"".join(EarlyRead(storage, obj).chunks())


def test_an_empty_stream_is_one_empty_frame() -> None:
    stats = StreamStats()
    stored = b"".join(compress([], 3, 0, stats))
    assert _frames(stored) == [(0, len(stored))]
    assert b"".join(decompress([stored], "k")) == b"" and (stats.raw_size, stats.lines) == (0, 0)


def test_a_damaged_frame_in_the_middle_fails_to_decompress() -> None:
    raw = _copy_text(60_000)
    stored = bytearray(b"".join(compress([raw], 3, 0, StreamStats())))
    first = _frames(bytes(stored))[0][1]
    stored[first + 100] ^= 0x55
    with pytest.raises(IntegrityError, match="does not decompress"):
        b"".join(decompress([bytes(stored)], "k"))


def test_views_give_every_frame_in_one_buffer_and_fail_as_decompress_does() -> None:
    raw = _copy_text(60_000)
    stored = b"".join(compress([raw], 3, 0, StreamStats()))
    assert len(_frames(stored)) > 1
    pieces = [(piece.obj, bytes(piece))
              for piece in decompress_views([stored[i:i + 5000] for i in range(0, len(stored), 5000)], "k")]
    assert b"".join(data for _, data in pieces) == raw == b"".join(decompress([stored], "k"))
    assert len(pieces) > 1 and len({id(buffer) for buffer, _ in pieces}) == 1
    damaged = bytearray(stored)
    damaged[_frames(stored)[0][1] + 100] ^= 0x55
    with pytest.raises(IntegrityError, match="does not decompress"):
        for _ in decompress_views([bytes(damaged)], "k"):
            pass


def test_a_stored_object_read_as_views_is_checked_whole(tmp_path: Path) -> None:
    """The sha256 verdict still comes once every stored byte is read, however the content is
    handed out."""
    raw = _copy_text(30_000)
    storage = LocalStorage(tmp_path)
    put = storage.put("backups/x/data/1.copy.zst", [b"".join(compress([raw], 3, 0, StreamStats()))])
    assert b"".join(bytes(p) for p in read_stored_views(storage, put.key, put.sha256, put.size)) == raw
    with pytest.raises(IntegrityError, match="is corrupt: sha256"):
        for _ in read_stored_views(storage, put.key, "0" * 64, put.size):
            pass


def test_a_small_objects_views_come_from_a_buffer_its_size_and_a_low_size_only_makes_more_pieces(
        tmp_path: Path) -> None:
    """A buffer of CHUNK is at glibc's mmap threshold as the CLI fixes it: each small table's
    read mapped, faulted in and unmapped 1 MiB (1.3 CPU-s for 3,000 tables). Its manifest's
    raw size sizes the buffer now (never under MIN_PIECE); a size that is wrong changes only
    how the content is cut, not the content."""
    raw = _copy_text(500)
    storage = LocalStorage(tmp_path)
    put = storage.put("backups/x/data/1.copy.zst", [b"".join(compress([raw], 3, 0, StreamStats()))])
    pieces = [(piece.obj, bytes(piece))
              for piece in read_stored_views(storage, put.key, put.sha256, put.size, raw_size=len(raw))]
    assert b"".join(data for _, data in pieces) == raw
    assert {len(buffer) for buffer, _ in pieces} == {max(len(raw), MIN_PIECE)} and max(len(raw), MIN_PIECE) < CHUNK
    big = _copy_text(2_000)
    assert len(big) > 2 * MIN_PIECE
    stored = b"".join(compress([big], 3, 0, StreamStats()))
    cut = [bytes(piece) for piece in decompress_views([stored], "k", raw_size=10)]
    assert b"".join(cut) == big and len(cut) > 2 and max(map(len, cut)) == MIN_PIECE


_FAULTS_SCRIPT = """
import ctypes, resource, sys
ctypes.CDLL(None).mallopt(-3, 1 << 20)  # the CLI's fixed mmap threshold
from backup_tool.repository.storage.local import LocalStorage
from backup_tool.streams.pipeline import read_stored_views
storage = LocalStorage(sys.argv[1])
key, sha256, size = sys.argv[2], sys.argv[3], int(sys.argv[4])
before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
for piece in read_stored_views(storage, key, sha256, size):
    pass
print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
"""


def test_reading_rows_as_views_maps_no_memory_per_piece(tmp_path: Path) -> None:
    """Under the CLI's 1 MiB mmap threshold a new 1 MiB piece was mapped and faulted in page by
    page each time: 64 MiB of rows cost the reading thread about 17,000 page faults (about
    900 now)."""
    raw = b"1\tsame row of text\n" * ((64 << 20) // 19)
    storage = LocalStorage(tmp_path)
    put = storage.put("backups/x/data/1.copy.zst", [b"".join(compress([raw], 3, 0, StreamStats()))])
    done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, str(tmp_path), put.key, put.sha256, str(put.size)],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert int(done.stdout) < 2000


@pytest.mark.parametrize("threads", [0, 2])
def test_reading_stays_a_bounded_number_of_frames_ahead_of_the_consumer(threads: int) -> None:
    """Memory: the stream is read at most ``max(1, threads) + 1`` frames ahead of what the
    consumer has taken."""
    read = 0

    def fill(view: memoryview) -> int:
        nonlocal read
        n = min(len(view), 1 << 20)
        view[:n] = b"\n" * n
        read += n
        return n

    stream = compress_filled(fill, 1, threads, StreamStats())
    next(stream)
    assert read <= (max(1, threads) + 1) * FRAME
    stream.close()


def test_a_failing_source_stops_the_stream_and_its_workers() -> None:
    def fill(view: memoryview) -> int:
        if fill.calls == 3:  # type: ignore[attr-defined]
            raise DatabaseError("COPY of public.t failed: boom")
        fill.calls += 1  # type: ignore[attr-defined]
        view[:] = b"a" * len(view)
        return len(view)

    fill.calls = 0  # type: ignore[attr-defined]
    with pytest.raises(DatabaseError, match="boom"):
        b"".join(compress_filled(fill, 1, 2, StreamStats()))
    assert not [t for t in threading.enumerate() if t.name.startswith("zstd") and t.is_alive()]


def test_a_child_process_is_read_into_frame_buffers(tmp_path: Path) -> None:
    raw = _copy_text(50_000)
    source = tmp_path / "copy.txt"
    source.write_bytes(raw)
    proc = Process(["cat", str(source)], {}, "cat")
    stats = StreamStats()
    stored = b"".join(compress_filled(proc.readinto, 3, 0, stats))
    proc.finish()
    assert b"".join(decompress([stored], "k")) == raw and stats.lines == raw.count(b"\n")
    assert len(_frames(stored)) == -(-len(raw) // FRAME)


def test_the_servers_hint_after_the_cause_comes_with_it() -> None:
    stderr = (b"pg_dump: error: query failed: ERROR:  out of shared memory\n"
              b"HINT:  You might need to increase max_locks_per_transaction.\n"
              b"pg_dump: detail: Query was: LOCK TABLE public.t1 IN ACCESS SHARE MODE\n")
    assert failure_line(stderr) == ("pg_dump: error: query failed: ERROR:  out of shared memory "
                                    "(HINT: You might need to increase max_locks_per_transaction.)")
    assert failure_line(b"psql: error: gone\nsomething else\n") == "psql: error: gone"


class CountingStorage(LocalStorage):
    """A local repository that notes the order in which objects are fetched."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.fetched: list[str] = []
        self._lock = threading.Lock()

    def get_stored(self, key: str) -> Iterator[bytes]:
        with self._lock:
            self.fetched.append(key)
        return super().get_stored(key)


def _small_objects(storage: LocalStorage, count: int) -> tuple[list[StoredObject], list[bytes]]:
    objects, texts = [], []
    for n in range(count):
        text = f"{n}\trow {n}\n".encode() * (n + 1)
        stored = storage.put(f"data/{n}.zst", [zstandard.ZstdCompressor().compress(text)])
        objects.append(StoredObject(stored.key, stored.size, stored.sha256, len(text)))
        texts.append(text)
    return objects, texts


def test_prefetched_objects_read_back_checked_in_order_and_at_most_depth_ahead(tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    objects, texts = _small_objects(storage, 40)
    damaged = objects[7]
    (tmp_path / damaged.key).write_bytes(b"x" + (tmp_path / damaged.key).read_bytes()[1:])
    storage.fetched.clear()
    prefetch = Prefetch(storage, objects, depth=4, threads=2)
    try:
        for n, obj in enumerate(objects):
            fetched = prefetch.take(obj.key)
            assert fetched is not None
            assert len(storage.fetched) <= n + 4
            reading = read_stored(storage, obj.key, obj.sha256, obj.size, stored=fetched)
            if obj is damaged:
                with pytest.raises(IntegrityError):
                    b"".join(reading)
                continue
            assert b"".join(reading) == texts[n]
        assert storage.fetched == [o.key for o in objects]
        assert prefetch.take(objects[0].key) is None and prefetch.take("data/other.zst") is None
    finally:
        prefetch.close()


def test_closing_a_prefetch_with_objects_never_taken_returns_at_once(tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    objects, _ = _small_objects(storage, 30)
    prefetch = Prefetch(storage, objects, depth=3, threads=2)
    assert prefetch.take(objects[0].key) is not None
    done = threading.Event()
    closer = threading.Thread(target=lambda: (prefetch.close(), done.set()))
    closer.start()
    assert done.wait(5), "close() waited for objects nobody takes"
    closer.join()
    assert len(storage.fetched) <= 1 + 3, "the taken object and a window of 3, nothing more"
