"""Restoring a backup's data into a schema rebuilt from migrations
(``restore full --schema-from-migrations DIR``).

For when a backup's schema cannot be used (or should not be: the team wants the schema its
migrations define), the migrations are replayed into the target in place of pg_restore's
pre-data, and the backup's table data is loaded into the tables they create.

What is guaranteed:

- Nothing is written to the target unless the rebuilt schema can hold the backup's data.
  First the migrations are replayed into a scratch database and the backup's schema archive
  is restored into another; then every backed-up table must exist in the replay with every
  backed-up column, of the same type; no column the backup lacks may be NOT NULL without a
  default; every backed-up sequence must exist. Otherwise the restore is refused, naming
  the tables and what each lacks. Both scratch databases are dropped in every case.
- A schema archive that cannot be used (damaged, missing, or refused by pg_restore) does not
  stop the rebuild — that is what the rebuild is for: a warning says so, and the check falls
  back to the manifest's tables, columns and sequences (column types cannot be compared).
- Differences that do not stop the data from loading (an extra index, another policy, a
  changed function) are announced as a warning before loading, and then reported by the
  restore's validation (``schema_matches`` and the inventory checks), so a restore that
  succeeds but drifts from the backup ends with exit 3 and says where.
- The replayed schema already has its indexes, constraints, triggers and policies, so the
  archive's post-data is not replayed. Tables are loaded with ``session_replication_role =
  replica``: user triggers (which would rewrite or add rows) and foreign-key triggers (which
  would reject rows loaded in parallel, in any order) do not fire; the ``REPLICA`` and
  ``ALWAYS`` triggers, which that role does not silence, are disabled for the load and set
  back to their states after it (:mod:`backup_tool.postgres.triggers`). That setting needs a
  superuser, or a role granted ``SET`` on it; the restore refuses up front otherwise.
  Foreign keys are then checked for orphan rows: by validation's ``foreign_keys_hold``, or
  here when validation is off.
- The replay into the target records no bookkeeping schema: the restored database holds
  only the application's schema; the result lists the files applied instead.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psycopg

from backup_tool.core.report import Reporter
from backup_tool.errors import (
    BackupToolError,
    NotFoundError,
    RefusedError,
    ValidationFailed,
)
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import schema, triggers
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.manifest import Manifest
from backup_tool.repository.storage import Storage
from backup_tool.schema import drift, migrations
from backup_tool.streams import pipeline
from backup_tool.validation.validate import check_foreign_keys

TableKey = tuple[str, str]
SHOWN = 6
SIDES = {"added": "only in the backup", "missing": "only in the migrations", "changed": "changed"}


@dataclass(frozen=True)
class Column:
    type: str
    required: bool


@dataclass(frozen=True)
class Shape:
    """What data loading depends on: tables with their columns, and sequences (unquoted names)."""

    tables: dict[TableKey, dict[str, Column]]
    sequences: frozenset[TableKey]


@dataclass(frozen=True)
class RebuiltSchema:
    replay: migrations.ReplayResult
    loader: ConnInfo
    archive_usable: bool
    differences: tuple[drift.Drift, ...]
    quieted: triggers.Quieted

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.replay.folder, "files": [a.file for a in self.replay.applied],
                "skipped": list(self.replay.skipped), "backup_schema_usable": self.archive_usable,
                "differences_from_backup": len(self.differences) if self.archive_usable else None,
                "drift": [d.to_dict() for d in self.differences[:20]]}


def read_shape(conn: psycopg.Connection[Any]) -> Shape:
    rows = conn.execute(f"""
        SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull AND d.adbin IS NULL AND a.attidentity = '' AND a.attgenerated = ''
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
           AND {postgres.SYSTEM_SCHEMA_FILTER}""").fetchall()
    tables: dict[TableKey, dict[str, Column]] = {}
    for schema_name, table, column, typ, required in rows:
        tables.setdefault((schema_name, table), {})[column] = Column(typ, bool(required))
    seqs = conn.execute(f"""
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'S' AND {postgres.SYSTEM_SCHEMA_FILTER}""").fetchall()
    return Shape(tables, frozenset((s, n) for s, n in seqs))


def display(*parts: str) -> str:
    """A qualified name quoted only where needed, as PostgreSQL prints it."""
    return ".".join(p if re.fullmatch(r"[a-z_][a-z0-9_$]*", p) else postgres.quote_ident(p) for p in parts)


def manifest_shape(manifest: Manifest) -> Shape:
    """What the manifest alone says about the backed-up tables: names, columns, no types."""
    return Shape({(t.schema, t.name): {} for t in manifest.tables},
                 frozenset((s["schema"], s["name"]) for s in manifest.sequences))


def incompatibilities(manifest: Manifest, backup: Shape, built: Shape) -> list[str]:
    """Why the rebuilt schema cannot take the backup's rows, one entry per table or sequence."""
    problems: list[str] = []
    for entry in manifest.tables:
        if not entry.stored:
            continue
        key = (entry.schema, entry.name)
        name = display(*key)
        have = built.tables.get(key)
        if have is None:
            problems.append(f"{name} is missing")
            continue
        reasons = []
        lacking = [c for c in entry.columns if c not in have]
        if lacking:
            reasons.append("lacks column " + ", ".join(lacking))
        was = backup.tables.get(key, {})
        for column in entry.columns:
            if column in have and column in was and have[column].type != was[column].type:
                reasons.append(f"{column} is {have[column].type} (backup: {was[column].type})")
        for column, info in have.items():
            if info.required and column not in entry.columns:
                reasons.append(f"{column} is NOT NULL without a default and the backup has no values for it")
        if reasons:
            problems.append(f"{name} {'; '.join(reasons)}")
    for seq in manifest.sequences:
        if (seq["schema"], seq["name"]) not in built.sequences:
            problems.append(f"sequence {display(seq['schema'], seq['name'])} is missing")
    return problems


def replica_loader(target: ConnInfo) -> ConnInfo:
    """``target`` with ``session_replication_role = replica`` for every session it opens."""
    loader = copy.copy(target)
    loader.params = dict(target.params)
    options = "-c session_replication_role=replica"
    loader.params["options"] = f"{loader.params['options']} {options}" if loader.params.get("options") else options
    return loader


def require_replica_role(target: ConnInfo) -> None:
    with target.connect() as conn:
        try:
            conn.execute("SET session_replication_role = replica")
        except psycopg.errors.InsufficientPrivilege:
            raise RefusedError(f"loading into a schema rebuilt from migrations needs a superuser on "
                               f"{target.redacted()} (session_replication_role = replica keeps triggers and "
                               "foreign keys quiet while tables load in parallel)",
                               "connect as a superuser, or GRANT SET ON PARAMETER session_replication_role "
                               "to this role") from None


def backup_side(storage: Storage, manifest: Manifest, archive_path: Path, server: ConnInfo, major: int,
                reporter: Reporter, on_chunk: Callable[[int], None] | None) -> tuple[Shape, drift.Model | None]:
    """The backup's tables and catalog, from its schema archive, or from the manifest if that is unusable."""
    try:
        if manifest.schema is None:
            raise NotFoundError(f"backup {manifest.id} has no schema archive")
        obj = manifest.schema
        archive_path.write_bytes(b"".join(pipeline.read_stored(storage, obj.key, obj.sha256, obj.size, on_chunk)))
        with drift.scratch_database(server, manifest.encoding, "schema") as scratch:
            schema.replay_into_scratch(archive_path, scratch, major)
            with scratch.connect() as conn:
                return read_shape(conn), drift.read_model(conn)
    except pipeline.Cancelled:
        raise
    except BackupToolError as exc:
        reporter.warning(f"the backup's schema archive is unusable ({exc.message}); checking the migrations "
                         "against the manifest's tables, columns and sequences only (not column types)")
        return manifest_shape(manifest), None


def rebuild_schema(folder: str | Path, target: ConnInfo, storage: Storage, manifest: Manifest,
                   archive_path: Path, major: int, reporter: Reporter,
                   on_chunk: Callable[[int], None] | None = None) -> RebuiltSchema:
    """Check the migrations can hold the backup's data, then replay them into the empty target."""
    found = migrations.discover(folder)
    require_replica_role(target)
    reporter.event("checking the migrations against the backup's schema", folder=str(found.folder),
                   files=len(found.migrations))
    backup_shape, backup_model = backup_side(storage, manifest, archive_path, target, major, reporter, on_chunk)
    with drift.scratch_database(target, manifest.encoding, "replay") as scratch:
        try:
            migrations.replay(scratch, found, record=False, reporter=reporter)
        except migrations.MigrationError as exc:
            raise exc.with_hint("fix the file; nothing was written to the target") from None
        with scratch.connect() as conn:
            built_shape = read_shape(conn)
            built_model = drift.read_model(conn)
    problems = incompatibilities(manifest, backup_shape, built_shape)
    if problems:
        more = f" and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise RefusedError(f"the schema built by the migrations in {found.folder} cannot hold the data of backup "
                           f"{manifest.id}: {'; '.join(problems[:SHOWN])}{more}",
                           "fix the migrations, or restore with the backup's own schema (without "
                           "--schema-from-migrations); nothing was written to the target")
    differences = tuple(drift.compare(built_model, backup_model)) if backup_model is not None else ()
    if differences:
        reporter.warning(f"the migrations differ from the backup's schema in {len(differences)} object(s); "
                         "validation will report them", objects=[f"{d.kind} {d.name} ({SIDES[d.change]})"
                                                                 for d in differences[:SHOWN]])
    started = time.monotonic()
    result = migrations.replay(target, found, record=False, reporter=reporter)
    reporter.event("schema rebuilt from migrations", files=len(result.applied),
                   seconds=round(time.monotonic() - started, 2))
    with target.connect() as conn:
        quieted = triggers.quiet_firing_triggers(conn)
    return RebuiltSchema(result, replica_loader(target), backup_model is not None, differences, quieted)


def finish(target: ConnInfo, validating: bool, rebuilt: RebuiltSchema) -> None:
    """After the load: the REPLICA and ALWAYS triggers the migrations made (disabled for the
    load: the replication role does not silence them) get their states back; then, unless
    validation will, prove the foreign keys hold (triggers were off). A restore interrupted
    before this replays the migrations again when restarted, states and all."""
    with target.connect() as conn, conn.transaction():
        triggers.wake_triggers(conn, rebuilt.quieted)
    if validating:
        return
    with target.connect() as conn:
        check = check_foreign_keys(conn, postgres.foreign_keys(conn))
    if not check.ok:
        raise ValidationFailed(f"data loaded into the schema rebuilt from migrations, but {check.detail}")
