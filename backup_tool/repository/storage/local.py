"""Local-directory repository.

Writes go to a hidden temporary file in the destination directory, are fsynced, and are
then hard-linked into place (``link`` fails if the name exists, so objects are never
replaced), after which the directory itself is fsynced: a crash leaves either the complete
object or an ignorable ``.partial`` file that garbage collection removes.

Under a prefix given to ``defer_name_sync`` the directory fsync waits for ``sync_names``,
which fsyncs each directory written to once, and its ancestors up to the root (directories
made on the way were never fsynced into their parents): a backup of 3,000 tables fsyncs its
data directory once instead of 3,000 times. Each file is still fsynced before it is linked,
so a name that survives a crash always holds the complete object.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from backup_tool.errors import StorageError
from backup_tool.repository.storage.base import (
    HashingCounter,
    ObjectExistsError,
    ObjectInfo,
    ObjectMissingError,
    PartialUpload,
    PutResult,
    Storage,
    check_key,
)

PARTIAL_MARK = ".partial-"
READ_SIZE = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self._deferred: dict[str, set[Path]] = {}
        self._deferring = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _os_error(self, exc: OSError, what: str) -> StorageError:
        if exc.errno == errno.ENOSPC:
            return StorageError(f"no space left on device while writing {what} in {self.root}",
                                "free disk space or use another --repo")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StorageError(f"permission denied writing {what} in {self.root}",
                                "check the directory's owner and mode, or use another --repo")
        return StorageError(f"cannot write {what} in {self.root}: {exc.strerror}")

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        path = self._path(key)
        counter = HashingCounter()
        tmp = path.with_name(f".{path.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    counter.update(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ObjectExistsError(f"object {key} already exists in {self.root}") from None
            if not self._defer_sync(key, path.parent):
                _fsync_dir(path.parent)
        except OSError as exc:
            raise self._os_error(exc, key) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return PutResult(key, counter.size, counter.hexdigest())

    def _defer_sync(self, key: str, directory: Path) -> bool:
        with self._deferring:
            for prefix, dirs in self._deferred.items():
                if key.startswith(prefix):
                    dirs.add(directory)
                    return True
        return False

    def defer_name_sync(self, prefix: str) -> None:
        with self._deferring:
            self._deferred.setdefault(prefix, set())

    def sync_names(self, prefix: str) -> None:
        with self._deferring:
            dirs = self._deferred.pop(prefix, set())
        todo: set[Path] = set()
        for directory in dirs:
            todo.add(directory)
            todo.update(p for p in directory.parents if p.is_relative_to(self.root))
        try:
            for directory in sorted(todo, key=lambda p: len(p.parts), reverse=True):
                if directory.is_dir():  # gone when every object in it was deleted: no name left to sync
                    _fsync_dir(directory)
        except OSError as exc:
            raise self._os_error(exc, f"the directories under {prefix}") from exc

    def get(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise ObjectMissingError(f"object {key} is missing from {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key} in {self.root}: {exc.strerror}") from exc
        with fh:
            while chunk := fh.read(READ_SIZE):
                yield chunk

    def get_range(self, key: str, start: int, end: int, stored_size: int) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                fh.seek(start)
                return fh.read(end - start)
        except FileNotFoundError:
            raise ObjectMissingError(f"object {key} is missing from {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key} in {self.root}: {exc.strerror}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        found: list[ObjectInfo] = []
        # Walk only below the prefix's directory: listing manifests/ must not walk every backup.
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        pending = [base]
        while pending:
            rel = pending.pop()
            try:
                with os.scandir(os.path.join(self.root, rel) if rel else self.root) as it:
                    for entry in it:
                        key = rel + entry.name
                        if entry.is_dir(follow_symlinks=False):
                            if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                                pending.append(key + "/")
                        elif PARTIAL_MARK not in entry.name and key.startswith(prefix):
                            try:
                                st = entry.stat()
                            except FileNotFoundError:
                                continue
                            found.append(ObjectInfo(key, st.st_size,
                                                    datetime.fromtimestamp(st.st_mtime, timezone.utc)))
            except (FileNotFoundError, NotADirectoryError):
                continue
        yield from sorted(found, key=lambda o: o.key)

    def list_partials(self, prefix: str = "") -> Iterator[PartialUpload]:
        """Temporary files left by writers that crashed (for garbage collection)."""
        for dirpath, _dirs, filenames in os.walk(self.root):
            for name in filenames:
                if PARTIAL_MARK in name:
                    full = Path(dirpath) / name
                    key = full.relative_to(self.root).as_posix()
                    if not key.startswith(prefix):
                        continue
                    try:
                        st = full.stat()
                    except FileNotFoundError:
                        continue
                    yield PartialUpload(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def delete_partial(self, partial: PartialUpload) -> None:
        if PARTIAL_MARK not in partial.key:
            raise StorageError(f"{partial.key} is not a temporary file")
        self.delete(partial.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key} in {self.root}: {exc.strerror}") from exc
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def repository_exists(self) -> bool:
        """The directory exists (the first write creates it)."""
        return self.root.is_dir()
