"""Every table's exact column order: recorded at backup time, kept by restore, checked by validation.

PostgreSQL puts a table's inherited columns first when it is created with ``INHERITS``, and
pg_dump (like pg_restore) recreates every inheritance child that way. A child whose columns
came in another order (created stand-alone and then ``ALTER TABLE ... INHERIT``, or whose
parent gained columns after it was created) would come back reordered: ``SELECT *`` and
``COPY`` without a column list would change behaviour, and the order is invisible in
pg_dump's text, so the schema fingerprint cannot see it.

Contract:

- a backup records, in ``inventory["column_order"]``, every ordinary and partitioned table
  with all its columns (generated ones included) in attnum order: name, type, and whether
  the column is local; plus its inheritance parents in ``inhseqno`` order (not for
  partitions, which pg_dump creates stand-alone and attaches, so they keep their order);
- :func:`restore_pre_data` replays the archive's pre-data exactly as one pg_restore would,
  except that each child pg_restore would reorder is created by this module: its own
  ``CREATE TABLE`` from the archive, with the inherited columns written in at their
  backed-up positions and ``INHERITS`` replaced by ``ALTER TABLE ... INHERIT``; the
  columns and CHECK constraints it only inherits are then marked non-local, as pg_dump's
  --binary-upgrade mode does (a catalog update that needs superuser; without it the
  restore warns, and validation reports the difference);
- :func:`check_column_order` fails, naming the tables, when a live table's columns (names
  and types in attnum order) differ from the recorded ones. A backup without the record
  is not checked and not reordered.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import psycopg

from backup_tool.core.report import Reporter
from backup_tool.postgres import schema
from backup_tool.postgres.connection import SYSTEM_SCHEMA_FILTER, ConnInfo, find_tool, quote_ident, quoted_table
from backup_tool.repository.manifest import Manifest
from backup_tool.streams import pipeline

INVENTORY_KEY = "column_order"
CHECK_NAME = "column_order"
SHOWN = 5


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    local: bool


@dataclass(frozen=True)
class TableLayout:
    schema: str
    table: str
    oid: int
    columns: tuple[Column, ...]
    parents: tuple[tuple[str, str], ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.schema, self.table)

    @property
    def full_name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "table": self.table, "oid": self.oid,
                "columns": [{"name": c.name, "type": c.type, "local": c.local} for c in self.columns],
                "parents": [list(p) for p in self.parents]}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "TableLayout":
        return TableLayout(str(data["schema"]), str(data["table"]), int(data["oid"]),
                           tuple(Column(str(c["name"]), str(c["type"]), bool(c["local"]))
                                 for c in data["columns"]),
                           tuple((str(p[0]), str(p[1])) for p in data.get("parents", [])))


LAYOUT_SQL = f"""
    SELECT c.oid, n.nspname, c.relname,
           ARRAY(SELECT json_build_object('name', a.attname,
                                          'type', pg_catalog.format_type(a.atttypid, a.atttypmod),
                                          'local', a.attislocal)
                   FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum),
           ARRAY(SELECT json_build_array(pn.nspname, pc.relname)
                   FROM pg_catalog.pg_inherits i
                   JOIN pg_catalog.pg_class pc ON pc.oid = i.inhparent
                   JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
                  WHERE i.inhrelid = c.oid AND NOT c.relispartition
                  ORDER BY i.inhseqno)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMA_FILTER}
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::regclass
                         AND d.objid = c.oid AND d.deptype = 'e')
     ORDER BY 2, 3"""


def layouts(conn: psycopg.Connection[Any]) -> list[TableLayout]:
    """Every table's columns and inheritance parents, types spelled as under search_path pg_catalog.

    The type names do not depend on the session's search_path (which is restored
    afterwards), so a backup and a validation compare like with like.
    """
    row = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()
    assert row is not None
    conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', false)")
    try:
        rows = conn.execute(LAYOUT_SQL).fetchall()
    finally:
        conn.execute("SELECT pg_catalog.set_config('search_path', %s, false)", (row[0],))
    return [TableLayout(r[1], r[2], int(r[0]),
                        tuple(Column(c["name"], c["type"], bool(c["local"])) for c in r[3]),
                        tuple((p[0], p[1]) for p in r[4])) for r in rows]


def record(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """The manifest form of :func:`layouts` (the value of ``inventory["column_order"]``)."""
    return [t.to_dict() for t in layouts(conn)]


def recorded(manifest: Manifest) -> list[TableLayout] | None:
    """The layouts a backup recorded, or None for a backup taken before they were."""
    data = manifest.inventory.get(INVENTORY_KEY)
    if not isinstance(data, list):
        return None
    return [TableLayout.from_dict(t) for t in data]


# ----------------------------------------------------------------------------- decisions


def predicted_order(table: TableLayout, by_key: dict[tuple[str, str], TableLayout]) -> tuple[str, ...] | None:
    """The column order ``CREATE TABLE ... INHERITS`` gives ``table`` when its parents have
    their recorded order: the parents' columns (merged, in parent order), then its other
    local columns. None when a parent is not recorded (nothing to predict from)."""
    order: list[str] = []
    for parent_key in table.parents:
        parent = by_key.get(parent_key)
        if parent is None:
            return None
        order.extend(n for n in parent.names if n not in order)
    order.extend(c.name for c in table.columns if c.local and c.name not in order)
    return tuple(order)


def misordered(tables: Sequence[TableLayout]) -> list[TableLayout]:
    """The inheritance children pg_restore would create with another column order."""
    by_key = {t.key: t for t in tables}
    found = []
    for t in tables:
        if not t.parents:
            continue
        predicted = predicted_order(t, by_key)
        if predicted is not None and predicted != t.names:
            found.append(t)
    return found


@dataclass(frozen=True)
class Replay:
    """TOC lines (``pg_restore -l`` form) pg_restore replays as they are."""

    lines: tuple[str, ...]


@dataclass(frozen=True)
class Recreate:
    """One TABLE entry this module creates with the recorded column order, with the comments,
    privileges and security labels on it and its columns (pg_restore skips those when it
    does not create their table itself)."""

    lines: tuple[str, ...]
    table: TableLayout


ATTACHED = ("COMMENT", "ACL", "SECURITY LABEL")


def _attached_to(rest: str, tables: Sequence[TableLayout]) -> TableLayout | None:
    """The table a COMMENT, ACL or SECURITY LABEL TOC entry (the part after the ids) is on."""
    for kind in ATTACHED:
        if not rest.startswith(kind + " "):
            continue
        for t in tables:
            tags = [f"TABLE {t.table}"] + [f"COLUMN {t.table}.{c.name}" for c in t.columns]
            if any(rest.startswith(f"{kind} {t.schema} {tag} ") for tag in tags):
                return t
    return None


TOC_LINE = re.compile(r"^\d+; (\d+) (\d+) (.*)$")


def plan(toc: Iterable[str], tables: Sequence[TableLayout]) -> list[Replay | Recreate]:
    """The archive's TOC in its own order, cut at the TABLE entries of ``tables``."""
    by_oid = {t.oid: t for t in tables}
    entries = [(line, m) for line in toc if (m := TOC_LINE.match(line)) is not None]
    attached: dict[tuple[str, str], list[str]] = {}
    for line, m in entries:
        owner = _attached_to(m.group(3), tables)
        if owner is not None:
            attached.setdefault(owner.key, []).append(line)
    taken = {line for lines in attached.values() for line in lines}
    steps: list[Replay | Recreate] = []
    pending: list[str] = []
    for line, m in entries:
        if line in taken:
            continue
        table = by_oid.get(int(m.group(2))) if m.group(1) == "1259" and m.group(3).startswith("TABLE ") else None
        if table is None:
            pending.append(line)
            continue
        if pending:
            steps.append(Replay(tuple(pending)))
            pending = []
        steps.append(Recreate((line, *attached.get(table.key, [])), table))
    if pending:
        steps.append(Replay(tuple(pending)))
    return steps


class Unrecognized(Exception):
    """The archive's CREATE TABLE is not in the form pg_dump writes for an inheritance child."""


@dataclass(frozen=True)
class ParentColumn:
    """An inherited column's definition, read from the parent in the target database."""

    name: str
    type: str
    collation: str | None
    not_null: bool
    generated: str | None

    def definition(self) -> str:
        text = f"{quote_ident(self.name)} {self.type}"
        if self.collation:
            text += f" COLLATE {self.collation}"
        if self.generated:
            text += f" GENERATED ALWAYS AS ({self.generated}) STORED"
        if self.not_null:
            text += " NOT NULL"
        return text


@dataclass(frozen=True)
class Standalone:
    """The rewritten TABLE entry and what must be marked non-local once it ran."""

    script: str
    inherited_columns: tuple[str, ...]
    inherited_constraints: tuple[str, ...]


def _scan(text: str, start: int, stop_at: str) -> int:
    """Index of the first ``stop_at`` character at nesting depth 0 outside quotes, from ``start``."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch in "'\"":
            end = text.find(ch, i + 1)
            while end != -1 and text[end + 1:end + 2] == ch:
                end = text.find(ch, end + 2)
            if end == -1:
                raise Unrecognized("unterminated quote")
            i = end + 1
            continue
        if depth == 0 and ch in stop_at:
            return i
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        i += 1
    raise Unrecognized(f"no {stop_at!r} found")


def _split_elements(body: str) -> list[str]:
    parts = []
    start = 0
    while True:
        try:
            end = _scan(body, start, ",")
        except Unrecognized:
            parts.append(body[start:].strip())
            return [p for p in parts if p]
        parts.append(body[start:end].strip())
        start = end + 1


def _leading_name(element: str) -> str:
    if element.startswith('"'):
        end = _scan(element, 0, " ") if " " in element else len(element)
        return element[1:end - 1].replace('""', '"')
    return element.split(" ", 1)[0]


CREATE_START = re.compile(r"^CREATE (UNLOGGED )?TABLE ", re.MULTILINE)
PREAMBLE_META = re.compile(r"^\\(un)?restrict .*$", re.MULTILINE)


def standalone(entry_sql: str, table: TableLayout, parent_columns: Sequence[ParentColumn],
               parent_checks: Sequence[tuple[str, str]]) -> Standalone:
    """Rewrite pg_dump's ``CREATE TABLE child (...) INHERITS (...)`` entry into a stand-alone
    CREATE TABLE with every column at its recorded position, followed by one
    ``ALTER TABLE ONLY ... INHERIT`` per parent; the rest of the entry is kept as it is.

    ``parent_columns``: the parents' columns (first parent first), ``parent_checks``: their
    inheritable CHECK constraints as (name, definition), both as the target now has them.
    Raises :class:`Unrecognized` when the entry is not in the expected form.
    """
    text = PREAMBLE_META.sub("", entry_sql)
    m = CREATE_START.search(text)
    if m is None:
        raise Unrecognized("no CREATE TABLE")
    open_paren = _scan(text, m.end(), "(")
    if text[m.end():open_paren].strip() == "" or " OF " in text[m.end():open_paren]:
        raise Unrecognized("unexpected table header")
    close_paren = _scan(text, open_paren + 1, ")")
    statement_end = _scan(text, close_paren + 1, ";")
    tail = text[close_paren + 1:statement_end]
    if not tail.startswith("\nINHERITS ("):
        raise Unrecognized("no INHERITS clause")
    inherits_open = close_paren + 1 + len("\nINHERITS ")
    inherits_close = _scan(text, inherits_open + 1, ")")
    after_inherits = text[inherits_close + 1:statement_end]

    columns: dict[str, str] = {}
    constraints: list[str] = []
    for element in _split_elements(text[open_paren + 1:close_paren]):
        if element.startswith("CONSTRAINT "):
            constraints.append(element)
        else:
            columns[_leading_name(element)] = element
    local_names = {c.name for c in table.columns if c.local}
    if set(columns) != local_names:
        raise Unrecognized("the archive's local columns differ from the recorded ones")
    by_name: dict[str, ParentColumn] = {}
    for pc in parent_columns:
        by_name.setdefault(pc.name, pc)
    elements = []
    inherited_only = []
    for col in table.columns:
        parent = by_name.get(col.name)
        if col.name in columns:
            element = columns[col.name]
            if parent is not None and parent.generated and " GENERATED ALWAYS AS " not in element:
                element += f" GENERATED ALWAYS AS ({parent.generated}) STORED"
            if parent is not None and parent.not_null:
                element += " NOT NULL"
            elements.append(element)
        elif parent is not None:
            elements.append(parent.definition())
            inherited_only.append(col.name)
        else:
            raise Unrecognized(f"column {col.name} is neither local nor in a parent")
    local_constraints = {_leading_name(c[len("CONSTRAINT "):]) for c in constraints}
    added = []
    for name, definition in parent_checks:
        if name not in local_constraints and name not in added:
            constraints.append(f"CONSTRAINT {quote_ident(name)} {definition}")
            added.append(name)
    child = quoted_table(table.schema, table.table)
    create = (text[m.start():open_paren] + "(\n    " + ",\n    ".join(elements + constraints) + "\n)"
              + after_inherits + ";\n")
    inherit = "".join(f"ALTER TABLE ONLY {child} INHERIT {quoted_table(*p)};\n" for p in table.parents)
    script = text[:m.start()] + create + inherit + text[statement_end + 1:]
    return Standalone(script, tuple(inherited_only), tuple(added))


def differences(expected: Sequence[TableLayout], live: Sequence[TableLayout]) -> list[str]:
    """The recorded tables whose live columns (names and types, attnum order) differ."""
    now = {t.key: t for t in live}
    found = []
    for t in expected:
        got = now.get(t.key)
        if got is None:
            found.append(f"{t.full_name} missing")
            continue
        want = [(c.name, c.type) for c in t.columns]
        have = [(c.name, c.type) for c in got.columns]
        if want != have:
            found.append(f"{t.full_name} ({', '.join(f'{n} {ty}' for n, ty in have)}; "
                         f"backup: {', '.join(f'{n} {ty}' for n, ty in want)})")
    return found


# ----------------------------------------------------------------------------- restore


PARENT_COLUMNS_SQL = """
    SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
           CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0
                THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END,
           a.attnotnull,
           CASE WHEN a.attgenerated <> '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END
      FROM pg_catalog.pg_attribute a
      JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
      LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
      LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = %s::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped
     ORDER BY a.attnum"""

PARENT_CHECKS_SQL = """
    SELECT conname, pg_catalog.pg_get_constraintdef(oid) FROM pg_catalog.pg_constraint
     WHERE conrelid = %s::pg_catalog.regclass AND contype = 'c' AND NOT connoinherit
     ORDER BY conname"""


def _toc(archive_path: Path, major: int) -> list[str]:
    argv = [find_tool("pg_restore", major), "-l", str(archive_path)]
    return pipeline.run(argv, dict(os.environ), "pg_restore (list)").decode().splitlines()


def _entry_sql(archive_path: Path, major: int, lines: Sequence[str], tmp: Path) -> str:
    listing = tmp / "entry.list"
    listing.write_text("".join(ln + "\n" for ln in lines))
    argv = [find_tool("pg_restore", major), "-L", str(listing), "--file=-", str(archive_path)]
    return pipeline.run(argv, dict(os.environ), "pg_restore (table definition)").decode()


def _replay(archive_path: Path, target: ConnInfo, major: int, lines: Sequence[str]) -> None:
    schema.restore_section(archive_path, target, major, "pre-data", listing=lines, lock_bounded=True)


def _recreate(conn: psycopg.Connection[Any], table: TableLayout, entry_sql: str) -> bool:
    """Create ``table`` from its rewritten entry in one transaction; True if it is complete
    (its inherited-only columns and constraints marked non-local), False if that needs a
    superuser. Raises :class:`Unrecognized` before anything is created, or psycopg's error
    after the transaction rolled back."""
    conn.execute("SELECT pg_catalog.set_config('search_path', '', false)")
    parent_columns: list[ParentColumn] = []
    parent_checks: list[tuple[str, str]] = []
    for parent in table.parents:
        name = quoted_table(*parent)
        parent_columns += [ParentColumn(*r) for r in conn.execute(PARENT_COLUMNS_SQL, (name,)).fetchall()]
        parent_checks += [(r[0], r[1]) for r in conn.execute(PARENT_CHECKS_SQL, (name,)).fetchall()]
    rewritten = standalone(entry_sql, table, parent_columns, parent_checks)
    child = quoted_table(table.schema, table.table)
    with conn.transaction():
        conn.execute(rewritten.script.encode())
        try:
            with conn.transaction():
                conn.execute("UPDATE pg_catalog.pg_attribute SET attislocal = false"
                             " WHERE attrelid = %s::pg_catalog.regclass AND attname = ANY(%s)",
                             (child, list(rewritten.inherited_columns)))
                conn.execute("UPDATE pg_catalog.pg_constraint SET conislocal = false"
                             " WHERE conrelid = %s::pg_catalog.regclass AND conname = ANY(%s)",
                             (child, list(rewritten.inherited_constraints)))
        except psycopg.errors.InsufficientPrivilege:
            return not rewritten.inherited_columns and not rewritten.inherited_constraints
    return True


def restore_pre_data(archive_path: Path, target: ConnInfo, major: int, manifest: Manifest,
                     reporter: Reporter, replay: Callable[[Sequence[str] | None], None] | None = None) -> None:
    """Replay the archive's pre-data section into ``target``, keeping every recorded column order.

    With nothing to reorder (or no record) this is one pg_restore in one transaction, as
    before. Otherwise the TOC is replayed in its own order in several pg_restore runs, and
    each child that would be reordered is created in between by :func:`_recreate`.
    """
    def plain(lines: Sequence[str] | None) -> None:
        if lines is None:
            schema.restore_section(archive_path, target, major, "pre-data", lock_bounded=True)
        else:
            _replay(archive_path, target, major, lines)

    replay = replay or plain
    tables = recorded(manifest)
    wrong = misordered(tables) if tables else []
    if not wrong:
        replay(None)
        return
    with tempfile.TemporaryDirectory(prefix="backup-tool-order-") as tmp_name:
        tmp = Path(tmp_name)
        steps = plan(_toc(archive_path, major), wrong)
        with target.connect() as conn:
            for step in steps:
                if isinstance(step, Replay):
                    replay(step.lines)
                    continue
                entry = _entry_sql(archive_path, major, step.lines, tmp)
                try:
                    complete = _recreate(conn, step.table, entry)
                except (Unrecognized, psycopg.Error) as exc:
                    why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    reporter.warning(f"could not keep the column order of {step.table.full_name} ({why}); "
                                     "it is created as pg_restore does and validation will report it",
                                     table=step.table.full_name)
                    replay(step.lines)
                    continue
                if not complete:
                    reporter.warning(f"{step.table.full_name} keeps its column order, but marking its inherited "
                                     "columns as not local needs a superuser; validation will report the "
                                     "difference", table=step.table.full_name)
    reporter.event("column order kept", tables=[t.full_name for t in wrong])


# ----------------------------------------------------------------------------- validation


def check_column_order(conn: psycopg.Connection[Any], manifest: Manifest) -> tuple[bool, str]:
    """(ok, detail) of the ``column_order`` check against the backup's record."""
    expected = recorded(manifest)
    if expected is None:
        return True, "column order not recorded by this backup"
    found = differences(expected, layouts(conn))
    if found:
        shown = "; ".join(found[:SHOWN]) + (f" and {len(found) - SHOWN} more" if len(found) > SHOWN else "")
        return False, f"column order differs: {shown}"
    return True, f"{len(expected)} tables have the backed-up column order"
