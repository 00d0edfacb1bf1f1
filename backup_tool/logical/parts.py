"""Which tables a logical backup splits into parts, and how.

A table of at least ``backup.split_table_mb`` on disk is dumped as several objects ("parts"),
each the rows of one contiguous range of its heap blocks, read with a TID range scan
(``ctid >= '(b0,0)' AND ctid < '(b1,0)'``, PostgreSQL 14 and later: each part reads only its
blocks). The parts of one table are dumped, checksummed and later loaded by different
sessions at once, which is what makes one large table as fast to back up and restore as many
small ones. The ranges are cut from the heap's block count read after the backup's snapshot
was taken; the first range is open below and the last open above, so every row the snapshot
sees is in exactly one part whatever the table did since. A table's row count and checksum
are the sums of its parts' (see :func:`backup_tool.postgres.connection.combine_checksums`).

In a full backup, where every table is dumped and checksummed, a table is split only when it
needs to be for the sessions to share the work: when its dump alone is more than one
session's even share of the data phase (:func:`even_share`). Below that, its one COPY runs on
one session while the others dump and checksum the rest, and splitting it would only cost:
a TID range scan reads through shared buffers without the ring buffer a large sequential
scan uses, so each part's fresh backend copies its blocks in and takes a page fault for
every buffer page it fills, and the parts evict what the other tables had in shared buffers
(pgbench scale 50 with 16 wide tables, jobs 2: 1.0 s of the server's 6.1 s of CPU, 430,000
of its 480,000 page faults).

Everything here is pure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from backup_tool.postgres.connection import BlockRange, TableInfo, block_ranges

MAX_PARTS = 64
MIN_SERVER_MAJOR = 14
"""TID range scans arrived in PostgreSQL 14: before it every part would read the whole table."""


@dataclass(frozen=True)
class Slice:
    """One unit of a backup's data phase: a whole table (``count`` 1) or one of its parts."""

    table: TableInfo
    index: int
    count: int
    blocks: BlockRange = (None, None)

    @property
    def split(self) -> bool:
        return self.count > 1

    @property
    def object_name(self) -> str:
        """The object's name under the backup's ``data/`` prefix."""
        oid = self.table.oid
        return f"{oid}.{self.index}.copy.zst" if self.split else f"{oid}.copy.zst"

    @property
    def size(self) -> int:
        """This slice's share of the table's on-disk size (what progress is measured in); the
        shares of a table's slices add up to its size."""
        size = self.table.size
        return size * (self.index + 1) // self.count - size * self.index // self.count


def part_count(size: int, blocks: int, threshold_mb: int, jobs: int, major: int, columns: int,
               share: int | None = None) -> int:
    """How many parts a table is dumped in (1: not split).

    Not split below ``threshold_mb`` MiB on disk (0: never), before PostgreSQL 14, without
    columns (nothing to select), or, given ``share`` (a session's even share of the phase's
    work, :func:`even_share`), when its size is not above it. Otherwise at least one part per
    job and at most about ``threshold_mb`` each (so a backup with more sessions finds work for
    them all), never more than :data:`MAX_PARTS` nor than the heap has blocks."""
    threshold = threshold_mb * 2**20
    if threshold <= 0 or size < threshold or major < MIN_SERVER_MAJOR or columns == 0:
        return 1
    if share is not None and size <= share:
        return 1
    wanted = max(2, jobs, -(-size // threshold))
    return max(1, min(wanted, MAX_PARTS, blocks))


def even_share(tables: list[TableInfo], jobs: int) -> int:
    """One session's even share of a full backup's data phase over ``tables``, in bytes of
    table: every table is dumped (its size) and checksummed (:data:`CHECKSUM_COST` of it)."""
    return int(sum(t.size for t in tables) * (1 + CHECKSUM_COST)) // max(jobs, 1)


def split_tables(tables: list[TableInfo], threshold_mb: int, jobs: int, major: int,
                 share: int | None = None) -> list[TableInfo]:
    """The tables :func:`slices` may split (those whose heap size it needs)."""
    return [t for t in tables if part_count(t.size, MAX_PARTS, threshold_mb, jobs, major, len(t.columns), share) > 1]


def slices(tables: list[TableInfo], blocks: dict[int, int], threshold_mb: int, jobs: int,
           major: int, share: int | None = None) -> list[Slice]:
    """The data phase's units, in the tables' order: each table whole or in its parts.
    ``blocks``: heap blocks per table oid, read after the snapshot (missing: 0); ``share``:
    see :func:`part_count` (None: tables are split whatever the rest of the work)."""
    found: list[Slice] = []
    for table in tables:
        heap = blocks.get(table.oid, 0)
        count = part_count(table.size, heap, threshold_mb, jobs, major, len(table.columns), share)
        if count == 1:
            found.append(Slice(table, 0, 1))
            continue
        ranges = block_ranges(heap, count)
        found += [Slice(table, i, len(ranges), r) for i, r in enumerate(ranges)]
    return found


class Work(enum.Enum):
    """What a data-phase task does with a slice."""

    DUMP = "dump"
    CHECKSUM = "checksum"


CHECKSUM_COST = 0.5
"""A slice's checksum query for about half the CPU of its dump (COPY on the server plus the
client's compression and upload), measured with the ``typed-column`` method."""


def schedule(dumps: list[Slice], checksums: list[Slice]) -> list[tuple[Work, Slice]]:
    """The order the data phase's sessions take their tasks in: longest first (by estimated
    CPU: the slice's size, a checksum weighted by :data:`CHECKSUM_COST`), so dumps and
    checksums of different tables run side by side and the last tasks, which leave sessions
    idle while they finish, are the shortest. Ties keep the tables' order, a dump before a
    checksum. Pure."""
    tasks = [(Work.DUMP, s) for s in dumps] + [(Work.CHECKSUM, s) for s in checksums]
    return sorted(tasks, key=lambda task: -task[1].size * (CHECKSUM_COST if task[0] is Work.CHECKSUM else 1.0))


def batched(tasks: list[tuple[Work, Slice]], small: int, size: int) -> list[tuple[Work, tuple[Slice, ...]]]:
    """``tasks`` in their order, the checksums of whole tables smaller than ``small`` bytes
    gathered ``size`` at a time into one task each, where the first of them was: a database of
    thousands of small partitions checksums each batch in one statement (one round trip)
    instead of one per table. Every other task stays alone. Pure."""
    out: list[tuple[Work, tuple[Slice, ...]]] = []
    batch: list[Slice] = []
    at = 0
    for work, piece in tasks:
        if work is Work.CHECKSUM and piece.count == 1 and piece.table.size < small:
            if not batch:
                at = len(out)
                out.append((work, ()))
            batch.append(piece)
            if len(batch) == size:
                out[at] = (work, tuple(batch))
                batch = []
        else:
            out.append((work, (piece,)))
    if batch:
        out[at] = (Work.CHECKSUM, tuple(batch))
    return out
