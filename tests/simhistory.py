"""Simulated repository history for retention / schedule / audit / status tests.

Writes real manifests (through Catalog.commit) and small real objects for fake backups
with chosen start times, so the commands under test read an ordinary repository.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from backup_tool.config.policy import Policy
from backup_tool.repository.catalog import KIND_LETTER, Catalog
from backup_tool.repository.manifest import Manifest, StoredObject, TableEntry
from backup_tool.repository.records import BackupRecord
from backup_tool.repository.storage import Storage

UTC = timezone.utc


def ts(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def backup_id(kind: str, started: datetime) -> str:
    return f"{started.astimezone(UTC):%Y%m%dT%H%M%SZ}-{KIND_LETTER[kind]}{secrets.token_hex(2)}"


def make_manifest(kind: str, started: datetime, policy: Policy | None = None, parent: Manifest | None = None,
                  database: str = "app", duration: timedelta = timedelta(minutes=4),
                  lock: dict[str, str] | None = None, options: dict[str, Any] | None = None,
                  expires_at: datetime | None = None) -> Manifest:
    policy = policy or Policy()
    bid = backup_id(kind, started)
    payload = f"{bid} data".encode()
    own = StoredObject(f"backups/{bid}/data/16384.copy.zst", len(payload), hashlib.sha256(payload).hexdigest(),
                       len(payload))
    schema = StoredObject(f"backups/{bid}/schema.pgdump.zst", len(payload), hashlib.sha256(payload).hexdigest(),
                          len(payload))
    extra: tuple[StoredObject, ...] = ()
    if parent is not None:
        extra = tuple(o for o in parent.objects() if o.key.endswith(".copy.zst"))[:1]
    opts = dict(options or {})
    if lock:
        opts["object_lock"] = lock
    return Manifest(
        id=bid, kind=kind, parent_id=parent.id if parent else None, database=database,
        server_version="15.20", server_version_num=150020, encoding="UTF8", system_identifier="7",
        started_at=started, finished_at=started + duration,
        expires_at=expires_at or policy.expires_at(kind, started),
        policy={"name": policy.name, "source": policy.source}, snapshot_lsn="0/3000028", schema=schema,
        globals=None, schema_fingerprint="f" * 64,
        tables=(TableEntry("public", "t", "r", None, ("id",), 1, "0" * 16, own),),
        sequences=(), inventory={}, options=opts, extra_objects=extra, tool_version="test")


def store(storage: Storage, manifest: Manifest) -> Manifest:
    for obj in manifest.own_objects():
        storage.put_bytes(obj.key, f"{manifest.id} data".encode())
    Catalog(storage).commit(manifest)
    return manifest


@dataclass
class History:
    """Builds a repository's history: fulls and incrementals at chosen times."""

    storage: Storage
    policy: Policy = field(default_factory=Policy)
    database: str = "app"
    manifests: list[Manifest] = field(default_factory=list)

    def full(self, when: datetime | str, **kw: Any) -> Manifest:
        started = ts(when) if isinstance(when, str) else when
        m = store(self.storage, make_manifest("full", started, self.policy, database=self.database, **kw))
        self.manifests.append(m)
        return m

    def incremental(self, when: datetime | str, parent: Manifest | None = None, **kw: Any) -> Manifest:
        started = ts(when) if isinstance(when, str) else when
        parent = parent or self.manifests[-1]
        m = store(self.storage, make_manifest("incremental", started, self.policy, parent=parent,
                                              database=self.database, **kw))
        self.manifests.append(m)
        return m

    def by_id(self, backup_id: str) -> Manifest:
        return next(m for m in self.manifests if m.id == backup_id)


def seed_schedule(history: History, start: datetime, days: int, skip: set[datetime] = frozenset(),
                  delay: dict[datetime, timedelta] | None = None) -> None:
    """Follow the default schedule (full 02:00, incrementals 00/06/12/18 UTC) for ``days``."""
    delay = delay or {}
    t = start
    end = start + timedelta(days=days)
    while t < end:
        if t not in skip:
            when = t + delay.get(t, timedelta(minutes=1))
            if t.hour == 2 and t.minute == 0:
                history.full(when)
            elif t.hour % 6 == 0 and t.minute == 0 and any(m.kind == "full" for m in history.manifests):
                history.incremental(when)
        t += timedelta(hours=1)


def record(kind: str, started: str | datetime, expires_days: float | None = None, parent: str | None = None,
           database: str = "app", rid: str | None = None, **kw: Any) -> BackupRecord:
    start = ts(started) if isinstance(started, str) else started
    days = expires_days if expires_days is not None else {"full": 30, "incremental": 7, "base": 7}[kind]
    return BackupRecord(id=rid or backup_id(kind, start), kind=kind, started_at=start,
                        expires_at=start + timedelta(days=days), parent_id=parent, database=database,
                        finished_at=start + timedelta(minutes=5), **kw)
