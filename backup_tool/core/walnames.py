"""WAL file names and LSNs: the one implementation every module uses.

A segment name is 24 upper-case hex digits: timeline (8), then the segment number split
into "log" (8) and "segment within the log" (8). How many segments a log holds depends on
the cluster's WAL segment size (0x100000000 / size: 256 for the default 16 MiB), so every
conversion between names and segment numbers takes that size; it defaults to 16 MiB.

Guaranteed: :func:`segment_name` and :func:`segment_number` are inverse for a given size;
:func:`parse_lsn` and :func:`format_lsn` are inverse, and write LSNs as PostgreSQL does.
This module imports only the standard library and :mod:`backup_tool.errors`, so the
``wal push``/``wal fetch`` fast paths can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from backup_tool.errors import UsageError

DEFAULT_SEGMENT_SIZE = 16 << 20
SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
_SEGMENT_PREFIX_RE = re.compile(r"^[0-9A-F]{24}")


def is_segment(name: str) -> bool:
    """Whether ``name`` is a full segment's name (not a .partial, .history or .backup file)."""
    return bool(SEGMENT_RE.match(name))


def segment_prefix(text: str) -> str | None:
    """The segment name ``text`` starts with (``000000010000000000000002.00000028.backup``
    → ``000000010000000000000002``), or None."""
    return text[:24] if _SEGMENT_PREFIX_RE.match(text) else None


def segments_per_log(seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return max(1, 0x100000000 // max(seg_size, 1))


def segment_name(timeline: int, segno: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The name of segment number ``segno`` on ``timeline``."""
    per = segments_per_log(seg_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def segment_number(name: str, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The segment number of a segment name (its timeline ignored)."""
    return int(name[8:16], 16) * segments_per_log(seg_size) + int(name[16:24], 16)


def segment_timeline(name: str) -> int:
    return int(name[:8], 16)


def next_segment(name: str, seg_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The segment after ``name`` on the same timeline."""
    return segment_name(segment_timeline(name), segment_number(name, seg_size) + 1, seg_size)


def parse_lsn(text: str) -> int:
    """``'0/3000060'`` → 0x3000060; UsageError for anything else."""
    try:
        hi, lo = text.strip().split("/")
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise UsageError(f"{text!r} is not an LSN", "write it as PostgreSQL does, e.g. 0/3000060") from None


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_segment(lsn: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The number of the segment holding byte ``lsn``."""
    return lsn // seg_size


def segment_start_lsn(segno: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return segno * seg_size


@dataclass(frozen=True)
class WalSpan:
    """The WAL between two record positions on one timeline of one cluster.

    ``early_xids``: transactions that may have written before ``start`` and must be
    followed back to their beginning (see :mod:`backup_tool.physical.walscan`)."""

    timeline: int
    start: int
    end: int
    segment_size: int
    system_identifier: int
    early_xids: tuple[int, ...] = ()


@dataclass(frozen=True)
class WalChanges:
    """What reading a :class:`WalSpan` found: the (tablespace, database, relfilenode) of every
    relation a row-changing record touched, how many segments were read, and how many of
    those came from the server's ``pg_wal`` rather than the archive."""

    touched: frozenset[tuple[int, int, int]]
    segments: int
    from_server: int
    evidence: CatalogEvidence | None = None
    """What the records say of catalogs (None: the reader does not tell)."""


@dataclass(frozen=True)
class CatalogEvidence:
    """What a read :class:`WalSpan` says beyond rows (see
    :mod:`backup_tool.physical.walscan`): the (tablespace, database, relfilenode) of every
    relation file a record that may change a row's content references (any fork; records of
    heaps, full-page images, sequences, generic WAL, and SMGR creates: rows live in heaps, and
    an index changes only with its heap; VACUUM's truncation of empty pages is not counted),
    apart from those heap in-place updates wrote (``inplace``), the databases whose relation
    map was updated (0: shared), and whether the server restarted in the span."""

    written: frozenset[tuple[int, int, int]]
    inplace: frozenset[tuple[int, int, int]]
    relmaps: frozenset[int]
    restarted: bool


XLP_LONG_HEADER = 0x0002
LONG_HEADER_SIZE = 40


@dataclass(frozen=True)
class LongPageHeader:
    """What a segment's first page (XLogLongPageHeaderData) says about the cluster that wrote it."""

    system_identifier: int
    segment_size: int
    block_size: int


def parse_long_header(data: bytes) -> LongPageHeader | None:
    """The long page header at the start of a segment, or None unless every field is plausible
    (magic of a post-9.x server, the long-header flag, power-of-two sizes in range, a page
    address on a segment boundary)."""
    if len(data) < LONG_HEADER_SIZE:
        return None
    magic = int.from_bytes(data[0:2], "little")
    info = int.from_bytes(data[2:4], "little")
    pageaddr = int.from_bytes(data[8:16], "little")
    seg_size = int.from_bytes(data[32:36], "little")
    blcksz = int.from_bytes(data[36:40], "little")
    plausible = (magic >> 8 == 0xD1 and info & XLP_LONG_HEADER
                 and (1 << 20) <= seg_size <= (1 << 30) and not seg_size & (seg_size - 1)
                 and 1024 <= blcksz <= 32768 and not blcksz & (blcksz - 1) and pageaddr % seg_size == 0)
    return LongPageHeader(int.from_bytes(data[24:32], "little"), seg_size, blcksz) if plausible else None


def read_long_header(path: str | Path) -> LongPageHeader | None:
    """:func:`parse_long_header` of the file at ``path`` (None if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return parse_long_header(fh.read(LONG_HEADER_SIZE))
    except OSError:
        return None
