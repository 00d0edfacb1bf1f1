"""Reads made ahead (storage/ahead.py): a replayed read answers exactly what the store
answered the recording process, whatever its threads did at once; anything not recorded,
failed, or asked once the journal ended is the store's own answer, errors included."""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from backup_tool.repository.storage import ObjectMissingError, Storage
from backup_tool.repository.storage.ahead import Journal, JournalReader, RecordingBackend, ReplayBackend
from backup_tool.repository.storage.base import ObjectLock
from backup_tool.repository.storage.local import LocalStorage


class Fds:
    def __init__(self) -> None:
        self.data = os.memfd_create("test-ahead")
        self.read, self.write = os.pipe()

    def close_writer(self) -> None:
        os.close(self.write)


@pytest.fixture
def fds() -> Iterator[Fds]:
    made = Fds()
    yield made
    for fd in (made.data, made.read, made.write):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    storage = LocalStorage(str(tmp_path / "repo"))
    for i in range(6):
        storage.put(f"manifests/m{i}.json", [bytes([65 + i]) * (2_500_000 + i * 7919), b"tail"])
    storage.put("data/empty", [b""])
    return storage


class CountingStore(LocalStorage):
    """The real store of the replaying side: counts the reads that reach it."""

    reads: list[str]

    def get(self, key: str) -> Iterator[bytes]:
        self.reads.append(f"get {key}")
        return super().get(key)

    def list(self, prefix: str = "") -> Iterator:  # type: ignore[type-arg]
        self.reads.append(f"list {prefix}")
        return super().list(prefix)


def counting(store: LocalStorage) -> CountingStore:
    real = CountingStore(str(store.root))
    real.reads = []
    return real


def test_objects_read_at_once_by_threads_replay_byte_for_byte(fds: Fds, store: LocalStorage) -> None:
    journal = Journal(fds.write, fds.data)
    recorder = RecordingBackend(store, journal)
    keys = [f"manifests/m{i}.json" for i in range(6)] + ["data/empty"]
    with cf.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda k: b"".join(recorder.get(k)), keys))
    listed = [(i.key, i.size, i.modified) for i in recorder.list("manifests/")]
    journal.end()
    real = counting(store)
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: real)
    for key in keys:
        assert replay.get_bytes(key) == store.get_bytes(key), key
    assert [(i.key, i.size, i.modified) for i in replay.list("manifests/")] == listed
    assert real.reads == [] and not replay.opened
    assert len(replay.answered) == len(keys) + 1


def test_reads_not_recorded_go_to_the_store_once_planned_or_ended(fds: Fds, store: LocalStorage) -> None:
    journal = Journal(fds.write, fds.data)
    journal.hello(store.url)
    recorder = RecordingBackend(store, journal)
    b"".join(recorder.get("manifests/m0.json"))
    journal.plan(["manifests/m1.json"])
    real = counting(store)
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: real)
    assert replay.url == store.url
    assert replay.get_bytes("manifests/m0.json") == store.get_bytes("manifests/m0.json")
    assert replay.get_bytes("manifests/m2.json") == store.get_bytes("manifests/m2.json")
    assert real.reads == ["get manifests/m2.json"]
    b"".join(recorder.get("manifests/m1.json"))
    assert replay.get_bytes("manifests/m1.json") == store.get_bytes("manifests/m1.json")
    assert real.reads == ["get manifests/m2.json"]
    fds.close_writer()
    assert [i.key for i in replay.list("data/")] == ["data/empty"]
    assert real.reads == ["get manifests/m2.json", "list data/"]


def test_a_read_the_recorder_failed_is_the_stores_own_failure(fds: Fds, store: LocalStorage) -> None:
    journal = Journal(fds.write, fds.data)
    recorder = RecordingBackend(store, journal)
    with pytest.raises(ObjectMissingError):
        b"".join(recorder.get("manifests/gone.json"))
    journal.end()
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: counting(store))
    with pytest.raises(ObjectMissingError) as err:
        replay.get_bytes("manifests/gone.json")
    with pytest.raises(ObjectMissingError) as direct:
        store.get_bytes("manifests/gone.json")
    assert str(err.value) == str(direct.value)
    assert replay.answered == []


def test_a_recorder_that_dies_mid_object_leaves_the_rest_to_the_store(fds: Fds, store: LocalStorage) -> None:
    journal = Journal(fds.write, fds.data)
    journal.plan(["manifests/m3.json"])
    reading = RecordingBackend(store, journal).get("manifests/m3.json")
    first = next(reading)
    fds.close_writer()  # the process is gone before the object was whole
    real = counting(store)
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: real)
    streamed = replay.get_stored("manifests/m3.json")
    assert next(streamed) == first
    assert first + b"".join(streamed) == store.get_bytes("manifests/m3.json")
    assert real.reads == ["get manifests/m3.json"] and replay.answered == [("get", "manifests/m3.json")]


def test_an_object_streams_while_it_is_being_read(fds: Fds, store: LocalStorage) -> None:
    journal = Journal(fds.write, fds.data)
    journal.plan(["manifests/m5.json"])
    reading = RecordingBackend(store, journal).get("manifests/m5.json")
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: counting(store))
    streamed = replay.get_stored("manifests/m5.json")
    first = next(reading)
    assert next(streamed) == first
    rest = b"".join(reading)
    assert b"".join(streamed) == rest and first + rest == store.get_bytes("manifests/m5.json")


def test_a_replayed_get_waits_for_nothing_until_read(fds: Fds, store: LocalStorage) -> None:
    """Asking for an object returns at once (the restore's early read starts a thread on it);
    the wait for the recording, if any, happens on first iteration."""
    journal = Journal(fds.write, fds.data)
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: counting(store))
    pending = replay.get_stored("manifests/m4.json")
    b"".join(RecordingBackend(store, journal).get("manifests/m4.json"))
    assert b"".join(pending) == store.get_bytes("manifests/m4.json")


def test_writes_are_the_stores(fds: Fds, store: LocalStorage) -> None:
    fds.close_writer()
    real: Storage = counting(store)
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: real)
    replay.put("new/object", [b"x"])
    assert store.get_bytes("new/object") == b"x"
    with pytest.raises(NotImplementedError):
        RecordingBackend(store, Journal(fds.data, fds.data)).put("k", [b"x"])


def test_with_lists_once_a_prefix_listed_again_is_the_stores_listing(fds: Fds, store: LocalStorage) -> None:
    """A backup lists the catalog before and after taking its lock: the second listing must see
    a backup committed in between, so it is not answered from the journal."""
    journal = Journal(fds.write, fds.data)
    list(RecordingBackend(store, journal).list("manifests/"))
    journal.end()
    store.put("manifests/committed-meanwhile.json", [b"{}"])
    real = counting(store)
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: real, lists_once=True)
    assert "manifests/committed-meanwhile.json" not in [i.key for i in replay.list("manifests/")]
    assert "manifests/committed-meanwhile.json" in [i.key for i in replay.list("manifests/")]
    assert real.reads == ["list manifests/"]


def test_what_the_command_wrote_is_read_from_the_store(fds: Fds, store: LocalStorage) -> None:
    """A read after one's own write sees it: neither the key written (nor deleted) nor a
    listing of a prefix holding it is answered from the journal; other recorded reads still are."""
    journal = Journal(fds.write, fds.data)
    recorder = RecordingBackend(store, journal)
    for key in ("manifests/m0.json", "manifests/m1.json"):
        b"".join(recorder.get(key))
    list(recorder.list("manifests/"))
    list(recorder.list("data/"))
    journal.end()
    real = counting(store)
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: real)
    replay.delete("manifests/m0.json")
    replay.put("manifests/new.json", [b"new"])
    with pytest.raises(ObjectMissingError):
        replay.get_bytes("manifests/m0.json")
    assert replay.get_bytes("manifests/new.json") == b"new"
    assert "manifests/new.json" in [i.key for i in replay.list("manifests/")]
    assert replay.get_bytes("manifests/m1.json") == store.get_bytes("manifests/m1.json")
    assert [i.key for i in replay.list("data/")] == ["data/empty"]
    assert real.reads == ["get manifests/m0.json", "get manifests/new.json", "list manifests/"]


def test_the_object_lock_set_through_the_replay_is_the_stores(fds: Fds, store: LocalStorage) -> None:
    """A backup locks what it writes through the replay; what reads the lock back (the catalog
    index is never written under a lock) reads the store's."""
    fds.close_writer()
    replay = ReplayBackend(JournalReader(fds.read, fds.data), lambda: store)
    assert replay.object_lock is None
    lock = ObjectLock("governance", datetime(2030, 1, 1, tzinfo=timezone.utc))
    replay.lock_new_objects(lock)
    assert replay.object_lock == lock == store.object_lock
