"""The catalog index: what ``list``, ``status``, ``audit`` and ``retention`` need to know about
every backup, in one object, so planning costs one LIST and one GET instead of one GET per
manifest.

Layout: ``catalog/index-<UTC time>-<random>.json``, the newest by name being current (objects
are never replaced, so each write is a new key and older ones are deleted best-effort)::

    {"format": 2, "written_at": ..., "ids": [every manifest id listed when it was written],
     "entries": [{"id", "manifest_sha256", "key_id", "verified", "record", "summary"}],
     "sealed_by": key id or null, "index_sha256": ..., "seal": HMAC (with a key)}

Never the source of truth: the ``manifests/`` listing is. An entry is used only for an id
that listing still holds, and only when the index *vouches* for it; every other id is read
from its manifest with all of :meth:`backup_tool.repository.catalog.Catalog.load`'s checks. The index
vouches:

- without an encryption key configured (manifests are then not authenticated either): when
  its ``index_sha256`` matches its content (damage detection, as for manifests);
- with a key: only when the index is sealed (HMAC of ``index_sha256``) under a key of the
  keyring, and only for entries whose manifest was sealed under a key of the keyring *and*
  whose seal the writer checked (``verified``). So someone with bucket access but no key
  can neither plant an entry nor make a refused manifest count; untagged or other-key
  manifests are always read and judged afresh (``BACKUP_TOOL_ALLOW_UNAUTHENTICATED``
  included).

``manifest_sha256`` is the manifest's canonical sha256 (the value its seal covers).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from backup_tool.core.timestamps import utc_iso
from backup_tool.errors import BackupToolError
from backup_tool.repository.records import BackupRecord
from backup_tool.repository.storage.encrypted import encryption_of, keyring_of, manifest_encryption

if TYPE_CHECKING:
    from backup_tool.repository.manifest import Manifest
    from backup_tool.repository.records import BackupRecord
    from backup_tool.repository.storage import Storage

INDEX_PREFIX = "catalog/"
INDEX_FORMAT = 2  # 2: summaries carry system_identifier, host and tool_version (the audit's scope)
INDEX_RE = re.compile(r"^catalog/index-\d{8}T\d{12}Z-[0-9a-f]{6}\.json$")


@dataclass(frozen=True)
class IndexEntry:
    """One backup as the index holds it."""

    id: str
    manifest_sha256: str
    key_id: str | None
    verified: bool
    record: Mapping[str, Any]
    summary: Mapping[str, Any]

    @classmethod
    def of(cls, manifest: Manifest, manifest_sha256: str, keyring: Iterable[str]) -> IndexEntry:
        """The entry for a manifest that :meth:`Catalog.load` accepted (or that was just
        committed) with ``keyring`` configured: ``verified`` when its seal was checked."""
        recorded = manifest_encryption(manifest.options)
        key_id = recorded["key_id"] if recorded else None
        return cls(manifest.id, manifest_sha256, key_id, key_id is not None and key_id in set(keyring),
                   BackupRecord.from_manifest(manifest).to_index(), manifest.summary())

    def vouched(self, keyring: Mapping[str, Any]) -> bool:
        return not keyring or (self.verified and self.key_id in keyring)

    @cached_property
    def parsed(self) -> BackupRecord:
        """The record, parsed once (ValueError/KeyError/TypeError for a malformed one)."""
        return BackupRecord.from_index(self.record)

    def backup_record(self) -> BackupRecord:
        return self.parsed

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "manifest_sha256": self.manifest_sha256, "key_id": self.key_id,
                "verified": self.verified, "record": dict(self.record), "summary": dict(self.summary)}


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k not in ("index_sha256", "seal")},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def index_keys(storage: Storage) -> list[str]:
    return sorted(info.key for info in storage.list(INDEX_PREFIX) if INDEX_RE.match(info.key))


def parse_index(raw: bytes, keyring: Mapping[str, Any]) -> tuple[list[str], dict[str, IndexEntry]] | None:
    """(ids listed when written, vouched-for entries by id), or None when the index cannot be
    trusted at all (damaged, another format, not sealed under a key of ``keyring``)."""
    try:
        body = json.loads(raw)
        if body.get("format") != INDEX_FORMAT or body.get("index_sha256") != _digest(body):
            return None
        if keyring:
            key = keyring.get(body.get("sealed_by"))
            seal = body.get("seal")
            if key is None or not isinstance(seal, str) or not key.check_seal(body["index_sha256"], seal):
                return None
        ids = [str(i) for i in body["ids"]]
        entries: dict[str, IndexEntry] = {}
        for item in body["entries"]:
            entry = IndexEntry(str(item["id"]), str(item["manifest_sha256"]), item["key_id"],
                               bool(item["verified"]), dict(item["record"]), dict(item["summary"]))
            entry.backup_record()
            if entry.vouched(keyring):
                entries[entry.id] = entry
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return ids, entries


def read_index(storage: Storage) -> tuple[list[str], dict[str, IndexEntry]] | None:
    """The newest index the storage's keyring can trust (None: none, or not trustworthy)."""
    return read_newest_index(storage, index_keys(storage))[1]


def read_newest_index(storage: Storage, keys: Sequence[str]
                      ) -> tuple[str | None, tuple[list[str], dict[str, IndexEntry]] | None]:
    """(the newest of ``keys``, the index it holds as :func:`read_index` gives it). Index
    objects are written once under a new name, so one key always holds the same index."""
    if not keys:
        return None, None
    try:
        raw = storage.get_bytes(keys[-1])
    except BackupToolError:
        return keys[-1], None  # replaced and deleted under us, or unreadable: the manifests are the truth
    return keys[-1], parse_index(raw, keyring_of(storage))


def write_index(storage: Storage, ids: Iterable[str], entries: Iterable[IndexEntry],
                now: datetime | None = None, older: Sequence[str] | None = None) -> str | None:
    """Write a new index and delete the older ones (``older``: the index keys, if just
    listed); None (nothing written) when the storage has a keyring but no current key to seal
    with (keyed readers could not trust it), or when new objects would be locked (a locked
    index could never be replaced)."""
    key = encryption_of(storage)
    if (keyring_of(storage) and key is None) or storage.object_lock is not None:
        return None
    now = now or datetime.now(timezone.utc)
    body: dict[str, Any] = {"format": INDEX_FORMAT, "written_at": utc_iso(now),
                            "ids": sorted(ids), "entries": [e.to_dict() for e in sorted(entries, key=lambda e: e.id)],
                            "sealed_by": key.key_id if key else None}
    body["index_sha256"] = _digest(body)
    if key is not None:
        body["seal"] = key.seal(body["index_sha256"])
    name = f"{INDEX_PREFIX}index-{now.astimezone(timezone.utc):%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(3)}.json"
    older = index_keys(storage) if older is None else older
    storage.put_bytes(name, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    for old in older:
        if old < name:
            try:
                storage.delete(old)
            except BackupToolError:
                pass  # best effort: readers take the newest index; a leftover is only bytes
    return name
