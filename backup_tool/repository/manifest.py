"""The backup manifest: the single source of truth about one backup.

A manifest lists every object the backup consists of (key, stored size, sha256 of the
stored bytes, uncompressed size), per-table row counts and content checksums, the schema
fingerprint and the catalog inventory validation compares against, the server it came
from, and the policy and expiry it was taken under. It is written last: a backup exists
exactly when its manifest does. The manifest carries a sha256 of its own canonical form,
so a damaged manifest is detected rather than trusted. ``format`` guards compatibility:
a manifest from a newer format is refused with a clear message instead of misread.

Format 2 is format 1 plus what client-side encryption adds: ``options["encryption"]``
(algorithm and key id, never the key) and ``manifest_mac``, an HMAC of the canonical
sha256 under the repository key, so a manifest edited by someone without the key is
detected by anyone with it. Unencrypted backups are still written as format 1, readable
by older versions.

``wal_basis`` (optional, ignored by versions that do not know it) records where the
backup's snapshot sits in the WAL and which file each table's rows lived in, so that the
next incremental can learn from the archived WAL which tables changed since (see
:mod:`backup_tool.physical.walscan`). A manifest without it, or with one that does not
parse, is simply not used that way.

Format 3 marks a base backup whose tar is stored as several zstd frames with an index
(:mod:`backup_tool.physical.basetar`): a version before it would decompress only the first
frame, so it must refuse the manifest rather than restore part of a data directory. It
also marks a logical backup holding an object of more than one frame (one of more than
:data:`backup_tool.streams.pipeline.FRAME` raw bytes; table objects are stored in frames
of that size), which such a version would restore in part.

Format 4 marks a logical backup with a table split into parts (``parts`` on its table entry,
an ordered list of objects whose rows together are the table's, ``object`` then null): a
version before it would see a table without an object and restore it empty, so it must refuse
the manifest instead. A backup without a split table is still written in its older format.

Format 5 marks a logical backup whose ``checksum_method`` is not the legacy ``row-text`` (see
:mod:`backup_tool.core.checksum_methods`): a version before it would validate with the old
method and fail every table, so it must refuse the manifest instead. Validation recomputes
with the manifest's method; a manifest without the field used ``row-text``.

Format 6 marks a logical backup whose ``checksum_method`` is ``typed-column``: a version of
format 5 knows only ``row-text`` and ``typed-row`` and must refuse it rather than misread it.
Each method is written in the lowest format that knows it (:data:`CHECKSUM_METHOD_FORMATS`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime
from typing import Any, Callable, NotRequired, TypedDict, cast

from backup_tool.core.checksum_methods import LEGACY_CHECKSUM_METHOD, ChecksumMethod
from backup_tool.core.kinds import ALL_KINDS
from backup_tool.core.timestamps import parse_utc, utc_iso
from backup_tool.errors import BackupToolError, IntegrityError

FORMAT_VERSION = 6
ENCRYPTED_FORMAT = 2
FRAMED_BASE_FORMAT = 3
SPLIT_TABLE_FORMAT = 4
CHECKSUM_METHOD_FORMAT = 5
TYPED_COLUMN_FORMAT = 6
CHECKSUM_METHOD_FORMATS: dict[ChecksumMethod, int] = {
    ChecksumMethod.ROW_TEXT: 1, ChecksumMethod.TYPED_ROW: CHECKSUM_METHOD_FORMAT,
    ChecksumMethod.TYPED_COLUMN: TYPED_COLUMN_FORMAT}
"""The lowest manifest format whose readers know each checksum method."""
SEAL_FIELD = "manifest_mac"
KINDS = ALL_KINDS


@dataclass(frozen=True)
class StoredObject:
    """One immutable object in the repository; ``key`` may belong to an earlier backup."""

    key: str
    size: int
    sha256: str
    raw_size: int
    compression: str = "zstd"


@dataclass(frozen=True)
class TableEntry:
    """One backed-up table. Its rows are stored in ``object``, or, for a table split across
    sessions, in ``parts`` (``object`` then None): each part holds the rows of one range of
    the table's blocks, and the parts together hold every row once. ``rows`` and ``checksum``
    are the whole table's, whichever way it is stored (the checksum is additive over rows)."""

    schema: str
    name: str
    relkind: str
    parent: str | None
    columns: tuple[str, ...]
    rows: int
    checksum: str
    object: StoredObject | None
    parts: tuple[StoredObject, ...] = ()

    @property
    def full_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def stored(self) -> tuple[StoredObject, ...]:
        """The objects holding the table's rows, in order (empty: the table has no data object)."""
        if self.parts:
            return self.parts
        return (self.object,) if self.object is not None else ()

    @property
    def raw_size(self) -> int:
        """Uncompressed bytes of the table's rows as stored."""
        return sum(o.raw_size for o in self.stored)


class ManifestPolicy(TypedDict, total=False):
    """The policy a backup was taken under, as its manifest records it."""

    name: str
    source: str
    retention_days: int


class ObjectLockRecord(TypedDict):
    """The Object Lock a backup's objects were written under."""

    mode: str
    retain_until: str


class SequenceOwner(TypedDict):
    """The column a sequence belongs to (``OWNED BY``, serial or identity)."""

    schema: str
    table: str
    column: str


class SequenceRecord(TypedDict):
    """One sequence's state in the backup's snapshot; older manifests lack the last two keys."""

    schema: str
    name: str
    last_value: int
    is_called: bool
    increment: NotRequired[int]
    owned_by: NotRequired[SequenceOwner | None]


class LargeObjectSummary(TypedDict):
    """How many large objects the database held, and an order-independent checksum of them."""

    count: int
    checksum: str


Rows = list[dict[str, Any]]


class ManifestInventory(TypedDict, total=False):
    """What validation compares the restored database against, by kind of object. Every key
    is optional: older manifests lack the kinds added since (a check with no record is
    skipped and says so, never failed)."""

    rls: Rows
    policies: Rows
    foreign_keys: Rows
    indexes: Rows
    functions: Rows
    triggers: Rows
    extensions: Rows
    roles: list[str]
    publications: Rows
    event_triggers: Rows
    comments: Rows
    object_privileges: Rows
    column_privileges: Rows
    default_privileges: Rows
    database: dict[str, Any]
    matviews: Rows
    large_objects: LargeObjectSummary
    column_order: dict[str, Any]
    extension_config: Rows


def inventory_counts(inventory: ManifestInventory) -> dict[str, int]:
    """How many objects of each kind the inventory records (``show``): list lengths, the
    number of large objects, one database."""
    counts = {}
    for key, value in inventory.items():
        if key == "large_objects" and isinstance(value, dict):
            counts[key] = int(value.get("count", 0))
        elif key == "database":
            counts[key] = 1
        else:
            counts[key] = len(value) if isinstance(value, (list, dict)) else 0
    return counts


class ManifestOptions(TypedDict, total=False):
    """How a backup was taken. Every key is optional: older backups lack the newer ones."""

    jobs: int
    compression_level: int
    host: str | None
    only_tables: list[str] | None
    changed_tables_method: str
    changed_tables_note: str
    dump_context: dict[str, Any]
    """What the schema and roles dumps' text depends on besides the catalogs (an incremental
    reuses its parent's only where it is the same: see :mod:`backup_tool.logical.schema_reuse`)."""
    schema_reused_from: str
    """The parent whose schema archive (and fingerprint) an incremental reused instead of dumping."""
    schema_dumped_because: str
    globals_reused_from: str
    """The parent whose roles dump an incremental reused instead of dumping."""
    globals_dumped_because: str
    checkpoint: str
    tar_members: int
    method: str
    method_note: str
    copy_changes: dict[str, int]
    pages_verified: int
    object_lock: ObjectLockRecord
    encryption: dict[str, Any]
    inventory_read_with: dict[str, str]
    pinned: list[str]
    search_path: str
    row_writes: dict[str, int]
    """Per table oid, the rows the server counted written in it as the backup ended: which
    tables the next incremental dumps before its WAL scan names them (a guess, never a verdict)."""


@dataclass(frozen=True)
class PhysicalInfo:
    """What a physical base backup needs for point-in-time recovery (kind ``base`` only).

    ``start_lsn``..``stop_lsn`` on ``timeline`` is the WAL that must be replayed from the
    archive before the restored cluster is consistent; ``stop_time`` is the server's clock
    when the backup ended, the earliest moment a recovery from this backup can target.
    ``checkpoint`` says whether the backup asked for a fast or a spread checkpoint.
    """

    start_lsn: str
    stop_lsn: str
    timeline: int
    start_wal: str
    stop_wal: str
    stop_time: datetime
    wal_segment_size: int
    checkpoint: str
    backup_label: str
    superuser: str = "postgres"
    databases: tuple[str, ...] = ()
    archive_command: str = ""
    data_checksums: bool = False


@dataclass(frozen=True)
class RelationFile:
    """Where a table's rows lived at a backup's snapshot: its oid, the (tablespace,
    relfilenode) of its heap and of its TOAST table (0: none), whether the WAL describes its
    content (``logged_heap``: a WAL-logged, permanent heap none of whose columns prints catalog
    names, as regclass or regrole do, which change with a rename elsewhere), and a digest of its
    column types (a type change that rewrites nothing can still change the rows' text)."""

    table: str  # format('%I.%I', schema, name)
    oid: int
    tablespace: int
    relfilenode: int
    toast_relfilenode: int
    logged_heap: bool
    column_types: str


@dataclass(frozen=True)
class WalBasis:
    """A snapshot's position in the WAL, recorded so a later incremental can read the WAL
    written since.

    ``start_lsn`` was read before the snapshot was taken and ``next_xid`` just after it
    (before the snapshot): every transaction the snapshot does not see either started
    writing at or after ``start_lsn`` or is one of ``running_xids`` (those in progress at
    the snapshot below ``next_xid``). ``end_lsn`` was read after the snapshot: every record
    of every transaction it sees lies before it. ``types_digest`` covers the definitions
    that shape rows' text without rewriting them (enum labels, composite and domain types,
    output functions of user types) of the types tables' columns use, directly or through
    arrays, domains, ranges and composites: a table created since (its own row type new)
    leaves it as it was unless its columns bring a type no other table used. A digest of
    another tool version's query can differ for the same types: the checksums then decide
    once.
    """

    timeline: int
    start_lsn: str
    end_lsn: str
    next_xid: int
    running_xids: tuple[int, ...]
    database_oid: int
    segment_size: int
    system_identifier: str
    types_digest: str
    relations: tuple[RelationFile, ...]

    def relation(self, table: str) -> RelationFile | None:
        return next((r for r in self.relations if r.table == table), None)


def wal_basis_from(data: Any) -> WalBasis | None:
    """The parsed ``wal_basis`` of a manifest, or None when absent or not as expected."""
    if not isinstance(data, dict):
        return None
    try:
        rels = tuple(RelationFile(**r) for r in data["relations"])
        basis = WalBasis(**{**data, "running_xids": tuple(int(x) for x in data["running_xids"]),
                            "relations": rels})
        ints = (basis.timeline, basis.next_xid, basis.database_oid, basis.segment_size)
        if not all(type(v) is int for v in ints) or not all(
                type(r.oid) is int and type(r.relfilenode) is int and type(r.toast_relfilenode) is int
                and type(r.tablespace) is int and type(r.logged_heap) is bool for r in rels):
            return None
        return basis
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Manifest:
    id: str
    kind: str
    parent_id: str | None
    database: str
    server_version: str
    server_version_num: int
    encoding: str
    system_identifier: str
    started_at: datetime
    finished_at: datetime
    expires_at: datetime
    policy: ManifestPolicy
    snapshot_lsn: str | None
    schema: StoredObject | None
    globals: StoredObject | None
    schema_fingerprint: str
    tables: tuple[TableEntry, ...]
    sequences: tuple[SequenceRecord, ...]
    inventory: ManifestInventory
    options: ManifestOptions = field(default_factory=lambda: ManifestOptions())
    extra_objects: tuple[StoredObject, ...] = ()
    tool_version: str = ""
    format: int = 1
    physical: PhysicalInfo | None = None
    large_objects: StoredObject | None = None
    client_tools: dict[str, str] = field(default_factory=dict)
    wal_basis: WalBasis | None = None
    checksum_method: ChecksumMethod = LEGACY_CHECKSUM_METHOD

    @property
    def server_major(self) -> int:
        return self.server_version_num // 10000

    def objects(self) -> list[StoredObject]:
        """Every object the backup needs, including those it shares with its parents."""
        found = [o for o in (self.schema, self.globals, self.large_objects) if o is not None]
        found += [o for t in self.tables for o in t.stored]
        found += list(self.extra_objects)
        return found

    def own_objects(self) -> list[StoredObject]:
        """Objects written by this backup (not referenced from earlier ones)."""
        prefix = f"backups/{self.id}/"
        return [o for o in self.objects() if o.key.startswith(prefix)]

    @property
    def encryption_key_id(self) -> str | None:
        """The id of the key the backup's objects are encrypted with (None: not encrypted)."""
        enc = self.options.get("encryption")
        return str(enc["key_id"]) if isinstance(enc, dict) and enc.get("key_id") else None

    @property
    def host(self) -> str | None:
        """``host:port`` the backup was taken from, as the tool connected (None: not recorded,
        backups before it was)."""
        host = self.options.get("host")
        return str(host) if host else None

    @property
    def size_bytes(self) -> int:
        return sum(o.size for o in self.own_objects())

    def table(self, schema: str, name: str) -> TableEntry | None:
        return next((t for t in self.tables if t.schema == schema and t.name == name), None)

    def summary(self) -> dict[str, Any]:
        """The ``list --json`` entry for this backup."""
        return {
            "id": self.id,
            "kind": self.kind,
            "parent_id": self.parent_id,
            "started_at": utc_iso(self.started_at),
            "finished_at": utc_iso(self.finished_at),
            "database": self.database,
            "size_bytes": self.size_bytes,
            "expires_at": utc_iso(self.expires_at),
            "server_version": self.server_version,
            "tables": len([t for t in self.tables if t.relkind == "r"]),
            "rows": sum(t.rows for t in self.tables if t.relkind == "r"),
            "raw_bytes": sum(o.raw_size for o in self.own_objects()),
            "policy": self.policy.get("name"),
            "encryption_key_id": self.encryption_key_id,
            **({"changed_tables_method": self.options["changed_tables_method"]}
               if self.options.get("changed_tables_method") else {}),
            **({"schema_reused_from": self.options["schema_reused_from"]}
               if self.options.get("schema_reused_from") else {}),
            "system_identifier": self.system_identifier,
            "host": self.host,
            "tool_version": self.tool_version,
            **({"start_lsn": self.physical.start_lsn, "stop_lsn": self.physical.stop_lsn,
                "timeline": self.physical.timeline, "checkpoint": self.physical.checkpoint}
               if self.physical else {}),
            **({"method": self.options["method"]} if self.physical and self.options.get("method") else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        data = _plain(self)
        for key in ("started_at", "finished_at", "expires_at"):
            data[key] = utc_iso(getattr(self, key))
        if self.physical is not None:
            data["physical"]["stop_time"] = utc_iso(self.physical.stop_time)
        else:
            del data["physical"]
        if self.large_objects is None:
            del data["large_objects"]
        if self.wal_basis is None:
            del data["wal_basis"]
        if self.checksum_method is LEGACY_CHECKSUM_METHOD:
            del data["checksum_method"]
        else:
            data["checksum_method"] = str(self.checksum_method)
        for table in data["tables"]:
            if not table["parts"]:
                del table["parts"]
        return data

    def to_json(self, seal: Callable[[str], str] | None = None) -> bytes:
        """The stored form; ``seal`` (a MAC of the canonical sha256) authenticates it under a key."""
        body = self.to_dict()
        body["manifest_sha256"] = _digest(body)
        if seal is not None:
            body[SEAL_FIELD] = seal(body["manifest_sha256"])
        return json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _plain(value: Any) -> Any:
    """``value`` as JSON's types: what :func:`dataclasses.asdict` makes of a manifest, built
    without its deep copies (a backup of 3,000 tables spent 0.3 s in them on every commit).
    Containers are new; scalars (strings, numbers, enums, datetimes) are shared."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def manifest_seal(raw: bytes) -> tuple[str, str | None]:
    """(canonical sha256, MAC or None) of a manifest that :func:`parse_manifest` accepted."""
    body = json.loads(raw)
    mac = body.get(SEAL_FIELD)
    return str(body["manifest_sha256"]), mac if isinstance(mac, str) else None


def _digest(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON. A lone surrogate (a byte of a non-UTF-8 database's
    comment or definition, see :func:`backup_tool.postgres.schema.schema_text`) is written
    as its JSON escape, which reads back as the same string; any other text is UTF-8 as
    before, so digests of existing manifests are unchanged."""
    canonical = json.dumps({k: v for k, v in body.items() if k not in ("manifest_sha256", SEAL_FIELD)},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "backslashreplace")).hexdigest()


def _obj(data: dict[str, Any] | None) -> StoredObject | None:
    return StoredObject(**data) if data else None


def _physical(data: dict[str, Any] | None) -> PhysicalInfo | None:
    if not data:
        return None
    return PhysicalInfo(**{**data, "stop_time": parse_utc(data["stop_time"]),
                           "databases": tuple(data.get("databases", ()))})


_NONE = type(None)
_SHAPES: dict[type, dict[str, tuple[type, ...]]] = {
    StoredObject: {"key": (str,), "size": (int,), "sha256": (str,), "raw_size": (int,), "compression": (str,)},
    TableEntry: {"schema": (str,), "name": (str,), "relkind": (str,), "parent": (str, _NONE), "columns": (tuple,),
                 "rows": (int,), "checksum": (str,), "object": (StoredObject, _NONE), "parts": (tuple,)},
    Manifest: {"id": (str,), "kind": (str,), "parent_id": (str, _NONE), "database": (str,),
               "server_version": (str,), "server_version_num": (int,), "encoding": (str,),
               "system_identifier": (str,), "policy": (dict,), "snapshot_lsn": (str, _NONE),
               "schema": (StoredObject, _NONE), "globals": (StoredObject, _NONE), "schema_fingerprint": (str,),
               "sequences": (tuple,), "inventory": (dict,), "options": (dict,), "tool_version": (str,),
               "large_objects": (StoredObject, _NONE), "client_tools": (dict,)},
}


def _check_shape(obj: Any) -> None:
    for name, types in _SHAPES[type(obj)].items():
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, types):
            raise TypeError(f"{type(obj).__name__}.{name} is a {type(value).__name__}")


def _checked(manifest: Manifest) -> Manifest:
    """The manifest, once every field has the type the rest of the tool relies on."""
    if manifest.kind not in KINDS:
        raise ValueError(f"kind {manifest.kind!r}")
    for obj in [manifest, *manifest.objects(), *manifest.tables]:
        _check_shape(obj)
    if not all(isinstance(c, str) for t in manifest.tables for c in t.columns):
        raise TypeError("a column name is not a string")
    if any(t.parts and (t.object is not None or len(t.parts) < 2) for t in manifest.tables):
        raise ValueError("a split table has an object besides its parts, or fewer than two parts")
    if any(t.parts for t in manifest.tables) and manifest.format < SPLIT_TABLE_FORMAT:
        raise ValueError(f"a table is split into parts in a format {manifest.format} manifest")
    if manifest.format < CHECKSUM_METHOD_FORMATS[manifest.checksum_method]:
        raise ValueError(f"checksum method {manifest.checksum_method} in a format {manifest.format} manifest")
    if not all(isinstance(s, dict) for s in manifest.sequences):
        raise TypeError("a sequence is not an object")
    return manifest


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and authenticate a manifest; raise a clear error for damage or a newer format."""
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"manifest {where} is not valid JSON",
                             "the repository is damaged; run 'backup-tool verify all'") from None
    fmt = body.get("format")
    if not isinstance(fmt, int):
        raise IntegrityError(f"manifest {where} has no format version")
    if fmt > FORMAT_VERSION:
        raise BackupToolError(
            f"manifest {where} was written by a newer backup-tool (format {fmt}, this one reads {FORMAT_VERSION})",
            "upgrade backup-tool to read this repository")
    if body.get("manifest_sha256") != _digest(body):
        raise IntegrityError(f"manifest {where} fails its checksum (damaged or edited)",
                             "run 'backup-tool verify all' and use another backup")
    try:
        tables = tuple(
            TableEntry(**{**t, "columns": tuple(t["columns"]), "object": _obj(t["object"]),
                          "parts": tuple(StoredObject(**p) for p in t.get("parts", ()))})
            for t in body["tables"])
        return _checked(Manifest(
            id=body["id"], kind=body["kind"], parent_id=body["parent_id"],
            database=body["database"], server_version=body["server_version"],
            server_version_num=body["server_version_num"], encoding=body["encoding"],
            system_identifier=body["system_identifier"],
            started_at=parse_utc(body["started_at"]), finished_at=parse_utc(body["finished_at"]),
            expires_at=parse_utc(body["expires_at"]), policy=cast(ManifestPolicy, body["policy"]),
            snapshot_lsn=body["snapshot_lsn"], schema=_obj(body["schema"]),
            globals=_obj(body["globals"]), schema_fingerprint=body["schema_fingerprint"],
            tables=tables, sequences=tuple(body["sequences"]), inventory=cast(ManifestInventory, body["inventory"]),
            options=cast(ManifestOptions, body.get("options", {})),
            extra_objects=tuple(StoredObject(**o) for o in body.get("extra_objects", [])),
            tool_version=body.get("tool_version", ""), format=fmt,
            physical=_physical(body.get("physical")),
            large_objects=_obj(body.get("large_objects")),
            client_tools=dict(body.get("client_tools", {})),
            wal_basis=wal_basis_from(body.get("wal_basis")),
            checksum_method=ChecksumMethod(body.get("checksum_method", LEGACY_CHECKSUM_METHOD)),
        ))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise IntegrityError(f"manifest {where} is malformed ({exc})",
                             "the repository is damaged; run 'backup-tool verify all'") from None

