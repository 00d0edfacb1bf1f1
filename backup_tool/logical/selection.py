"""Which tables and repository objects a selective restore reads, decided without
PostgreSQL: names as operators write them, the manifest entries they select, and the reads
:func:`read_ahead` makes in a process of its own while the command starts (see
:mod:`backup_tool.repository.storage.ahead`).

Nothing here imports psycopg: the reading process starts before the command has loaded it.
"""

from __future__ import annotations

import concurrent.futures as cf
import difflib
from typing import Callable

from backup_tool.errors import NotFoundError, RefusedError, UsageError
from backup_tool.repository.catalog import Catalog, DatabaseHint
from backup_tool.repository.manifest import Manifest, StoredObject, TableEntry
from backup_tool.repository.storage import Storage

TableKey = tuple[str, str]

AHEAD_DATA_BYTES = 64 * 2**20
"""At most this many stored bytes of table data are read ahead (a larger first object is
left to the restore's own early read, which streams it)."""


def split_names(text: str) -> list[str]:
    """``a.b, "x,y".z`` → ['a.b', '"x,y".z']: commas inside double quotes belong to the name,
    and only whitespace outside quotes is trimmed."""
    names: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            names.append("".join(current))
            current = []
        else:
            current.append(ch)
    names.append("".join(current))
    return [n.strip() for n in names if n.strip()]


def split_name(text: str) -> tuple[str | None, str]:
    """``schema.table`` → (schema, table); double quotes protect dots and are removed."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            if quoted and i + 1 < len(text) and text[i + 1] == '"':
                current.append('"')
                i += 1
            else:
                quoted = not quoted
        elif ch == "." and not quoted and not parts:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    if quoted or any(not p for p in parts):
        raise UsageError(f"cannot read table name {text!r}", 'write SCHEMA.TABLE, quoting parts like "Mixed Case"')
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def _typed_part(part: str) -> str:
    if part and part == part.strip() and not any(c in part for c in '.,"'):
        return part
    return '"' + part.replace('"', '""') + '"'


def as_typed(schema: str, name: str) -> str:
    """``schema.name`` as ``--tables`` reads it back (see :func:`split_name`): a part holding a
    dot, comma or double quote, or spaces at its ends, in double quotes. Pure."""
    return f"{_typed_part(schema)}.{_typed_part(name)}"


def resolve_tables(manifest: Manifest, names: list[str]) -> list[TableEntry]:
    """The manifest entries the names select, partitions of selected tables included."""
    known = {(t.schema, t.name): t for t in manifest.tables}
    chosen: list[TableKey] = []
    for raw in names:
        schema_name, name = split_name(raw.strip())
        matches = [k for k in known if k[1] == name and (schema_name is None or k[0] == schema_name)]
        if not matches:
            matches = [k for k in known if k[1].lower() == name.lower()
                       and (schema_name is None or k[0].lower() == schema_name.lower())]
        if not matches:
            _refuse_configuration_table(manifest, raw.strip(), schema_name, name)
        if len(matches) != 1:
            everything = [as_typed(s, n) for s, n in known]
            close = difflib.get_close_matches(raw.strip(), everything, n=3, cutoff=0.5)
            if matches:
                raise UsageError(f"table name {raw.strip()} is ambiguous: "
                                 f"{', '.join(as_typed(s, n) for s, n in matches)}",
                                 "qualify it with its schema")
            raise NotFoundError(f"table {raw.strip()} is not in backup {manifest.id}",
                                f"closest: {', '.join(close)}" if close else "see 'backup-tool show ID' for its tables")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    grew = True
    while grew:
        parents = {f"{s}.{n}" for s, n in chosen}
        extra = [k for k, t in known.items() if t.parent in parents and k not in chosen]
        chosen += extra
        grew = bool(extra)
    return [known[k] for k in chosen]


def _refuse_configuration_table(manifest: Manifest, raw: str, schema_name: str | None, name: str) -> None:
    """An extension's configuration table (pgagent's ``pga_job``) is not among the backup's
    tables, yet its rows are in the backup: say so rather than that the table is not there."""
    for item in manifest.inventory.get("extension_config") or []:
        if (item.get("kind") == "table" and item["name"] == name
                and schema_name in (None, item["schema"])):
            raise NotFoundError(
                f"table {raw} is a configuration table of extension {item['extension']}: backup "
                f"{manifest.id} holds its rows ({item.get('rows', 0)}), which only 'restore full' restores, "
                "with the extension", "restore the backup in full into another database and copy the rows over")


def check_into_schema(manifest: Manifest, entries: list[TableEntry]) -> None:
    """Refuse ``--into-schema`` for a partition named without its partitioned table: its
    definition is ``PARTITION OF`` the live parent, so the copy would join the live table
    (its rows visible there) or collide with the live partition."""
    chosen = {f"{t.schema}.{t.name}" for t in entries}
    alone = [t for t in entries if t.parent is not None and t.parent not in chosen]
    if alone:
        first = alone[0]
        parent = next((as_typed(t.schema, t.name) for t in manifest.tables
                       if f"{t.schema}.{t.name}" == first.parent), first.parent)
        raise RefusedError(f"--into-schema cannot take partition {as_typed(first.schema, first.name)} without its "
                           f"partitioned table {parent}: the copy would be attached to the live table",
                           f"name {parent} to restore its whole tree into the new schema, or restore the "
                           "partition in place (without --into-schema) when it is absent or empty")


def ahead_objects(manifest: Manifest, entries: list[TableEntry], tables: int, with_roles: bool,
                  budget: int = AHEAD_DATA_BYTES) -> list[StoredObject]:
    """The objects a restore of ``entries`` reads first, in the order it needs them: the
    schema archive (the definitions of absent tables), the roles when it may create them,
    then the first object of each of the first ``tables`` tables with rows (the loads that
    start at once), as long as their stored sizes fit in ``budget``. Pure."""
    wanted = [o for o in (manifest.schema, manifest.globals if with_roles else None) if o is not None]
    used = 0
    for obj in [t.stored[0] for t in entries if t.stored][:max(0, tables)]:
        if used + obj.size > budget:
            break
        used += obj.size
        wanted.append(obj)
    return wanted


def read_ahead(storage: Storage, names: list[str], backup_ref: str | None, database: DatabaseHint, tables: int,
               with_roles: bool, plan: Callable[[list[str]], None]) -> None:
    """Make the reads a restore of ``names`` from ``backup_ref`` starts with: the catalog and
    the manifests it resolves ``latest`` or an id with, then :func:`ahead_objects` (``plan``
    hears their keys first): the definitions (schema archive, roles) at once, then the tables'
    data at once. The restore waits for the definitions first, and a small object downloaded
    beside a large one took 10-30 ms longer; the data is needed only once the tables exist.
    Errors propagate: the restore makes the same reads and reports them itself."""
    manifest = Catalog(storage).resolve_logical(backup_ref, database)
    entries = resolve_tables(manifest, names)
    objects = ahead_objects(manifest, entries, tables, with_roles)
    plan([o.key for o in objects])
    data = {t.stored[0].key for t in entries if t.stored}

    def drain(key: str) -> None:
        for _ in storage.get_stored(key):
            pass

    if objects:
        with cf.ThreadPoolExecutor(len(objects)) as pool:
            for stage in ([o for o in objects if o.key not in data], [o for o in objects if o.key in data]):
                for done in [pool.submit(drain, o.key) for o in stage]:
                    done.result()
