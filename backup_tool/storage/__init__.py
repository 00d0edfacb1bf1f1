"""Repository storage backends behind one interface (:class:`Storage`)."""

from __future__ import annotations

from backup_tool.storage.base import (
    ObjectExistsError,
    ObjectInfo,
    ObjectMissingError,
    PutResult,
    Storage,
)
from backup_tool.storage.encrypted import (
    EncryptedStorage,
    EncryptionKey,
    key_from_environment,
    previous_keys_from_environment,
)

__all__ = ["EncryptedStorage", "EncryptionKey", "ObjectExistsError", "ObjectInfo", "ObjectMissingError",
           "PutResult", "Storage", "open_storage"]


def open_storage(url: str, key: EncryptionKey | None = None) -> Storage:
    """The backend for a repository URL: ``s3://bucket/prefix`` or a local directory path.

    Objects are encrypted with ``key``, else with the key configured in the environment
    (``BACKUP_TOOL_ENCRYPTION_KEY`` / ``BACKUP_TOOL_ENCRYPTION_KEY_FILE``), else not at all;
    encrypted objects are recognised (and a missing key named) in every case. Keys retired by
    a rotation (``BACKUP_TOOL_PREVIOUS_KEYS_FILE``) still read what was written with them.
    """
    key = key or key_from_environment()
    previous = previous_keys_from_environment()
    if url.startswith("s3://"):
        from backup_tool.storage.s3 import S3Storage

        return EncryptedStorage(S3Storage(url), key, previous)
    if "://" in url and not url.startswith("file://"):
        from backup_tool.errors import ConfigError

        raise ConfigError(f"unsupported repository URL {url!r}",
                          "use s3://BUCKET/PREFIX or a local directory path")
    from backup_tool.storage.local import LocalStorage

    return EncryptedStorage(LocalStorage(url.removeprefix("file://")), key, previous)
