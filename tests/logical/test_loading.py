"""Reading a table's stored objects for a restore: every part in order, the next one's download
started as the previous one is handed out, nothing left running when the reader stops, and
each part's pieces given in one reused buffer."""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import zstandard

from backup_tool.logical.loading import stored_contents
from backup_tool.repository.manifest import StoredObject
from backup_tool.repository.storage.local import LocalStorage

PIECE = 1 << 16


class WatchedStorage(LocalStorage):
    """A local repository that notes when each object's first stored bytes are fetched, and
    hands them out in ``PIECE``-byte pieces (an object is many more pieces than a read-ahead
    holds, so a reader that stops leaves its producer waiting until stopped)."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.fetched: list[str] = []
        self._lock = threading.Lock()

    def was_fetched(self, key: str) -> bool:
        with self._lock:
            return key in self.fetched

    def get_stored(self, key: str) -> Iterator[bytes]:
        def watched() -> Iterator[bytes]:
            with self._lock:
                self.fetched.append(key)
            for chunk in super(WatchedStorage, self).get_stored(key):
                yield from (chunk[i:i + PIECE] for i in range(0, len(chunk), PIECE))
        return watched()


def _parts(storage: LocalStorage, count: int) -> tuple[list[StoredObject], list[bytes]]:
    """``count`` objects of COPY text that hardly compresses, about 1 MB stored each."""
    objects, texts = [], []
    for n in range(count):
        text = b"".join(f"{n}\t{i}\t{os.urandom(24).hex()}\n".encode() for i in range(20000))
        stored = storage.put(f"data/part-{n}.zst", [zstandard.ZstdCompressor().compress(text)])
        objects.append(StoredObject(stored.key, stored.size, stored.sha256, len(text)))
        texts.append(text)
    return objects, texts


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_parts_come_in_order_and_the_next_download_starts_before_the_previous_part_is_read(tmp_path: Path) -> None:
    storage = WatchedStorage(tmp_path)
    objects, texts = _parts(storage, 3)
    read: list[bytes] = []
    for n, content in enumerate(stored_contents(storage, objects, lambda _: None)):
        if n + 1 < len(objects):
            _wait_for(partial(storage.was_fetched, objects[n + 1].key), f"part {n + 1} not fetched while part {n} waits")
        read.append(_joined(content))
    assert read == texts
    assert storage.fetched == [o.key for o in objects]


def test_a_single_object_is_read_as_before(tmp_path: Path) -> None:
    storage = WatchedStorage(tmp_path)
    objects, texts = _parts(storage, 1)
    assert [_joined(c) for c in stored_contents(storage, objects, lambda _: None)] == texts


def _joined(pieces: Iterator[memoryview]) -> bytes:
    """Each piece copied before the next is asked for (it is only valid until then)."""
    return b"".join(bytes(piece) for piece in pieces)


def test_an_objects_pieces_come_in_one_reused_buffer(tmp_path: Path) -> None:
    """No buffer is made per piece: the COPY sends each before asking for the next."""
    storage = WatchedStorage(tmp_path)
    objects, texts = _parts(storage, 2)
    for content, text in zip(stored_contents(storage, objects, lambda _: None), texts, strict=True):
        pieces = [(piece.obj, bytes(piece)) for piece in content]
        assert len(pieces) > 1 and len({id(buffer) for buffer, _ in pieces}) == 1
        assert b"".join(data for _, data in pieces) == text


def test_a_reader_that_stops_early_leaves_no_download_running(tmp_path: Path) -> None:
    storage = WatchedStorage(tmp_path)
    objects, _ = _parts(storage, 3)
    before = set(threading.enumerate())
    contents = stored_contents(storage, objects, lambda _: None)
    first = next(contents)
    next(iter(first))
    _wait_for(partial(storage.was_fetched, objects[1].key), "part 1 not fetched")
    contents.close()
    _wait_for(lambda: not [t for t in set(threading.enumerate()) - before if t.is_alive()],
              "a read-ahead thread still runs after the reader stopped")
    assert objects[2].key not in storage.fetched
