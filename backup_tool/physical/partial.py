"""Partial lay-out for table point-in-time recovery: the cost follows the table.

``restore tables --target-time`` recovers a scratch cluster only to copy a few tables out
of it. With a framed base backup (:mod:`backup_tool.physical.basetar`, whose index also
records every database's relations at backup time) it lays out in full only:

* every file that is not a user relation's: the control file, configuration, pg_xact and
  the other SLRUs, ``pg_filenode.map``, ``PG_VERSION``, all of ``global/`` and every system
  catalog (relation oid < 16384, wherever a VACUUM FULL moved its file), every file the
  backup-time map does not name, every ``_init`` fork and every sequence;
* the target tables with their inheritance children and partitions, their TOAST tables and
  every index of those (so the copy can use any plan it likes, hash indexes included);

and writes every other user relation file as a sparse file of its recorded size (reads as
zeros, costs nothing). The other databases (all but the tables' own: ``postgres``, the
other user databases, the templates, any database the backup-time map does not name) get
their directories but no relation file, catalogs included: the scratch cluster never
connects to them (its own connections go to the tables' database), and replay creates the
files it writes into, as it does for a relation dropped later in the WAL (redo of a record
for a block the file lacks and that carries no full-page image is skipped as an invalid
page, see below; one with an image extends the file up to that block). Only the frames of the stored tar that hold a needed file are read and decompressed.

For a table request (``choose(lean=True)``) no free space map or visibility map fork is
written (``Choice.maps_left_out``): both are hints, and an absent one reads as empty (no
free space known, no page known all-visible: PostgreSQL then extends a relation and checks
each tuple on the heap, never the other way round); replay creates one when it changes it,
extending it page by page, which costs little for forks a few pages long. Each of those
files is an inode fewer to allocate, and ext4 without a journal passes over every inode
freed in the last seconds of the directory's block group when it allocates one: on the
benchmark's machine, whose ``/tmp`` sees other runs' clusters come and go, a file creation
there cost about 0.5 CPU-ms and up to 2 ms, and the benchmark's table request writes 196 of
its 783 files no more. Unneeded relations stay sparse files of their recorded size rather
than left out: replay extends an absent file one zeroed buffer at a time up to the block a
full-page image goes to, which for a busy large table beside the target would cost more
than all the rest.

Why that is exact. Redo is per block: replaying a record onto block B of relation R reads
only the record and B's previous contents, never another relation's pages (a record that
touches several blocks redoes each on its own). So the pages of every fully laid-out
relation evolve exactly as in a full lay-out, whatever happens to the sparse ones. With
``full_page_writes`` on (the default, and forced on during the backup itself) the first
change to a page after the backup's checkpoint carries a full-page image, so replay on a
sparse relation mostly overwrites zeros with correct pages. *Mostly*: some records carry
no image by design, notably VACUUM's all-visible mark on a page it did not otherwise change
(``XLOG_HEAP2_VISIBLE`` without data checksums or ``wal_log_hints``), hash index
housekeeping, and every change when ``full_page_writes`` is off. Redo of such a record on a
zeroed page finds an "uninitialized" page and PostgreSQL stops ("WAL contains references to
invalid pages"), which the tests reproduce. The scratch cluster therefore runs with
``ignore_invalid_pages = on``, which skips just that block's redo, and the server log is
then checked (:func:`unexplained_invalid_pages`): every skipped block must belong to a
relation this lay-out left sparse; one in a fully laid-out file (where a full lay-out would
stop too) fails the restore with IntegrityError. Sparse relations are never read: the
scratch cluster runs without autovacuum and the copy reads only the targets and catalogs.

What the backup-time map cannot know is checked against the recovered catalog before the
copy (:func:`missed_files`): a target rewritten (TRUNCATE, ALTER TABLE ... TYPE, VACUUM
FULL, CLUSTER) or created after the backup lives in a new file that replay builds from WAL
alone (such operations log every page), which the lay-out never wrote, so that is fine;
but a target whose file *is* in the backup and was left sparse (the table was renamed
after the backup, or its name was ambiguous) or a database created after the backup by
copying another one's directory (``STRATEGY FILE_COPY``) means the lay-out was wrong, and
the restore falls back to the full lay-out. The first connection, to the tables'
database, checks that it is the backup's one of that name (a copy of a database left out
has no catalogs: a connection to it fails, and the restore falls back likewise). Unlogged tables come back empty either way
(their data is never in a backup or in WAL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from backup_tool.core.graphs import reachable
from backup_tool.physical.basetar import Member

FIRST_NORMAL_OID = 16384
STORED_KINDS = frozenset("rtim")
TABLE_KINDS = frozenset("rpmf")
MAP_FORKS = frozenset({"_fsm", "_vm"})

RELATIONS_SQL = """
SELECT c.oid::bigint, pg_relation_filenode(c.oid)::bigint, c.relkind::text, n.nspname::text,
       c.relname::text,
       COALESCE((SELECT t.oid FROM pg_class t WHERE t.reltoastrelid = c.oid LIMIT 1),
                (SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = c.oid), 0)::bigint,
       ARRAY(SELECT h.inhparent::bigint FROM pg_inherits h WHERE h.inhrelid = c.oid)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid >= 16384"""

FILES_AT_TARGET_SQL = """
WITH RECURSIVE tree(oid) AS (
    SELECT unnest(%s::oid[])
    UNION SELECT h.inhrelid FROM pg_inherits h JOIN tree ON h.inhparent = tree.oid),
  tables AS (SELECT oid FROM tree UNION SELECT c.reltoastrelid FROM pg_class c JOIN tree USING (oid)
             WHERE c.reltoastrelid <> 0),
  rels AS (SELECT oid FROM tables UNION SELECT i.indexrelid FROM pg_index i JOIN tables t ON i.indrelid = t.oid)
SELECT (SELECT oid::bigint FROM pg_database WHERE datname = current_database()),
       ARRAY(SELECT pg_relation_filenode(oid)::bigint FROM rels WHERE pg_relation_filenode(oid) IS NOT NULL)"""

DATABASE_FILES_SQL = """
SELECT (SELECT oid::bigint FROM pg_database WHERE datname = current_database()),
       ARRAY(SELECT pg_relation_filenode(oid)::bigint FROM pg_class WHERE pg_relation_filenode(oid) IS NOT NULL)"""

RELATION_FILE = re.compile(r"^base/(\d+)/(\d+)(_[a-z]+)?(\.\d+)?$")
SHARED_MAP_FILE = re.compile(r"^global/\d+_(?:fsm|vm)(?:\.\d+)?$")
INVALID_PAGE = re.compile(r"page \d+ of relation (\S+) (?:is uninitialized|does not exist)")


@dataclass(frozen=True)
class Relation:
    """A relation of a database at backup time; ``owner``: the table of a TOAST table or of
    an index (0 otherwise); ``parents``: inheritance parents (partitioned tables included)."""

    oid: int
    filenode: int
    kind: str
    schema: str
    name: str
    owner: int
    parents: tuple[int, ...]


@dataclass(frozen=True)
class DatabaseRelations:
    oid: int
    name: str
    relations: tuple[Relation, ...]


def relations_to_json(dbs: Iterable[DatabaseRelations]) -> dict[str, Any]:
    return {str(d.oid): {"name": d.name, "relations": [[r.oid, r.filenode, r.kind, r.schema, r.name, r.owner,
                                                        list(r.parents)] for r in d.relations]} for d in dbs}


def relations_from_json(data: dict[str, Any]) -> dict[int, DatabaseRelations]:
    return {int(oid): DatabaseRelations(int(oid), body["name"], tuple(
        Relation(int(r[0]), int(r[1] or 0), r[2], r[3], r[4], int(r[5]), tuple(int(p) for p in r[6]))
        for r in body["relations"])) for oid, body in data.items()}


def capture(conn: Any) -> DatabaseRelations:
    """The relation map of the database ``conn`` is connected to."""
    row = conn.execute("SELECT oid::bigint, current_database() FROM pg_database "
                       "WHERE datname = current_database()").fetchone()
    rels = tuple(Relation(int(r[0]), int(r[1] or 0), r[2], r[3], r[4], int(r[5]), tuple(r[6]))
                 for r in conn.execute(RELATIONS_SQL).fetchall())
    return DatabaseRelations(int(row[0]), row[1], rels)


def _match(relations: tuple[Relation, ...], schema: str | None, name: str) -> list[Relation]:
    tables = [r for r in relations if r.kind in TABLE_KINDS]
    exact = [r for r in tables if r.name == name and (schema is None or r.schema == schema)]
    if exact:
        return exact
    return [r for r in tables if r.name.lower() == name.lower()
            and (schema is None or r.schema.lower() == schema.lower())]


def needed(db: DatabaseRelations, tables: Iterable[tuple[str | None, str]]) -> frozenset[int]:
    """Oids to lay out in full for ``tables`` (schema may be None): each matching table,
    its inheritance descendants, their TOAST tables and the indexes of all of those. A name
    that matches nothing here is left to :func:`missed_files` (it may be created later)."""
    chosen: set[int] = set()
    for schema, name in tables:
        chosen.update(r.oid for r in _match(db.relations, schema, name))
    children: dict[int, list[int]] = {}
    for r in db.relations:
        for p in r.parents:
            children.setdefault(p, []).append(r.oid)
    chosen = reachable(chosen, children)
    toast = {r.oid for r in db.relations if r.kind == "t" and r.owner in chosen}
    chosen |= toast
    chosen |= {r.oid for r in db.relations if r.kind == "i" and r.owner in chosen}
    return frozenset(chosen)


@dataclass(frozen=True)
class Choice:
    """Which tar members are laid out in full, which as sparse files and which not at all
    (``left_out``: every relation file of the databases ``choose`` was told nothing
    connects to; replay creates those it writes into, as it does for a relation dropped
    later in the WAL); ``database``: the oid of the database whose tables are laid out,
    for a table request."""

    full: tuple[Member, ...]
    sparse: tuple[Member, ...]
    left_out: tuple[Member, ...] = ()
    database: int | None = None
    maps_left_out: tuple[Member, ...] = ()
    """Free space map and visibility map forks not written (``choose(lean=True)``): not
    part of :attr:`sparse_files`, so replay skipping a block of the main fork of such a
    relation is still reported."""

    @property
    def sparse_files(self) -> frozenset[tuple[int, int]]:
        """(database oid, relfilenode) of every relation left sparse or left out."""
        found = set()
        for m in (*self.sparse, *self.left_out):
            match = RELATION_FILE.match(m.name)
            assert match is not None
            found.add((int(match.group(1)), int(match.group(2))))
        return frozenset(found)

    @property
    def full_bytes(self) -> int:
        return sum(m.size for m in self.full if m.kind == "f")


def choose(members: Iterable[Member], dbs: dict[int, DatabaseRelations],
           keep: dict[int, frozenset[int]], leave_out: frozenset[int] = frozenset(), lean: bool = False) -> Choice:
    """Split the tar's members: a regular file is sparse when the backup-time map names it
    as a user table, TOAST table, index or materialized view (not a sequence, not an
    ``_init`` fork) whose oid is not in ``keep`` for its database; every relation file
    (but an ``_init`` fork) of a database in ``leave_out`` is left out; everything else
    is full. With ``lean`` (a table request, see the module docstring) no free space map
    or visibility map fork is written either, the shared catalogs' included
    (``maps_left_out``)."""
    by_file = {dboid: {r.filenode: r for r in db.relations if r.filenode} for dboid, db in dbs.items()}
    full, sparse, left_out, maps = [], [], [], []
    for m in members:
        match = RELATION_FILE.match(m.name) if m.kind == "f" else None
        if lean and match is None and m.kind == "f" and SHARED_MAP_FILE.match(m.name):
            maps.append(m)
            continue
        if match is None or match.group(3) == "_init":
            full.append(m)
            continue
        dboid = int(match.group(1))
        rel = by_file.get(dboid, {}).get(int(match.group(2)))
        if dboid in leave_out:
            left_out.append(m)
        elif lean and match.group(3) in MAP_FORKS:
            maps.append(m)
        elif (rel is not None and rel.kind in STORED_KINDS and rel.oid >= FIRST_NORMAL_OID
                and rel.oid not in keep.get(dboid, frozenset())):
            sparse.append(m)
        else:
            full.append(m)
    return Choice(tuple(full), tuple(sparse), tuple(left_out), maps_left_out=tuple(maps))


def unexplained_invalid_pages(log_text: str, sparse_files: frozenset[tuple[int, int]]) -> list[str]:
    """Relations named by "page N of relation ... is uninitialized / does not exist" in the
    recovery log that this lay-out did *not* leave sparse (sorted, each once)."""
    bad = set()
    for path in INVALID_PAGE.findall(log_text):
        match = re.match(r"^base/(\d+)/(\d+)(_[a-z]+)?$", path)
        if not match or (int(match.group(1)), int(match.group(2))) not in sparse_files:
            bad.add(path)
    return sorted(bad)


def missed_files(database_oid: int, filenodes: Iterable[int], choice: Choice,
                 databases_in_backup: frozenset[int]) -> list[str]:
    """Why the partial lay-out cannot serve the targets as recovered (empty: it can).

    ``filenodes`` are the targets' files at the target time (tables, TOAST, indexes);
    one left sparse means the backup-time map pointed elsewhere. A database that was not in
    the backup was created later, possibly as a file copy of a partly sparse one.
    """
    if database_oid not in databases_in_backup and choice.sparse:
        return [f"database oid {database_oid} was created after the backup"]
    sparse = choice.sparse_files
    return [f"base/{database_oid}/{f}" for f in sorted(set(filenodes)) if (database_oid, f) in sparse]


def databases_in(members: Iterable[Member]) -> frozenset[int]:
    return frozenset(int(m.name.split("/")[1]) for m in members
                     if m.kind == "d" and re.match(r"^base/\d+$", m.name))
