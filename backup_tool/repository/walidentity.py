"""Which cluster a WAL archive belongs to: ``wal/archive.info``.

Two clusters archiving into one repository would interleave their segments (both start at
``000000010000000000000001``) and make every recovery from it unsafe. Like pgBackRest's
``archive.info``, the first ``wal push`` records the cluster's system identifier and
PostgreSQL major version in ``wal/archive.info``; from then on a push from another cluster
is refused (PostgreSQL keeps the segment and retries), ``backup base`` from another cluster
is refused, and ``check`` reports the mismatch.

Contracts:

- The record is written only if absent, atomically (``Storage.put`` never replaces an
  object: a conditional ``If-None-Match: *`` PUT on S3, a hard link locally), then read back
  and compared, so of two clusters racing to be first exactly one wins and the other is
  refused.
- The pushing cluster is known without a connection: the first 8 bytes of
  ``global/pg_control`` (the system identifier, little-endian) and ``PG_VERSION`` of the data
  directory holding ``pg_wal``; for a file outside a data directory, the long header of the
  segment itself (``xlp_sysid``). A file with neither (a history file copied elsewhere) is
  pushed unchecked.
- Verified identities are cached in the spool beside ``pg_wal`` (one file per repository),
  so the repository's record is read once, not for every segment; every segment's own
  header is still compared with the verified identity before it is uploaded.

Local parts import only the standard library (the spool is read on the hot path).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from backup_tool import __version__
from backup_tool.core import walnames
from backup_tool.core.timestamps import utc_iso
from backup_tool.errors import RefusedError, StorageError
from backup_tool.repository.storage.base import ObjectExistsError, ObjectMissingError

if TYPE_CHECKING:
    from backup_tool.repository.storage import Storage

ARCHIVE_INFO_KEY = "wal/archive.info"
INFO_FORMAT = 1


@dataclass(frozen=True)
class ClusterIdentity:
    """A cluster as WAL knows it: its system identifier (set by initdb, kept by replicas and
    restores of its backups) and, when known, its PostgreSQL major version."""

    system_identifier: int
    pg_major: int | None = None

    def describe(self) -> str:
        return f"system identifier {self.system_identifier}" + (
            f" (PostgreSQL {self.pg_major})" if self.pg_major else "")


class ArchiveMismatchError(RefusedError):
    """The WAL archive belongs to another cluster; exit code 1."""


def mismatch(recorded: ClusterIdentity, local: ClusterIdentity) -> bool:
    """True when ``local`` is not the cluster the archive records (a major version counts
    only when both sides know it)."""
    if recorded.system_identifier != local.system_identifier:
        return True
    return recorded.pg_major is not None and local.pg_major is not None and recorded.pg_major != local.pg_major


# --------------------------------------------------------------------------- the local cluster


def pg_control_identity(data_dir: Path) -> ClusterIdentity | None:
    """From ``global/pg_control`` (first 8 bytes: the system identifier) and ``PG_VERSION``."""
    try:
        with open(data_dir / "global" / "pg_control", "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if len(head) < 8:
        return None
    major: int | None
    try:
        major = int((data_dir / "PG_VERSION").read_text().strip().split(".")[0])
    except (OSError, ValueError):
        major = None
    return ClusterIdentity(int.from_bytes(head, "little"), major)


def segment_identity(path: Path) -> ClusterIdentity | None:
    """``xlp_sysid`` of a segment's first (long) page header, if the header is plausible."""
    header = walnames.read_long_header(path)
    return ClusterIdentity(header.system_identifier) if header else None


def wal_file_identity(path: Path) -> ClusterIdentity | None:
    """The cluster that wrote the WAL file at ``path`` (``PGDATA/pg_wal/NAME``, or a segment
    anywhere); None when nothing says."""
    return pg_control_identity(path.parent.parent) or segment_identity(path)


# --------------------------------------------------------------------------- the repository's record


def parse_info(data: bytes) -> ClusterIdentity:
    try:
        body = json.loads(data)
        major = body.get("pg_major")
        return ClusterIdentity(int(body["system_identifier"]), int(major) if major is not None else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StorageError(f"{ARCHIVE_INFO_KEY} is unreadable: {data[:60]!r}",
                           "it records which cluster the WAL archive belongs to; restore it from a copy "
                           "or remove it so the next wal push records the archiving cluster again") from None


def render_info(identity: ClusterIdentity, tool_version: str, now: datetime) -> bytes:
    return json.dumps({"format": INFO_FORMAT, "system_identifier": str(identity.system_identifier),
                       "pg_major": identity.pg_major,
                       "created_at": utc_iso(now),
                       "tool_version": tool_version}, indent=1).encode()


def read_archive_identity(storage: Storage) -> ClusterIdentity | None:
    """The cluster the repository's WAL archive records (None: nothing recorded yet)."""
    try:
        return parse_info(storage.get_bytes(ARCHIVE_INFO_KEY))
    except ObjectMissingError:
        return None


def refusal(recorded: ClusterIdentity, local: ClusterIdentity, url: str, what: str) -> ArchiveMismatchError:
    return ArchiveMismatchError(
        f"{what} refused: this cluster has {local.describe()} but the WAL archive in {url} belongs to "
        f"{recorded.describe()}",
        "give each cluster its own repository (--repo / BACKUP_TOOL_REPO); nothing was written")


def verify_archive_identity(storage: Storage, local: ClusterIdentity, what: str) -> ClusterIdentity | None:
    """Raise ArchiveMismatchError if the archive records another cluster; never writes."""
    recorded = read_archive_identity(storage)
    if recorded is not None and mismatch(recorded, local):
        raise refusal(recorded, local, storage.url, what)
    return recorded


def claim_archive(storage: Storage, local: ClusterIdentity, what: str) -> ClusterIdentity:
    """The archive's identity, recording ``local`` first if the archive records none (only if
    absent, then read back: of two racing clusters the loser is refused)."""
    recorded = verify_archive_identity(storage, local, what)
    if recorded is not None:
        return recorded
    try:
        storage.put_bytes(ARCHIVE_INFO_KEY, render_info(local, __version__, datetime.now(timezone.utc)))
    except ObjectExistsError:
        pass
    recorded = verify_archive_identity(storage, local, what)
    if recorded is None:
        raise StorageError(f"{ARCHIVE_INFO_KEY} vanished from {storage.url} right after it was written",
                           "check who deletes objects in the repository")
    return recorded


# --------------------------------------------------------------------------- the cache in the spool


def _cache_file(spool: Path, repo_id: str) -> Path:
    return spool / f"archive-identity-{hashlib.sha256(repo_id.encode()).hexdigest()[:16]}.json"


def cached(spool: Path, repo_id: str, local: ClusterIdentity) -> bool:
    """True if ``local`` was already verified against this repository's archive."""
    try:
        data = json.loads(_cache_file(spool, repo_id).read_text())
        return (data.get("repo") == repo_id and data.get("system_identifier") == str(local.system_identifier)
                and data.get("pg_major") == local.pg_major)
    except (OSError, ValueError, AttributeError):
        return False


def remember(spool: Path, repo_id: str, local: ClusterIdentity) -> None:
    """Record that ``local`` matches this repository's archive (best effort: a cache)."""
    try:
        spool.mkdir(mode=0o700, exist_ok=True)
        target = _cache_file(spool, repo_id)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"repo": repo_id, "system_identifier": str(local.system_identifier),
                                   "pg_major": local.pg_major}))
        os.replace(tmp, target)
    except OSError:
        pass
