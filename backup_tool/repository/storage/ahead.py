"""Repository reads made ahead by another process, answered from its journal.

A command whose first repository reads are known before it has loaded its own machinery
(``restore tables``: the catalog, the manifest, the schema archive, the first data object)
can have a forked process make them meanwhile. That process wraps its backend in a
:class:`RecordingBackend`, which writes what it reads to a journal: the content into an
anonymous file both processes hold (a memfd: it has no name, so nothing is ever left on
disk), then one index line on a pipe. The command wraps the journal in a
:class:`ReplayBackend` and uses it as its backend.

Guarantees:

- A ``list`` (of the same prefix), ``exists`` or ``repository_exists`` is answered from the
  journal only when the same read completed there: the answer is what the same code got from
  the same store moments earlier (a listing as a command reading a little earlier would
  have seen it). A ``get`` streams the object's bytes from the journal as the reading
  process downloads them; should that process stop before the end, the rest comes from the
  store (objects are never replaced, and the command checks every object's sha256 anyway).
- Every other read goes to the real backend (opened on first use), and so does every read
  once the journal ends without it (the reading process finished, failed or died): errors,
  retries and results are then exactly the backend's own. A read the reading process failed
  is never answered, so a failure is always the command's own, reported as it would be.
- While the reading process has not yet said which objects it will fetch (it is still
  reading the catalog), a read it has not recorded waits for its next line: the command's
  first reads are the same as its. Once it has named them (``plan``), only those are waited
  for.
- Writes, deletes and everything else go to the real backend; nothing is ever written to the
  store by the reading process. Once the command has written or deleted a key (or begun to),
  that key is never answered from the journal again, nor a listing of a prefix holding it: a
  read after one's own write sees it.
- A command that lists a prefix again to see what changed meanwhile (a backup reads the catalog
  before and after taking its lock) opens the replay with ``lists_once``: the journal answers
  each prefix's first listing only, and every later one comes from the store.

The reads may also be made by a thread of the command itself (``backup full|incremental``:
see :mod:`backup_tool.cli.ahead`), the journal then being written and read in one process.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator

from backup_tool.repository.storage.base import AtRest, ObjectInfo, ObjectLock, PartialUpload, PutResult, Storage

READ_CHUNK = 1 << 20

ReadKey = tuple[str, str]
"""(operation, argument): ("get", key), ("list", prefix), ("exists", key), ("repository", "")."""


class Journal:
    """The writing end: one JSON line per record on ``control_fd``, a record's content first
    written into ``data_fd`` at the next free offset. Safe for several threads of the one
    reading process (the catalog reads manifests on a pool): each piece of content is
    appended and announced under one lock, so every line names its own bytes."""

    def __init__(self, control_fd: int, data_fd: int) -> None:
        self.control_fd = control_fd
        self.data_fd = data_fd
        self._end = 0
        self._lock = threading.Lock()

    def line(self, record: dict[str, Any], content: list[bytes] | None = None) -> None:
        """Append ``content`` and announce it as ``record`` (given ``off`` and ``len``)."""
        with self._lock:
            if content is not None:
                start = self._end
                for chunk in content:
                    view = memoryview(chunk)
                    while view:
                        written = os.pwrite(self.data_fd, view, self._end)
                        self._end += written
                        view = view[written:]
                record = {**record, "off": start, "len": self._end - start}
            data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
            while data:
                data = data[os.write(self.control_fd, data):]

    def hello(self, url: str) -> None:
        self.line({"op": "hello", "url": url})

    def plan(self, keys: Iterable[str]) -> None:
        """The objects this process will read from now on (nothing else is worth waiting for)."""
        self.line({"op": "plan", "keys": list(keys)})

    def end(self) -> None:
        self.line({"op": "end"})


class RecordingBackend(Storage):
    """``inner`` for reading, what it reads written to ``journal``; no writes."""

    def __init__(self, inner: Storage, journal: Journal) -> None:
        self.inner = inner
        self.url = inner.url
        self.journal = journal
        self._begun: set[str] = set()
        self._lock = threading.Lock()

    def get(self, key: str) -> Iterator[bytes]:
        """The object's chunks as they arrive, each recorded at once (``part``), then its end
        (``get``): the replaying side streams it while it downloads. A key is recorded once."""
        with self._lock:
            record = key not in self._begun
            self._begun.add(key)
        for chunk in self.inner.get_stored(key):
            if record:
                self.journal.line({"op": "part", "arg": key}, [chunk])
            yield chunk
        if record:
            self.journal.line({"op": "get", "arg": key})

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = list(self.inner.list(prefix))
        body = json.dumps([[i.key, i.size, i.modified.isoformat()] for i in found]).encode()
        self.journal.line({"op": "list", "arg": prefix}, [body])
        return iter(found)

    def exists(self, key: str) -> bool:
        found = self.inner.exists(key)
        self.journal.line({"op": "exists", "arg": key, "value": found})
        return found

    def repository_exists(self) -> bool:
        found = self.inner.repository_exists()
        self.journal.line({"op": "repository", "arg": "", "value": found})
        return found

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        raise NotImplementedError("a recording backend only reads")

    def delete(self, key: str) -> None:
        raise NotImplementedError("a recording backend only reads")


class JournalReader:
    """The reading end of a :class:`Journal`: its lines parsed as they are needed (never
    ahead of a read that wants them), by one thread at a time."""

    def __init__(self, control_fd: int, data_fd: int) -> None:
        self.control_fd = control_fd
        self.data_fd = data_fd
        self.url: str | None = None
        self.records: dict[ReadKey, dict[str, Any]] = {}
        self.parts: dict[str, list[tuple[int, int]]] = {}
        self.complete: set[str] = set()
        self.planned: frozenset[str] | None = None
        self.ended = False
        self._buffer = b""
        self._lock = threading.Lock()

    def _next_line(self) -> None:
        """Read and apply one more line; EOF (the writer is gone) or a damaged line ends the journal."""
        while b"\n" not in self._buffer:
            try:
                more = os.read(self.control_fd, 1 << 16)
            except OSError:
                more = b""
            if not more:
                self.ended = True
                return
            self._buffer += more
        raw, self._buffer = self._buffer.split(b"\n", 1)
        try:
            record = json.loads(raw)
            op = record["op"]
        except (ValueError, KeyError, TypeError):
            self.ended = True
            return
        if op == "hello":
            self.url = str(record["url"])
        elif op == "plan":
            self.planned = frozenset(record["keys"])
        elif op == "end":
            self.ended = True
        elif op == "part":
            self.parts.setdefault(str(record["arg"]), []).append((int(record["off"]), int(record["len"])))
        elif op == "get":
            self.parts.setdefault(str(record["arg"]), [])
            self.complete.add(str(record["arg"]))
        else:
            self.records[(op, str(record["arg"]))] = record

    def hello(self) -> str | None:
        """The URL of the store the reads are made from (None: the writer is gone)."""
        with self._lock:
            while self.url is None and not self.ended:
                self._next_line()
            return self.url

    def _coming(self, key: ReadKey, present: Callable[[], bool]) -> bool:
        """Wait (holding the lock) until ``present()`` or until it cannot become true."""
        while not present() and not self.ended:
            if self.planned is not None and (key[0] != "get" or key[1] not in self.planned):
                return False
            self._next_line()
        return present()

    def find(self, key: ReadKey) -> dict[str, Any] | None:
        """The record of ``key`` (a list, exists or repository read), waiting for it while it
        may still come; None if it will not."""
        with self._lock:
            return self.records.get(key) if self._coming(key, lambda: key in self.records) else None

    def started(self, key: str) -> bool:
        """Whether the object's read began in the journal (waiting while it may still begin)."""
        with self._lock:
            return self._coming(("get", key), lambda: key in self.parts)

    def stream(self, key: str) -> Iterator[bytes]:
        """The object's bytes as the journal records them, waiting for each part; stops
        early (without error) if the journal ends before the object does: the caller can
        tell by the count of bytes (:meth:`whole`)."""
        i = 0
        while True:
            with self._lock:
                parts = self.parts.get(key, [])
                while i >= len(parts) and key not in self.complete and not self.ended:
                    self._next_line()
                if i >= len(parts):
                    return
                off, length = parts[i]
            i += 1
            yield from self.content({"off": off, "len": length})

    def whole(self, key: str) -> bool:
        with self._lock:
            return key in self.complete

    def content(self, record: dict[str, Any]) -> Iterator[bytes]:
        pos, end = int(record["off"]), int(record["off"]) + int(record["len"])
        while pos < end:
            chunk = os.pread(self.data_fd, min(READ_CHUNK, end - pos), pos)
            if not chunk:
                raise OSError("the read-ahead journal is shorter than its index")
            pos += len(chunk)
            yield chunk

    def finish(self) -> None:
        """Stop reading: later reads go to the real backend."""
        with self._lock:
            self.ended = True


class ReplayBackend(Storage):
    """A backend answering the reads ``journal`` recorded, and everything else from the
    backend ``open_real`` opens (once, on first need). See the module docstring.
    ``answered``: the reads answered from the journal; ``opened``: whether the store was."""

    def __init__(self, journal: JournalReader, open_real: Callable[[], Storage], lists_once: bool = False) -> None:
        self.journal = journal
        self._open_real = open_real
        self._real: Storage | None = None
        self._lock = threading.Lock()
        self.answered: list[ReadKey] = []
        self.lists_once = lists_once
        self._written: set[str] = set()

    @property
    def url(self) -> str:  # type: ignore[override]  # the base declares a plain attribute
        """The store's URL as its backend spells it: the reading process's, else the real one's."""
        return self.journal.hello() or self.real.url

    @property
    def real(self) -> Storage:
        with self._lock:
            if self._real is None:
                self._real = self._open_real()
            return self._real

    @property
    def opened(self) -> bool:
        return self._real is not None

    def _recorded(self, op: str, arg: str) -> dict[str, Any] | None:
        if self._touched(op, arg):
            return None
        record = self.journal.find((op, arg))
        if record is not None:
            self.answered.append((op, arg))
        return record

    def _touched(self, op: str, arg: str) -> bool:
        """Whether the read ``(op, arg)`` must come from the store: the command wrote what it
        covers, or (``lists_once``) the journal already answered this listing."""
        with self._lock:
            if op == "list":
                return ((self.lists_once and (op, arg) in self.answered)
                        or any(key.startswith(arg) for key in self._written))
            return arg in self._written

    def _writing(self, key: str) -> None:
        with self._lock:
            self._written.add(key)

    def get(self, key: str) -> Iterator[bytes]:
        """Lazy, like the backends' own: nothing waits until the first chunk is asked for.
        Streamed from the journal while the reading process downloads it; if that process
        stops before the end, the rest comes from the store (the object read again, the part
        already given skipped: objects are never replaced, and callers check the sha256)."""
        if self._touched("get", key) or not self.journal.started(key):
            yield from self.real.get_stored(key)
            return
        self.answered.append(("get", key))
        given = 0
        for chunk in self.journal.stream(key):
            given += len(chunk)
            yield chunk
        if self.journal.whole(key):
            return
        skip = given
        for chunk in self.real.get_stored(key):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:] if skip else chunk
            skip = 0

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        record = self._recorded("list", prefix)
        if record is None:
            yield from self.real.list(prefix)
            return
        rows = json.loads(b"".join(self.journal.content(record)))
        yield from [ObjectInfo(str(k), int(s), datetime.fromisoformat(m)) for k, s, m in rows]

    def exists(self, key: str) -> bool:
        record = self._recorded("exists", key)
        return self.real.exists(key) if record is None else bool(record["value"])

    def repository_exists(self) -> bool:
        record = self._recorded("repository", "")
        return self.real.repository_exists() if record is None else bool(record["value"])

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        self._writing(key)
        return self.real.put(key, chunks)

    def delete(self, key: str) -> None:
        self._writing(key)
        self.real.delete(key)

    def lock_new_objects(self, lock: ObjectLock | None) -> None:
        self.real.lock_new_objects(lock)

    @property
    def object_lock(self) -> ObjectLock | None:  # type: ignore[override]  # the base declares a plain attribute; a wrapper must delegate
        """The store's: what :meth:`lock_new_objects` set there (None while it is unopened)."""
        return self._real.object_lock if self._real is not None else None

    def get_range(self, key: str, start: int, end: int, stored_size: int) -> bytes:
        return self.real.get_range(key, start, end, stored_size)

    def lock_of(self, key: str) -> ObjectLock | None:
        return self.real.lock_of(key)

    def at_rest(self, key: str) -> AtRest:
        return self.real.at_rest(key)

    def object_lock_enabled(self) -> bool | None:
        return self.real.object_lock_enabled()

    def purge(self, key: str) -> None:
        self._writing(key)
        self.real.purge(key)

    def list_partials(self, prefix: str = "") -> Iterator[PartialUpload]:
        return self.real.list_partials(prefix)

    def delete_partial(self, partial: PartialUpload) -> None:
        self.real.delete_partial(partial)

    def check_writable(self) -> None:
        self.real.check_writable()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("journal", "answered"):
            raise AttributeError(name)
        return getattr(self.real, name)
