"""Repository storage backends behind one interface (:class:`Storage`)."""

from __future__ import annotations

from backup_tool.repository.storage.base import (
    ObjectExistsError,
    ObjectInfo,
    ObjectMissingError,
    PutResult,
    Storage,
)
from backup_tool.repository.storage.encrypted import (
    EncryptedStorage,
    EncryptionKey,
    key_from_environment,
    previous_keys_from_environment,
)

__all__ = ["EncryptedStorage", "EncryptionKey", "ObjectExistsError", "ObjectInfo", "ObjectMissingError",
           "PutResult", "Storage", "open_backend", "open_repository", "open_storage"]


def open_backend(url: str) -> Storage:
    """The store itself for a repository URL (no encryption layer): ``s3://bucket/prefix`` or a
    local directory path; ConfigError for any other scheme."""
    if url.startswith("s3://"):
        from backup_tool.repository.storage.s3 import S3Storage

        return S3Storage(url)
    if "://" in url and not url.startswith("file://"):
        from backup_tool.errors import ConfigError

        raise ConfigError(f"unsupported repository URL {url!r}",
                          "use s3://BUCKET/PREFIX or a local directory path")
    from backup_tool.repository.storage.local import LocalStorage

    return LocalStorage(url.removeprefix("file://"))


def open_storage(url: str, key: EncryptionKey | None = None, backend: Storage | None = None) -> Storage:
    """The backend for a repository URL: ``s3://bucket/prefix`` or a local directory path.

    Objects are encrypted with ``key``, else with the key configured in the environment
    (``BACKUP_TOOL_ENCRYPTION_KEY`` / ``BACKUP_TOOL_ENCRYPTION_KEY_FILE``), else not at all;
    encrypted objects are recognised (and a missing key named) in every case. Keys retired by
    a rotation (``BACKUP_TOOL_PREVIOUS_KEYS_FILE``) still read what was written with them.
    ``backend``: the store of ``url`` already opened (e.g. a :class:`.ahead.ReplayBackend`).
    """
    key = key or key_from_environment()
    previous = previous_keys_from_environment()
    return EncryptedStorage(backend or open_backend(url), key, previous)


def open_repository(url: str, key: EncryptionKey | None = None, backend: Storage | None = None) -> Storage:
    """:func:`open_storage` for a command that reads the repository: a repository that does not
    exist is an error naming it (RepositoryMissingError, exit 1), never "no backups".

    A local repository exists once its directory does; an S3 repository once its bucket does
    (every request to a missing bucket fails with "bucket ... does not exist"). An existing
    directory or bucket prefix with no backups is a valid empty repository. Commands that write
    (``backup``, ``run-due``, ``wal push``, ``check``'s write probe) use :func:`open_storage`
    and create the repository with their first object.
    """
    storage = open_storage(url, key, backend)
    if not storage.repository_exists():
        from backup_tool.errors import RepositoryMissingError

        raise RepositoryMissingError(f"repository {storage.url} does not exist",
                                     "check --repo / BACKUP_TOOL_REPO; the first 'backup-tool backup' "
                                     "or 'run-due' creates it")
    return storage
