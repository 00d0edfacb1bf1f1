"""The CPU-bound half of pushing a WAL file: read it once, hash and compress it.

Kept free of the repository client, the policy and the cluster-identity code so that the
push-ahead process can start compressing the first ready segments while it still loads
those (the imports are Python work, compression runs outside the GIL on the other core).

Guarantees: :attr:`Prepared.sha256` and :attr:`Prepared.raw_size` are those of exactly the
bytes compressed; :attr:`Prepared.identity` is the file's identity
(:func:`backup_tool.physical.walack.file_identity`) when it was the same before and after
reading and still is the file at that path, else None (what was read may not be what the
file holds now, so no acknowledgement may vouch for it). A file of at most
:data:`ONE_SHOT_MAX` bytes is compressed in one call (zstd then knows the size: about a
fifth less CPU than streaming it); larger ones stream through a spooled buffer, so memory
stays bounded whatever the segment size.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import zstandard

from backup_tool.physical import walack

READ_SIZE = 1 << 20
SPOOL_IN_MEMORY = 1 << 20
ONE_SHOT_MAX = 16 << 20  # PostgreSQL's default segment size: two in flight stay well under 200 MB
DEFAULT_LEVEL = 3


@dataclass
class Prepared:
    """A WAL file read, hashed and compressed, ready to be stored."""

    path: Path
    level: int
    sha256: str
    raw_size: int
    identity: str | None
    data: bytes | None = None
    spool: IO[bytes] | None = None

    def chunks(self) -> Iterator[bytes]:
        """The compressed bytes, once; the buffer is released as they go."""
        if self.data is not None:
            data, self.data = self.data, None
            yield data
            return
        if self.spool is not None:
            self.spool.seek(0)
            while chunk := self.spool.read(READ_SIZE):
                yield chunk
            self.close()

    def close(self) -> None:
        self.data = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None


def prepare(path: Path, level: int) -> Prepared:
    """Read, hash and compress ``path``; raises OSError when it cannot be read."""
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        before = walack.file_identity(st)
        if st.st_size <= ONE_SHOT_MAX:
            raw = fh.read()
            sha.update(raw)
            data: bytes | None = cctx.compress(raw)
            size = len(raw)
            del raw
            spool = None
        else:
            data, size = None, 0
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
            chunker = cctx.chunker(size=st.st_size, chunk_size=READ_SIZE)
            while chunk := fh.read(READ_SIZE):
                sha.update(chunk)
                size += len(chunk)
                for out in chunker.compress(chunk):
                    spool.write(out)
            for out in chunker.finish():
                spool.write(out)
        after = walack.file_identity(os.fstat(fh.fileno()))
    still = walack.file_identity(os.stat(path))
    identity = before if before == after == still else None
    return Prepared(path, level, sha.hexdigest(), size, identity, data, spool)


def archive_order(name: str) -> tuple[bool, str]:
    """Sort key of ready files in the order PostgreSQL's archiver takes them: history files
    first, then by name."""
    return not name.endswith(".history"), name


class EarlyStart:
    """Prepares the first ``count`` files PostgreSQL marked ready, at the default level, on
    threads, while the caller loads the rest of the push machinery; :meth:`take` hands them
    over (a file prepared at another level, or that failed, is simply prepared again)."""

    def __init__(self, pg_wal: Path, count: int) -> None:
        self._results: dict[str, Prepared] = {}
        self._lock = threading.Lock()
        try:
            names = sorted((e.name[:-len(".ready")] for e in os.scandir(pg_wal / "archive_status")
                            if e.name.endswith(".ready") and "/" not in e.name),
                           key=archive_order)
        except OSError:
            names = []
        self._threads = [threading.Thread(target=self._prepare, args=(pg_wal / n,), daemon=True)
                         for n in names[:count]]
        for t in self._threads:
            t.start()

    def _prepare(self, path: Path) -> None:
        try:
            prepared = prepare(path, DEFAULT_LEVEL)
        except (OSError, zstandard.ZstdError):
            return
        with self._lock:
            self._results[path.name] = prepared

    def take(self, name: str, level: int) -> Prepared | None:
        for t in self._threads:
            t.join()
        with self._lock:
            prepared = self._results.pop(name, None)
        if prepared is not None and prepared.level != level:
            prepared.close()
            return None
        return prepared

    def close(self) -> None:
        for t in self._threads:
            t.join()
        with self._lock:
            for prepared in self._results.values():
                prepared.close()
            self._results.clear()
