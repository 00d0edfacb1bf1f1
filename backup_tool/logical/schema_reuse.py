"""Whether an incremental may reuse its parent's schema archive and roles dump instead of
running ``pg_dump --schema-only`` and ``pg_dumpall --globals-only`` again. Pure.

The schema archive is a function of this database's catalogs and of the shared ones (roles,
the database's own row, comments and settings); the roles dump, of the shared catalogs alone;
both also of how they are made (server and client versions, the role that runs them, the
session's options, this tool's) and of the settings that shape how values print (a
default's ``timestamptz`` constant in the time zone, a bytea one in ``bytea_output``: a
configuration reload changes them and writes no WAL), recorded as the manifest's
``dump_context``. The WAL between the parent's snapshot and this one (the span the WAL
method reads, back to where the transactions open at the parent's snapshot began) holds
every change to those catalogs: a catalog row lives in the catalog's heap (or its TOAST
heap) and is only ever written through a heap, full-page image or generic WAL record naming
that relation file (a catalog index changes only with its heap; a sequence's value, through
a sequence record). So the parent's objects are exactly what a dump at this snapshot would
give when, besides an equal context:

- no such record that may change a row's content references a relation file of this
  database or a shared one (database oid 0) other than those of user relations (oid at least
  :data:`FIRST_NORMAL_OID`: tables, TOAST, indexes, sequences, materialized views, whose
  content no schema-only dump reads; not extensions' configuration tables and sequences,
  whose rows and values it does) at this snapshot, and, while the dump holds no planner
  statistics (:func:`statistics_in_dump`), those of ``pg_statistic`` and
  ``pg_statistic_ext_data`` (with their TOAST tables and indexes), which ANALYZE writes; and
  no SMGR create names another. Records that change no row's content
  (:data:`~backup_tool.physical.walscan.ROW_PRESERVING`: hint-bit images, pruning, vacuum,
  freezing, visibility bits, row locks) do not count, nor does VACUUM's truncation of empty
  pages, nor do heap in-place updates of ``pg_class`` and ``pg_database``, which PostgreSQL
  15 makes only to columns no schema or roles dump prints (see
  :data:`~backup_tool.physical.walscan.INPLACE_COLUMNS`: statistics, frozen xids, and
  ``relhas*`` flags cleared once nothing is left for them to announce); one of any other
  catalog counts as a write. A relation file of the parent's snapshot that is not one of
  this snapshot's was dropped or replaced since, which wrote ``pg_class`` in the span:
  listing only this snapshot's files loses nothing;
- no relation map of this database or the shared one was updated (mapped catalogs
  rewritten), and the server did not restart in the span (what changed while it was down,
  a tablespace's link or the programs, is in no WAL).

Anything else (the WAL method not used, a context not recorded or different, any other
write, a file unknown at this snapshot, a transaction still open at it) means dumping as
before, with the reason recorded. Tables of other databases do not matter. The roles dump
is reused on the same conditions restricted to shared files and the shared map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from backup_tool.core.walnames import CatalogEvidence
from backup_tool.postgres.walbasis import SnapshotFiles

FIRST_NORMAL_OID = 16384
"""PostgreSQL's FirstNormalObjectId: every object created after initdb has an oid from here."""

RelFile = tuple[int, int, int]


@dataclass(frozen=True)
class SideReuse:
    """Which of the parent's side objects this backup reuses (the parent's id) and why not,
    for each of the schema archive and the roles dump."""

    schema_from: str | None
    schema_note: str
    globals_from: str | None
    globals_note: str

    @classmethod
    def dumped(cls, why: str) -> SideReuse:
        return cls(None, why, None, why)


def statistics_in_dump(major: int, dump_args: Sequence[str]) -> bool:
    """Whether a schema-only ``pg_dump`` of this major with these options may print planner
    statistics: PostgreSQL 18's can (``--statistics``, ``--with-statistics``), so from 18 on
    yes unless ``--no-statistics`` is passed. Pure."""
    return major >= 18 and "--no-statistics" not in dump_args


def plan(parent_id: str, parent_context: Any, context: Mapping[str, Any], evidence: CatalogEvidence | None,
         database_oid: int, files: SnapshotFiles, statistics_dumped: bool) -> SideReuse:
    """What this incremental reuses of parent ``parent_id`` (see the module): ``evidence`` is
    what the WAL method's reading of the span found (None: the WAL method was not used or
    gave no answer), ``files`` the relation files at this snapshot, ``statistics_dumped``
    :func:`statistics_in_dump`. Pure."""
    if evidence is None:
        return SideReuse.dumped("the changed tables were not learnt from the WAL")
    if not isinstance(parent_context, dict):
        return SideReuse.dumped(f"backup {parent_id} recorded no dump context")
    if "role" not in context or "role" not in parent_context:
        return SideReuse.dumped("the role and settings a dump's session gets could not be read")
    changed = sorted(k for k in set(parent_context) | set(context) if parent_context.get(k) != context.get(k))
    if changed:
        return SideReuse.dumped(f"the dumps would not be made as backup {parent_id}'s were: "
                                f"{', '.join(changed)} changed")
    if evidence.restarted:
        return SideReuse.dumped("the server restarted since the parent's snapshot")
    shared = sorted(r for r in evidence.written | (evidence.inplace - files.inplace) if r[1] == 0)
    if 0 in evidence.relmaps or shared:
        what = "the shared relation map was updated" if 0 in evidence.relmaps else \
            f"a shared catalog was written (relation file {_name(shared[0])})"
        return SideReuse.dumped(f"{what} since the parent's snapshot")
    allowed = files.user if statistics_dumped else files.user | files.statistics
    local = sorted(r for r in evidence.written | (evidence.inplace - files.inplace)
                   if r[1] == database_oid and r not in allowed)
    if database_oid in evidence.relmaps:
        schema_note = "this database's relation map was updated since the parent's snapshot"
    elif local:
        schema_note = (f"a catalog or a relation unknown at this snapshot was written since the parent's "
                       f"snapshot (relation file {_name(local[0])})")
    else:
        schema_note = ""
    return SideReuse(None if schema_note else parent_id, schema_note, parent_id, "")


def _name(rel: RelFile) -> str:
    return "/".join(str(n) for n in rel)
