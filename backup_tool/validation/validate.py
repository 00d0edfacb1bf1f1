"""Integrity validation: the seed's health checks, as named checks with a verdict each.

Run at the end of every restore and on demand against any live database. Without a
manifest, the checks that need no reference run (foreign keys hold, indexes valid, RLS on
where policies exist, sequences not behind their columns). Against a backup's manifest,
the database is also compared with what was backed up: schema fingerprint, RLS flags and
policies, foreign keys, indexes, functions, triggers, extensions (with versions),
the backup's roles (``roles_created_match``: those a restore created
must equal the backup's; pre-existing ones are never altered, so their differences are
listed, not failed), publications, event triggers, comments, object, column and default privileges (ACLs as
sets, see :mod:`backup_tool.postgres.inventory`), per-table row counts and order-independent content
checksums, every table's column order (names and types in attnum order, which pg_dump's
text does not show), and sequences not behind the backed-up values. A manifest that predates one of
these inventories skips its check (the detail says so) rather than failing it.

Against a manifest, states the backup's source itself was in are not failures: an index
invalid in the backup may stay invalid, a NOT VALID foreign key's orphans are not counted
(they are backed-up rows, compared by checksum), and a sequence behind its column at exactly
the backed-up value passes.

Sequences are checked for "not behind", never "equal": after WAL replay PostgreSQL
legitimately leaves them up to 32 values ahead (they are WAL-logged in batches).
"""

from __future__ import annotations

import concurrent.futures as cf
import difflib
import secrets
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, cast

import psycopg
from psycopg import sql

from backup_tool.core.checks import Check
from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.core.report import NullReporter, Reporter, Task, Unit
from backup_tool.postgres import (
    column_order,
    database_level,
    deparse,
    extension_config,
    inventory,
    large_objects,
    matviews,
    restore_marker,
    roles,
    schema,
)
from backup_tool.postgres import connection as postgres
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.manifest import Manifest, ManifestInventory, Rows, SequenceRecord
from backup_tool.repository.storage import Storage
from backup_tool.streams import pipeline
from backup_tool.validation import majors

SHOWN = 5


@dataclass(frozen=True)
class ValidationReport:
    target: str
    against: str | None
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "target": self.target, "against": self.against,
                "checks": [c.to_dict() for c in self.checks]}


def _names(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


Change = Callable[[str, dict[str, Any], dict[str, Any]], str]


def compare_sets(name: str, what: str, expected: list[dict[str, Any]], actual: list[dict[str, Any]],
                 key: Callable[[dict[str, Any]], str], change: Change | None = None,
                 matched: str | None = None) -> Check:
    """Compare two inventories item by item: missing, unexpected and changed entries. Items
    whose deparsed SQL differs only where pg_dump cannot keep it (:mod:`backup_tool.postgres.deparse`)
    match, and the detail counts them.

    ``change`` words a changed entry from its key, the backup's item and the database's;
    ``matched`` the detail when all match (default: how many).
    """
    exp = {key(i): i for i in expected}
    act = {key(i): i for i in actual}
    missing = exp.keys() - act.keys()
    extra = act.keys() - exp.keys()
    differing = [k for k in exp.keys() & act.keys() if exp[k] != act[k]]
    folded = [k for k in differing if deparse.same_when_folded(exp[k], act[k])]
    changed = {(change(k, exp[k], act[k]) if change else k) for k in differing if k not in folded}
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if extra:
        problems.append(f"unexpected {_names(extra)}")
    if changed:
        problems.append(f"changed {_names(changed)}")
    if problems:
        return Check(name, False, f"{what}: " + "; ".join(problems))
    return Check(name, True, (matched or f"{len(exp)} {what} match")
                 + (f" ({len(folded)} up to {deparse.tolerated((exp[k], act[k]) for k in folded)})"
                    if folded else ""))


def _qual(item: dict[str, Any]) -> str:
    return f"{item['schema']}.{item['table']}.{item['name']}"


def _by_name(item: dict[str, Any]) -> str:
    return postgres.quote_ident(item["name"])


def _by_object(item: dict[str, Any]) -> str:
    return str(item["object"])


def _function(item: dict[str, Any]) -> str:
    return f"{item['schema']}.{item['name']}({item['arguments']})"


def _version_change(key: str, backup: dict[str, Any], live: dict[str, Any]) -> str:
    return f"{key} (backup {backup.get('version')}, database {live.get('version')})"


def _acl_change(key: str, backup: dict[str, Any], live: dict[str, Any]) -> str:
    """Which (grantee, grantor, privilege, grantable) entries of an ACL set differ."""
    def words(entries: set[tuple[Any, ...]]) -> str:
        return ", ".join(f"{g} {p} by {by}" + (" with grant option" if opt else "")
                         for g, by, p, opt in sorted(entries)[:3])
    was = {tuple(e) for e in backup["acl"]}
    now = {tuple(e) for e in live["acl"]}
    parts = ([f"lost {words(was - now)}"] if was - now else []) + (
        [f"gained {words(now - was)}"] if now - was else [])
    return f"{key} ({'; '.join(parts)})"


def _changed_fields(key: str, backup: dict[str, Any], live: dict[str, Any]) -> str:
    fields = sorted(k for k in backup.keys() | live.keys() if backup.get(k) != live.get(k))
    return f"{key} ({', '.join(fields)})"


@dataclass(frozen=True)
class InventoryCheck:
    """A check comparing one manifest inventory key with the same inventory of the database.

    ``identity`` names an item stably (never an oid); ``change`` words a changed item. A
    manifest without ``key`` (written before the check existed) makes the check pass,
    saying that the backup did not record it.
    """
    key: str
    name: str
    what: str
    identity: Callable[[dict[str, Any]], str]
    change: Change | None = None

    def run(self, expected: Mapping[str, object], live: dict[str, Any]) -> Check:
        if self.key not in expected:
            return Check(self.name, True, f"{self.what} not recorded by this backup (made before this check)")
        return compare_sets(self.name, self.what, cast(Rows, expected[self.key]), live[self.key], self.identity,
                            self.change)


INVENTORY_CHECKS = (
    InventoryCheck("functions", "functions_present", "functions", _function),
    InventoryCheck("triggers", "triggers_present", "triggers", _qual),
    InventoryCheck("extensions", "extensions_present", "extensions", lambda e: str(e["name"]),
                   _version_change),
    InventoryCheck("publications", "publications", "publications", _by_name, _changed_fields),
    InventoryCheck("event_triggers", "event_triggers", "event triggers", _by_name, _changed_fields),
    InventoryCheck("column_privileges", "column_privileges", "column privileges", _by_object, _acl_change),
    InventoryCheck("default_privileges", "default_privileges", "default privileges", _by_object, _acl_change),
    InventoryCheck("object_privileges", "object_privileges", "object privileges", _by_object, _acl_change),
    InventoryCheck("comments", "comments", "comments", _by_object),
)


def check_schema(conninfo: ConnInfo, major: int, manifest: Manifest, storage: Storage | None) -> Check:
    """Compares the normalized schema text (privileges in canonical order, see
    :func:`schema.normalize`). A manifest written before that normalisation holds the
    fingerprint of the older one: it matches either, or the archive's text re-normalized.
    Into a newer major, the comparison is with the archive as that major renders it
    (``schema_rendered_by_target``, see :mod:`backup_tool.validation.majors`). Text that differs
    only where pg_dump cannot keep it (:mod:`backup_tool.postgres.deparse`) matches, saying so."""
    raw = schema.schema_text(schema.dump_schema(conninfo, major), major)
    live = schema.normalize(raw)
    if manifest.schema_fingerprint in (schema.fingerprint(live), schema.fingerprint(schema.normalize_v1(raw))):
        return Check("schema_matches", True, f"schema fingerprint {manifest.schema_fingerprint[:12]} matches")
    detail = "schema fingerprint differs from the backup's"
    if storage is not None and manifest.schema is not None:
        obj = manifest.schema
        archive = b"".join(pipeline.read_stored(storage, obj.key, obj.sha256, obj.size))
        upgrade = majors.is_upgrade(manifest.server_major, major)
        if upgrade:
            expected = rendered_schema(conninfo, major, archive, manifest.encoding)
        else:
            expected = schema.normalize(schema.schema_text(archive, major))
        if expected == live:
            return Check("schema_matches", True,
                         f"schema matches the backup's archive as PostgreSQL {major} renders it" if upgrade
                         else "schema matches the backup's archive (privileges compared as sets)")
        if deparse.folded(expected) == deparse.folded(live):
            return Check("schema_matches", True,
                         f"schema matches the backup's archive up to {deparse.tolerated([(expected, live)])}")
        diff = schema_diff(deparse.folded(expected), deparse.folded(live))
        detail += f" ({len(diff)} lines): " + " | ".join(diff[:4])
    return Check("schema_matches", False, detail)


def schema_diff(expected: str, live: str, shown: int = 4) -> list[str]:
    """The lines of schema text that differ, ``-`` the backup's and ``+`` the database's; the
    first ``shown`` are worded (secret options masked, cut at 120 characters) and the others
    left as they are. A line inside a statement (a column or constraint of ``CREATE TABLE``,
    indented) is prefixed with that statement's first line: ``lifecycle_stage ... DEFAULT 'x'``
    alone does not say which of the tables with such a column changed."""
    a, b = expected.splitlines(), live.splitlines()
    changed = [(sign, lines, i)
               for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes() if tag != "equal"
               for sign, lines, i in [*(("-", a, i) for i in range(i1, i2)), *(("+", b, j) for j in range(j1, j2))]]
    return [_worded(sign, lines, i) if n < shown else sign + lines[i] for n, (sign, lines, i) in enumerate(changed)]


def _worded(sign: str, lines: list[str], i: int) -> str:
    line = schema.mask_secret_options(sign + lines[i])[:120]
    if not lines[i][:1].isspace():
        return line
    head = next((ln for ln in reversed(lines[:i]) if ln.strip() and not ln[:1].isspace()), None)
    return line if head is None else f"{schema.mask_secret_options(head.rstrip(' (')[:120])}: {line}"


def check_major_upgrade(backup_major: int, major: int, tolerated: tuple[majors.Tolerance, ...],
                        whole_schema: bool) -> Check:
    """Says, by name, what validation tolerates because the backup comes from an older major."""
    names = (["schema_rendered_by_target"] if whole_schema else []) + [t.describe() for t in tolerated]
    return Check("major_upgrade", True, f"backup of PostgreSQL {backup_major} restored into {major}; "
                                        f"tolerated by name: {', '.join(names) or 'nothing'}")


def rendered_schema(conninfo: ConnInfo, major: int, archive: bytes, encoding: str) -> str:
    """The schema archive replayed into a scratch database on ``conninfo``'s server and
    dumped back, normalized: the backup's schema as that server's major writes it. The
    scratch database is dropped whatever happens."""
    name = f"backup_tool_render_{secrets.token_hex(4)}"
    admin = conninfo.with_database("postgres")
    with admin.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {}").format(
            sql.Identifier(name), sql.Literal(encoding)))
    try:
        scratch = conninfo.with_database(name)
        with tempfile.TemporaryDirectory(prefix="backup-tool-") as tmp:
            path = Path(tmp) / "schema.pgdump"
            path.write_bytes(archive)
            schema.replay_into_scratch(path, scratch, major)
        return schema.normalize(schema.schema_text(schema.dump_schema(scratch, major), major))
    finally:
        with admin.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def check_roles(conninfo: ConnInfo, major: int, manifest: Manifest, storage: Storage | None,
                created: frozenset[str] | None) -> Check:
    """The backup's roles on this server (see :func:`backup_tool.postgres.roles.verdict`)."""
    name = "roles_created_match"
    if manifest.globals is None:
        return Check(name, True, "roles not recorded by this backup")
    if storage is None:
        return Check(name, True, "roles not compared: the backup's roles are not readable here")
    obj = manifest.globals
    backup = roles.parse_globals(b"".join(pipeline.read_stored(storage, obj.key, obj.sha256, obj.size)).decode())
    found = roles.verdict(backup, roles.server_roles(conninfo, major), manifest.inventory.get("roles", []), created)
    return Check(name, found.ok, found.detail)


def check_restore_finished(conn: psycopg.Connection[Any]) -> Check:
    """Fails while the database carries the marker of an interrupted ``restore full``."""
    marker = restore_marker.read(conn)
    if marker is None:
        return Check("restore_finished", True, "no unfinished restore")
    return Check("restore_finished", False,
                 f"an interrupted restore left this database unfinished "
                 f"({restore_marker.backup_id_of(marker)}, schema {restore_marker.MARKER_SCHEMA}): "
                 f"run 'backup-tool restore full {restore_marker.RESTART_FLAG}' into it")


def _fk_scope(conn: psycopg.Connection[Any], schema_name: str, table: str,
              name: sql.Composed) -> sql.Composed:
    """The rows a foreign key covers on one side: the table alone (``ONLY``: a key never
    covers inheritance children), but a partitioned table whole (its rows are in its partitions)."""
    row = conn.execute("SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                       " WHERE n.nspname = %s AND c.relname = %s", (schema_name, table)).fetchone()
    return name if row is not None and row[0] == "p" else sql.SQL("ONLY {}").format(name)


def check_column_order(conn: psycopg.Connection[Any], manifest: Manifest) -> Check:
    """Every recorded table's columns (names and types, attnum order) equal the backup's."""
    ok, detail = column_order.check_column_order(conn, manifest)
    return Check(column_order.CHECK_NAME, ok, detail)


def orphan_count_query(conn: psycopg.Connection[Any], fk: dict[str, Any],
                       sample_percent: float | None = None) -> sql.Composed:
    """``SELECT count(*)`` of the referencing rows of ``fk`` (an inventory entry) with no
    referenced row, honouring its MATCH rule; with ``sample_percent``, over a
    ``TABLESAMPLE SYSTEM`` sample of the referencing table only (every referenced row is
    still looked up)."""
    child = postgres.qualified(fk["schema"], fk["table"])
    parent = postgres.qualified(fk["ref_schema"], fk["ref_table"])
    cols = [sql.Identifier(c) for c in fk["columns"]]
    refs = [sql.Identifier(c) for c in fk["ref_columns"]]
    join = sql.SQL(" AND ").join(sql.SQL("p.{} = c.{}").format(r, c) for r, c in zip(refs, cols, strict=True))
    nulls = sql.SQL(" AND ").join(sql.SQL("c.{} IS NULL").format(c) for c in cols)
    if fk["match"] == "f":
        exempt = sql.SQL("({})").format(nulls)
    else:
        exempt = sql.SQL("({})").format(sql.SQL(" OR ").join(
            sql.SQL("c.{} IS NULL").format(c) for c in cols))
    sample = (sql.SQL(" TABLESAMPLE SYSTEM ({})").format(sql.Literal(sample_percent))
              if sample_percent is not None else sql.SQL(""))
    return sql.SQL("SELECT count(*) FROM {} c{} WHERE NOT {} AND NOT EXISTS "
                   "(SELECT 1 FROM {} p WHERE {})").format(
        _fk_scope(conn, fk["schema"], fk["table"], child), sample, exempt,
        _fk_scope(conn, fk["ref_schema"], fk["ref_table"], parent), join)


def check_foreign_keys(conn: psycopg.Connection[Any], fks: list[dict[str, Any]],
                       not_valid_in_backup: frozenset[str] = frozenset(),
                       checked_on_creation: bool = False) -> Check:
    """Count orphan rows for every foreign key, validated or NOT VALID, honouring MATCH rules.

    Keys in ``not_valid_in_backup`` (NOT VALID in the backup's source) are not counted: their
    orphans, if any, are part of the backed-up data, proven equal by the content checksums.

    ``checked_on_creation``: every key was created after all the rows were in, and no row was
    written since with triggers off (``restore full`` from a backup's archive: the keys are
    its last post-data step). A key PostgreSQL then marks validated was checked by the server
    over every row as it was created (the same anti-join, under the same MATCH rule and the
    same ``ONLY`` semantics), so it is not counted a second time (on the benchmark's
    pgbench_accounts at scale 20, a foreign key to pgbench_branches: 0.55-0.65 s of server
    CPU per count); a key left NOT VALID is counted as ever.

    Only the rows the key covers are counted: ``ONLY`` on both sides unless the table is
    partitioned, so a row of an inheritance child is neither an orphan nor a referenced row.
    """
    orphans: dict[str, int] = {}
    by_server = 0
    for fk in fks:
        if _qual(fk) in not_valid_in_backup:
            continue
        if checked_on_creation and fk.get("validated") is True:
            by_server += 1
            continue
        query = orphan_count_query(conn, fk)
        row = conn.execute(query).fetchone()
        if row and row[0]:
            orphans[_qual(fk)] = int(row[0])
    if orphans:
        return Check("foreign_keys_hold", False, "orphan rows: " + _names(
            f"{k} ({v})" for k, v in orphans.items()))
    skipped = sum(1 for fk in fks if _qual(fk) in not_valid_in_backup)
    notes = ([f"{by_server} validated by PostgreSQL as this restore created them, after the data"] if by_server
             else []) + ([f"{skipped} NOT VALID in the backup not counted: their rows are the backup's, "
                          "compared by content checksums"] if skipped else [])
    note = f" ({'; '.join(notes)})" if notes else ""
    return Check("foreign_keys_hold", True, f"{len(fks) - skipped} foreign keys hold, no orphan rows{note}")


def check_indexes(live: list[dict[str, Any]], expected: list[dict[str, Any]] | None,
                  physical_copy: bool = False) -> Check:
    """Every index valid and ready; with the backup's inventory, an index that was already
    invalid (or not ready) in the backup's source may stay so, and the indexes must match.
    In a ``physical_copy`` the flags are the source's own catalog rows, so invalid ones are
    listed, not failed."""
    was_invalid = {_qual(i) for i in expected or [] if not (i["valid"] and i["ready"])}
    invalid = [_qual(i) for i in live if not (i["valid"] and i["ready"])]
    if physical_copy and expected is None:
        note = f"; invalid as in the source (recovered from its WAL): {_names(invalid)}" if invalid else ""
        return Check("indexes_valid", True, f"{len(live) - len(invalid)} indexes valid{note}")
    new_invalid = [q for q in invalid if q not in was_invalid]
    if new_invalid:
        return Check("indexes_valid", False, f"invalid indexes: {_names(new_invalid)}"
                     + (" (valid in the backup)" if expected is not None else ""))
    if expected is None:
        return Check("indexes_valid", True, f"{len(live)} indexes valid")
    strip = [{k: v for k, v in i.items() if k in ("schema", "table", "name", "definition")}
             for i in expected]
    have = [{k: v for k, v in i.items() if k in ("schema", "table", "name", "definition")}
            for i in live]
    note = f"; invalid as in the backup: {_names(invalid)}" if invalid else ""
    return compare_sets("indexes_valid", "indexes", strip, have, _qual,
                        matched=f"{len(live)} indexes present and valid{note}")


def check_rls_without_manifest(inv: dict[str, Any]) -> Check:
    enabled = {f"{r['schema']}.{r['table']}" for r in inv["rls"] if r["enabled"]}
    with_policies = {f"{p['schema']}.{p['table']}" for p in inv["policies"]}
    off = with_policies - enabled
    if off:
        return Check("rls_policies", False, f"tables with policies but RLS disabled: {_names(off)}")
    return Check("rls_policies", True,
                 f"RLS enabled on {len(enabled)} tables, {len(inv['policies'])} policies")


def _next_value(seq: SequenceRecord) -> int:
    """The value ``nextval`` hands out next: ``setval(s, v, false)`` still owes ``v`` itself, so a
    sequence at the backed-up value but no longer called is one step behind it."""
    return seq["last_value"] + seq.get("increment", 1) if seq["is_called"] else seq["last_value"]


def _state(seq: SequenceRecord) -> str:
    return str(seq["last_value"]) if seq["is_called"] else f"{seq['last_value']} (not yet called)"


def check_sequences(conn: psycopg.Connection[Any], live: list[SequenceRecord],
                    expected: Iterable[SequenceRecord] | None, physical_copy: bool = False) -> Check:
    """No sequence behind its column, nor behind the backup's value. With the backup's values, a
    sequence behind its column at exactly the backed-up value was so in the source (the content
    checksums prove the column equal) and passes. In a ``physical_copy`` WAL replay leaves a
    logged sequence at or ahead of the source's value, so one behind its column was so in the
    source and passes; an unlogged one was reset by recovery and still fails. A CYCLE
    sequence is not compared with its column: once it has wrapped, its column holds values
    of earlier laps beyond it, as it should (against a backup it must still not be behind
    the backed-up value)."""
    recorded = {(s["schema"], s["name"]): s for s in expected or []}
    cycling = {(r[0], r[1]) for r in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE s.seqcycle")}
    not_compared: list[str] = []
    unlogged = {(r[0], r[1]) for r in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'S' AND c.relpersistence = 'u'")} if physical_copy else set()
    behind: list[str] = []
    as_in_backup: list[str] = []
    for seq in live:
        owner = seq["owned_by"]
        if not owner:
            continue
        if (seq["schema"], seq["name"]) in cycling:
            not_compared.append(f"{seq['schema']}.{seq['name']}")
            continue
        value, called, step = seq["last_value"], seq["is_called"], seq["increment"]
        row = conn.execute(sql.SQL("SELECT {}({}) FROM {}").format(
            sql.SQL("max" if step > 0 else "min"), sql.Identifier(owner["column"]),
            postgres.qualified(owner["schema"], owner["table"]))).fetchone()
        top = row[0] if row else None
        if top is None:
            continue
        was = recorded.get((seq["schema"], seq["name"]))
        if was is not None and (was["last_value"], was["is_called"]) == (value, called):
            if (step > 0 and (value < top or (value == top and not called))) or (
                    step < 0 and (value > top or (value == top and not called))):
                as_in_backup.append(f"{seq['schema']}.{seq['name']}")
            continue
        name = f"{seq['schema']}.{seq['name']}"
        if (step > 0 and (value < top or (value == top and not called))) or (
                step < 0 and (value > top or (value == top and not called))):
            if physical_copy and (seq["schema"], seq["name"]) not in unlogged:
                as_in_backup.append(name)
            else:
                behind.append(f"{name} at {value}, column {'max' if step > 0 else 'min'} {top}")
    if expected is not None:
        now = {(s["schema"], s["name"]): s for s in live}
        for seq in expected:
            cur = now.get((seq["schema"], seq["name"]))
            if cur is None:
                behind.append(f"{seq['schema']}.{seq['name']} missing")
            elif (_next_value(cur) - _next_value(seq)) * seq.get("increment", 1) < 0:
                behind.append(f"{seq['schema']}.{seq['name']} at {_state(cur)}, backup had {_state(seq)}")
    if behind:
        return Check("sequences_not_behind", False, "behind: " + _names(behind))
    source = "the source (recovered from its WAL)" if physical_copy else "the backup"
    note = f"; behind their column as in {source}: {_names(as_in_backup)}" if as_in_backup else ""
    if not_compared:
        note += f"; cycling, not compared with their column: {_names(not_compared)}"
    return Check("sequences_not_behind", True, f"{len(live)} sequences not behind their columns{note}")


def check_database_contents(conn: psycopg.Connection[Any], expected: ManifestInventory) -> list[Check]:
    """Database-level properties, materialized views and large objects, each compared with
    the backup's record when the backup has one (older backups did not record them)."""
    checks = [Check(name, True, f"{what} not recorded by this backup (made before this check)")
              for key, name, what in (("database", "database_properties", "database properties"),
                                      ("matviews", "materialized_views", "materialized views"),
                                      ("large_objects", "large_objects", "large objects"),
                                      ("extension_config", "extension_config",
                                       "extension configuration tables"))
              if key not in expected]
    if "database" in expected:
        diff = database_level.differences(expected["database"], database_level.properties(conn))
        checks.append(Check("database_properties", False, "; ".join(diff[:SHOWN])
                            + (f" and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""))
                      if diff else Check("database_properties", True,
                                         "owner, encoding, locale, comment, grants and settings match"))
    if "matviews" in expected:
        checks.append(compare_sets("materialized_views", "materialized views (populated state and content)",
                                   expected["matviews"], matviews.inventory(conn),
                                   lambda m: f"{m['schema']}.{m['name']}", _changed_fields))
    if "large_objects" in expected:
        want, have = expected["large_objects"], large_objects.summary(conn)
        if want == have:
            checks.append(Check("large_objects", True, f"{have['count']} large objects match"))
        elif want["count"] != have["count"]:
            checks.append(Check("large_objects", False, f"{have['count']} large objects, backup {want['count']}"))
        else:
            checks.append(Check("large_objects", False,
                                f"content, owner, ACL or comment of the {have['count']} large objects differs"))
    if "extension_config" in expected:
        checks.append(compare_sets("extension_config",
                                   "extension configuration tables and sequences (the rows pg_dump dumps of them)",
                                   expected["extension_config"],
                                   extension_config.inventory(conn, like=expected["extension_config"]),
                                   lambda c: f"{c['schema']}.{c['name']} ({c['extension']})", _changed_fields))
    return checks


TableKey = tuple[str, str]
VALIDATION_STEPS = 3
"""The validation phase's steps besides one per table read: catalog comparisons, the
foreign-key scan, and the index/inventory/sequence checks."""


def table_checksums(conninfo: ConnInfo, targets: dict[TableKey, tuple[str, str, tuple[str, ...]]],
                    jobs: int, reporter: Reporter, method: ChecksumMethod,
                    progress: Task | None = None) -> dict[TableKey, tuple[int, str] | None]:
    """Live row count and content checksum per table key, read at (schema, name) over columns
    by ``method`` (the backup's, so the two compare).

    None when the table (or its schema) is missing; a row count of -1 when a backed-up column is
    missing.
    Tables are taken largest first by whichever session is free, so one big table does not
    leave the other sessions idle. ``progress`` (advanced by one per table, not finished
    here) is a caller's phase; without it a phase of its own is shown, unless there is
    nothing to read.
    """
    results: dict[TableKey, tuple[int, str] | None] = {}
    own = progress is None and bool(targets)
    progress = (reporter.task("checksumming tables", total=len(targets), unit=Unit.ITEMS) if own
                else progress or NullReporter().task(""))
    queue = list(targets)
    lock = threading.Lock()

    def next_key() -> TableKey | None:
        with lock:
            return queue.pop(0) if queue else None

    def worker() -> None:
        with conninfo.connect() as conn:
            while (key := next_key()) is not None:
                schema_name, name, columns = targets[key]
                try:
                    results[key] = postgres.table_checksum(conn, schema_name, name, columns, method)
                except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
                    results[key] = None
                except psycopg.errors.UndefinedColumn:
                    results[key] = (-1, "")
                progress.advance(1)

    jobs = max(1, min(jobs, len(queue)))
    with cf.ThreadPoolExecutor(jobs) as pool:
        for fut in [pool.submit(worker) for _ in range(jobs if queue else 0)]:
            fut.result()
    if own:
        progress.finish()
    return results


def check_tables(manifest: Manifest, live: dict[tuple[str, str], tuple[int, str] | None]) -> list[Check]:
    missing, counts, sums = [], [], []
    tables = [t for t in manifest.tables if t.relkind == "r" and (t.schema, t.name) in live]
    for t in tables:
        got = live[(t.schema, t.name)]
        if got is None:
            missing.append(t.full_name)
        elif got[0] < 0:
            counts.append(f"{t.full_name} lacks backed-up columns")
        elif got[0] != t.rows:
            counts.append(f"{t.full_name} has {got[0]} rows, backup {t.rows}")
        elif got[1] != t.checksum:
            sums.append(t.full_name)
    rows = sum(t.rows for t in tables)
    count_check = (Check("row_counts", False, "; ".join(
        ([f"missing tables: {_names(missing)}"] if missing else []) + ([_names(counts)] if counts else [])))
        if missing or counts else Check("row_counts", True, f"{len(tables)} tables, {rows} rows match"))
    sum_check = (Check("content_checksums", False, f"content differs: {_names(sums)}")
                 if sums or missing or counts else
                 Check("content_checksums", True, f"{len(tables)} table checksums match"))
    if not sums and (missing or counts):
        sum_check = Check("content_checksums", False, "not comparable where row counts differ")
    return [count_check, sum_check]


def validate(conninfo: ConnInfo, manifest: Manifest | None = None, storage: Storage | None = None,
             jobs: int = 2, reporter: Reporter | None = None,
             tables: set[tuple[str, str]] | None = None,
             checksums: dict[TableKey, tuple[int, str]] | None = None,
             created_roles: frozenset[str] | None = None, physical_copy: bool = False,
             keys_created_after_data: bool = False) -> ValidationReport:
    """Run the health checks against the database; compare with ``manifest`` when given.

    ``tables`` restricts the per-table checks to those tables (after a selective restore);
    the whole-database schema comparison is then skipped. ``checksums``: row counts and
    content checksums already read from this database (a restore takes each table's in the
    session that loaded it, once its COPY committed, while other tables still load); only
    the other tables are scanned. ``created_roles``: roles the restore created, which must
    match the backup exactly (other backed-up roles' differences are only listed).
    ``physical_copy``: the database was recovered from a base backup and WAL (``restore pitr``),
    so its index flags and logged sequences are the source's own, listed rather than failed.
    ``keys_created_after_data``: the foreign keys were created after every row was loaded
    (see :func:`check_foreign_keys`' ``checked_on_creation``).

    The schema and roles comparisons (a pg_dump and a pg_dumpall each, and the backup's
    archives read) run beside the catalog checks, on their own sessions; the report keeps
    the checks' order.
    """
    reporter = reporter or NullReporter()
    if manifest is not None:
        conninfo = conninfo.as_written(manifest.options)
    checks: list[Check | cf.Future[Check]] = []
    wanted = {(t.schema, t.name): (t.schema, t.name, t.columns)
              for t in sorted(manifest.tables, key=lambda t: -t.raw_size)
              if t.relkind == "r" and (tables is None or (t.schema, t.name) in tables)} if manifest else {}
    known = {k: v for k, v in (checksums or {}).items() if k in wanted}
    to_read = {k: v for k, v in wanted.items() if k not in known}
    progress = reporter.task("validation", total=VALIDATION_STEPS + len(to_read), unit=Unit.ITEMS)
    with conninfo.connect() as conn, cf.ThreadPoolExecutor(2, thread_name_prefix="validate") as beside:
        info = postgres.server_info(conn)
        major = info["server_version_num"] // 10000
        whole = manifest if tables is None else None
        schema_check = beside.submit(check_schema, conninfo, major, whole, storage) if whole else None
        roles_check = beside.submit(check_roles, conninfo, major, whole, storage, created_roles) \
            if whole else None
        inv = inventory.inventory(conn, manifest.options.get("inventory_read_with") if manifest
                                  else inventory.READ_WITH)
        seqs = postgres.sequences(conn)
        checks.append(check_restore_finished(conn))
        if manifest is not None and schema_check is not None:
            checks.append(schema_check)
            checks.append(check_column_order(conn, manifest))
        if manifest is not None:
            exp = manifest.inventory
            checks.append(compare_sets("rls_policies", "RLS flags and policies",
                                       [{**r, "name": "rls"} for r in exp["rls"]] + exp["policies"],
                                       [{**r, "name": "rls"} for r in inv["rls"]] + inv["policies"], _qual))
            checks.append(compare_sets("foreign_keys_match", "foreign keys", exp["foreign_keys"],
                                       inv["foreign_keys"], _qual))
        else:
            checks.append(check_rls_without_manifest(inv))
        progress.advance(1)
        not_valid = frozenset(_qual(fk) for fk in manifest.inventory["foreign_keys"]
                              if fk.get("validated") is False) if manifest else frozenset()
        checks.append(check_foreign_keys(conn, inv["foreign_keys"], not_valid, keys_created_after_data))
        progress.advance(1)
        checks.append(check_indexes(inv["indexes"], manifest.inventory["indexes"] if manifest else None,
                                    physical_copy))
        if manifest is not None:
            expected_inv, tolerated = majors.expected_inventory(manifest.inventory, manifest.server_major, major)
            if majors.is_upgrade(manifest.server_major, major):
                checks.append(check_major_upgrade(manifest.server_major, major, tolerated, tables is None))
            checks.extend(c.run(expected_inv, inv) for c in INVENTORY_CHECKS)
            if roles_check is not None:
                checks.append(roles_check)
        checks.append(check_sequences(conn, seqs, manifest.sequences if manifest else None, physical_copy))
        if manifest is not None and tables is None:
            checks.extend(check_database_contents(conn, manifest.inventory))
        progress.advance(1)
    if manifest is not None:
        live = {**table_checksums(conninfo, to_read, jobs, reporter, manifest.checksum_method, progress),
                **known}
        checks.extend(check_tables(manifest, live))
    progress.finish()
    done = [c.result() if isinstance(c, cf.Future) else c for c in checks]
    if tables is not None:
        done = [c for c in done if c.name in ("row_counts", "content_checksums", "foreign_keys_hold",
                                              "indexes_valid", "sequences_not_behind")]
    return ValidationReport(conninfo.redacted(), manifest.id if manifest else None, tuple(done))
