"""Repository storage backends behind one interface (:class:`Storage`)."""

from __future__ import annotations

from backup_tool.storage.base import (
    ObjectExistsError,
    ObjectInfo,
    ObjectMissingError,
    PutResult,
    Storage,
)

__all__ = ["ObjectExistsError", "ObjectInfo", "ObjectMissingError", "PutResult", "Storage",
           "open_storage"]


def open_storage(url: str) -> Storage:
    """The backend for a repository URL: ``s3://bucket/prefix`` or a local directory path."""
    if url.startswith("s3://"):
        from backup_tool.storage.s3 import S3Storage

        return S3Storage(url)
    if "://" in url and not url.startswith("file://"):
        from backup_tool.errors import ConfigError

        raise ConfigError(f"unsupported repository URL {url!r}",
                          "use s3://BUCKET/PREFIX or a local directory path")
    from backup_tool.storage.local import LocalStorage

    return LocalStorage(url.removeprefix("file://"))
