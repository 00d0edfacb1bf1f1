"""The storage interface: the only way the rest of the tool touches repository objects.

A repository is a flat namespace of immutable objects addressed by ``/``-separated keys.
Backends guarantee that an object becomes visible only when it is completely and durably
written (a crashed writer leaves nothing under the key), that ``put`` never replaces an
existing object, and that ``put`` returns the sha256 and size of exactly the bytes stored.
One relaxation is opt-in: under a prefix passed to ``defer_name_sync`` the object's bytes are
still durable before its name appears, but the name itself may be lost to a power failure
until ``sync_names`` returns. A writer uses it only for objects that nothing references
before that call (a backup's data objects, published by the manifest written after it).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator

from backup_tool.errors import StorageError


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class PutResult:
    key: str
    size: int
    sha256: str


class ObjectExistsError(StorageError):
    """``put`` was asked to write a key that already holds an object."""


class ObjectMissingError(StorageError):
    """The key holds no object."""


class ObjectLockedError(StorageError):
    """The object is under an Object Lock retention (or a legal hold) that forbids deleting it now.

    Raised only once the store's own lock state proves it: a refusal the lock does not
    explain is a :class:`PermissionDeniedError`."""


class PermissionDeniedError(StorageError):
    """The store refused a request for lack of permission; ``action`` is the IAM action missing
    (e.g. ``s3:DeleteObjectVersion``), or "" when it cannot be named."""

    def __init__(self, message: str, hint: str | None = None, action: str = "") -> None:
        super().__init__(message, hint)
        self.action = action


@dataclass(frozen=True)
class PartialUpload(ObjectInfo):
    """An unfinished write (local temp file, S3 multipart upload); ``modified`` is its last activity."""

    upload_id: str = ""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object key {key!r}")
    return key


class HashingCounter:
    """Running sha256 and byte count of a stream, updated chunk by chunk."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True)
class ObjectLock:
    """WORM retention applied to objects as they are written (S3 Object Lock). Read back from
    the store, ``legal_hold`` means the object is held whatever ``retain_until`` says, until
    someone removes the hold."""

    mode: str
    retain_until: datetime
    legal_hold: bool = False


@dataclass(frozen=True)
class AtRest:
    """How the store says it keeps one object: server-side encryption and Object Lock, as a
    HEAD of the object reports them now (evidence, not what the writer asked for).
    ``applicable`` is False for a backend that has neither (a local directory)."""

    sse: str | None = None
    sse_kms_key_id: str | None = None
    lock: ObjectLock | None = None
    applicable: bool = True


class Storage(ABC):
    """A repository backend. Implementations: :mod:`.local` and :mod:`.s3`."""

    url: str
    object_lock: ObjectLock | None = None

    def lock_new_objects(self, lock: ObjectLock | None) -> None:
        """Apply ``lock`` to every object written from now on by this instance."""
        self.object_lock = lock

    @abstractmethod
    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        """Store the concatenated chunks under ``key`` atomically; never overwrite."""

    @abstractmethod
    def get(self, key: str) -> Iterator[bytes]:
        """Stream the object's bytes (resuming transparently after transient faults)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every complete object whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def defer_name_sync(self, prefix: str) -> None:  # noqa: B027 - optional hook, a no-op where a completed write is durable whole
        """Let objects put under ``prefix`` from now on have their names made durable together
        by :meth:`sync_names` instead of one by one (see the module docstring)."""

    def sync_names(self, prefix: str) -> None:  # noqa: B027 - optional hook, see defer_name_sync
        """Make durable the name of every object put under ``prefix`` since
        :meth:`defer_name_sync`, and stop deferring there. Raises StorageError if that fails."""

    def get_stored(self, key: str) -> Iterator[bytes]:
        """The object's bytes exactly as stored: what a manifest's size and sha256 describe."""
        return self.get(key)

    def decode(self, key: str, stored: Iterable[bytes]) -> Iterator[bytes]:
        """What the writer passed to :meth:`put`, from :meth:`get_stored`'s bytes (here: the same)."""
        return iter(stored)

    def lock_of(self, key: str) -> ObjectLock | None:
        """The Object Lock retention on the object's current version (None: not locked)."""
        return None

    def at_rest(self, key: str) -> AtRest:
        """Server-side encryption and Object Lock of the object as the store reports them."""
        return AtRest(applicable=False)

    def repository_exists(self) -> bool:
        """Whether the repository's location exists at all (a reader refuses a missing one);
        an existing location without backups is a valid empty repository."""
        return True

    def object_lock_enabled(self) -> bool | None:
        """Whether the repository can hold locked objects (None: the backend has no Object Lock)."""
        return None

    def purge(self, key: str) -> None:
        """Remove the object for good (every stored version); ObjectLockedError if a lock forbids it."""
        self.delete(key)

    def list_partials(self, prefix: str = "") -> Iterator[PartialUpload]:
        """Unfinished writes (for garbage collection); none by default."""
        return iter(())

    def delete_partial(self, partial: PartialUpload) -> None:  # noqa: B027 - optional hook, a no-op where there are no partial writes
        """Discard an unfinished write found by :meth:`list_partials`."""

    def put_bytes(self, key: str, data: bytes) -> PutResult:
        return self.put(key, [data])

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.get(key))

    def get_range(self, key: str, start: int, end: int, stored_size: int) -> bytes:
        """Bytes ``[start, end)`` of what the writer passed to :meth:`put` (``stored_size``: the
        object's stored size, as a manifest records it). Backends override this with a ranged
        read; this fallback streams the object up to ``end``."""
        out = bytearray()
        pos = 0
        for chunk in self.get(key):
            lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
            if lo < hi:
                out += chunk[lo:hi]
            pos += len(chunk)
            if pos >= end:
                break
        return bytes(out)

    def check_writable(self) -> None:
        """Write, read back and delete a probe object; raise StorageError if any step fails."""
        import uuid

        key = f"tmp/probe-{uuid.uuid4().hex}"
        self.put_bytes(key, b"probe")
        try:
            if self.get_bytes(key) != b"probe":
                raise StorageError(f"{self.url}: a probe object read back differently")
        finally:
            self.delete(key)
