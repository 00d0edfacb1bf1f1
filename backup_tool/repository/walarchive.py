"""The WAL archive's layout in the repository: which names it holds and where.

Every archived file is stored under ``wal/`` as ``<name>-<sha256>.zst`` (segments grouped by
timeline and log, ``wal/<16 hex>/``; history files and backup labels under ``wal/history/``),
so the content's hash is part of the key: a second push of the same name with other content is
detected, never overwritten. Listing reads keys only, never content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Iterable

from backup_tool.core.walnames import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT_RE,
    segment_number,
    segment_timeline,
)
from backup_tool.errors import (
    UsageError,
)
from backup_tool.repository.storage.base import (
    Storage,
)

if TYPE_CHECKING:

    pass



WAL_PREFIX = "wal/"
HISTORY_PREFIX = "wal/history/"
PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")
BACKUP_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
KEY_RE = re.compile(r"^(?P<name>[0-9A-F.a-z]+)-(?P<sha>[0-9a-f]{64})\.zst$")


# --------------------------------------------------------------------------- names


def wal_file_kind(name: str) -> str:
    """``segment``, ``partial``, ``backup`` or ``history``; UsageError for anything else."""
    if SEGMENT_RE.match(name):
        return "segment"
    if PARTIAL_RE.match(name):
        return "partial"
    if BACKUP_RE.match(name):
        return "backup"
    if HISTORY_RE.match(name):
        return "history"
    raise UsageError(f"{name!r} is not a WAL file name",
                     "expected a segment (24 hex digits), a .partial, .backup or .history file")


def archive_dir(name: str) -> str:
    kind = wal_file_kind(name)
    if kind in ("history", "backup"):
        return HISTORY_PREFIX
    return f"{WAL_PREFIX}{name[:16]}/"


def object_key(name: str, sha256: str) -> str:
    return f"{archive_dir(name)}{name}-{sha256}.zst"


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class WalSegment:
    """One archived WAL segment (retention and monitoring read these)."""

    name: str
    timeline: int
    key: str
    size: int
    modified: datetime

    @property
    def sha256(self) -> str:
        return self.key.rsplit("-", 1)[1].removesuffix(".zst")

    def segno(self, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        return segment_number(self.name, seg_size)


@dataclass(frozen=True)
class WalFile:
    """Any archived WAL-related file: segment, partial segment, history or backup label."""

    name: str
    kind: str
    key: str
    size: int
    modified: datetime
    sha256: str


def _parse_key(key: str) -> tuple[str, str] | None:
    match = KEY_RE.match(key.rsplit("/", 1)[-1])
    if not match:
        return None
    return match["name"], match["sha"]


def list_archive(storage: Storage) -> list[WalFile]:
    """Every archived WAL file (segments, partials, history and backup files), by key."""
    found = []
    for info in storage.list(WAL_PREFIX):
        parsed = _parse_key(info.key)
        if parsed is None:
            continue
        name, sha = parsed
        try:
            kind = wal_file_kind(name)
        except UsageError:
            continue
        found.append(WalFile(name, kind, info.key, info.size, info.modified, sha))
    return found


def list_segments(storage: Storage) -> list[WalSegment]:
    """Every archived full WAL segment, sorted by name (timeline, then position)."""
    return segments_of(list_archive(storage))


def segments_of(files: Iterable[WalFile]) -> list[WalSegment]:
    return sorted((WalSegment(f.name, segment_timeline(f.name), f.key, f.size, f.modified)
                   for f in files if f.kind == "segment"), key=lambda s: (s.name, s.key))


def find_archived(storage: Storage, name: str) -> list[WalFile]:
    prefix = f"{archive_dir(name)}{name}-"
    found = []
    for info in storage.list(prefix):
        parsed = _parse_key(info.key)
        if parsed and parsed[0] == name:
            found.append(WalFile(name, wal_file_kind(name), info.key, info.size, info.modified, parsed[1]))
    return found
