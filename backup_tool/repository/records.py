"""The backup record: the one summary of a backup that every planner (retention, what is due,
status, audit) reads, built from a manifest or from the catalog index.

A record carries no behaviour beyond its own (de)serialisation; decisions over records live in
:mod:`backup_tool.governance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Mapping

from backup_tool.core.kinds import BackupKind
from backup_tool.core.timestamps import iso, parse_utc
from backup_tool.core.walnames import (
    DEFAULT_SEGMENT_SIZE,
    lsn_segment,
    parse_lsn,
    segment_name,
    segment_prefix,
)

if TYPE_CHECKING:
    from backup_tool.repository.manifest import Manifest


@dataclass(frozen=True)
class BackupRecord:
    """What retention, scheduling, monitoring and the audit need to know about one backup."""

    id: str
    kind: str
    started_at: datetime
    expires_at: datetime
    parent_id: str | None = None
    database: str = ""
    finished_at: datetime | None = None
    needs: frozenset[str] = frozenset()
    lock_mode: str | None = None
    lock_until: datetime | None = None
    size_bytes: int = 0
    objects: int = 0
    start_wal: str | None = None
    wal_segment_size: int = DEFAULT_SEGMENT_SIZE
    policy_name: str = ""

    @property
    def deps(self) -> frozenset[str]:
        extra = {self.parent_id} if self.parent_id else set()
        return frozenset((self.needs | extra) - {self.id})

    @classmethod
    def from_manifest(cls, m: Manifest) -> BackupRecord:
        needs = {o.key.split("/")[1] for o in m.objects()
                 if o.key.startswith("backups/") and o.key.count("/") >= 2}
        lock = m.options.get("object_lock")
        until = lock.get("retain_until") if lock else None
        return cls(
            id=m.id, kind=m.kind, parent_id=m.parent_id, database=m.database,
            started_at=m.started_at, finished_at=m.finished_at, expires_at=m.expires_at,
            needs=frozenset(needs - {m.id}),
            lock_mode=lock.get("mode") if lock and until else None,
            lock_until=parse_utc(until) if isinstance(until, str) else None,
            size_bytes=m.size_bytes, objects=len(m.own_objects()),
            start_wal=base_start_segment(m), policy_name=str(m.policy.get("name", "")),
            wal_segment_size=m.physical.wal_segment_size if m.physical else DEFAULT_SEGMENT_SIZE,
        )


    def to_index(self) -> dict[str, Any]:
        """The record as the catalog index stores it (:mod:`backup_tool.repository.catalog_index`)."""
        return {"id": self.id, "kind": self.kind, "started_at": iso(self.started_at),
                "expires_at": iso(self.expires_at), "parent_id": self.parent_id, "database": self.database,
                "finished_at": iso(self.finished_at), "needs": sorted(self.needs), "lock_mode": self.lock_mode,
                "lock_until": iso(self.lock_until), "size_bytes": self.size_bytes, "objects": self.objects,
                "start_wal": self.start_wal, "wal_segment_size": self.wal_segment_size,
                "policy_name": self.policy_name}

    @classmethod
    def from_index(cls, body: Mapping[str, Any]) -> BackupRecord:
        """Inverse of :meth:`to_index`; KeyError/TypeError/ValueError for a malformed entry."""
        def when(name: str) -> datetime | None:
            value = body[name]
            return None if value is None else parse_utc(str(value))

        started, expires = when("started_at"), when("expires_at")
        if started is None or expires is None:
            raise ValueError("started_at and expires_at are required")
        return cls(id=str(body["id"]), kind=str(body["kind"]), started_at=started, expires_at=expires,
                   parent_id=body["parent_id"], database=str(body["database"]), finished_at=when("finished_at"),
                   needs=frozenset(str(n) for n in body["needs"]), lock_mode=body["lock_mode"],
                   lock_until=when("lock_until"), size_bytes=int(body["size_bytes"]),
                   objects=int(body["objects"]), start_wal=body["start_wal"],
                   wal_segment_size=int(body["wal_segment_size"]), policy_name=str(body["policy_name"]))


def base_start_segment(m: Manifest) -> str | None:
    """The WAL segment a base backup's recovery starts from (None for a logical backup)."""
    if m.kind != BackupKind.BASE or m.physical is None:
        return None
    p = m.physical
    return segment_prefix(p.start_wal) or segment_name(
        p.timeline, lsn_segment(parse_lsn(p.start_lsn), p.wal_segment_size), p.wal_segment_size)
