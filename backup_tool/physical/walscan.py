"""Which relations the archived WAL says were written between two LSNs.

An incremental logical backup asks: which tables' rows may differ between the parent's
snapshot and mine? Every change to a permanent table's rows is WAL-logged as a record whose
block references name the relation's file (tablespace, database, relfilenode). This module
reads the records of an LSN range ``[start, end)`` from archived segments (fetched and
sha256-checked exactly as ``wal fetch`` does) and returns the set of relation files that a
row-changing record touched in their main fork.

The WAL format read is PostgreSQL 15's (``XLOG_PAGE_MAGIC`` 0xD110): page headers
(XLogPageHeaderData / XLogLongPageHeaderData), records (XLogRecord) that may cross page and
segment boundaries, block references with their image and RelFileNode headers, and
XLOG_SWITCH. ``start`` and ``end`` must be record boundaries as PostgreSQL reports them
(``pg_current_wal_insert_lsn()``): every record starting before ``end`` then also ends by it.

Guaranteed: the answer is never a guess. Every page header must carry the expected magic
and address, every continuation the expected remaining length, every record a header and
block-reference layout whose lengths add up to its total length, a known resource manager
(or it counts as a change), a ``xl_prev`` pointing at the record before, and a ``xl_crc``
matching its bytes (CRC-32C as PostgreSQL's ``ValidXLogRecord`` computes it, checked before
anything past the header is believed); the walk must land exactly on ``end``. Anything else
raises :class:`WalScanUncertain`, and the caller falls back to comparing checksums. A record
failing its CRC check is :class:`WalRecordDamaged`; :func:`relations_written` says what it
means: as the last record of WAL read from the server's ``pg_wal`` (one still being
written) it is where the server's WAL ends, as PostgreSQL takes it; anywhere else (an
archived segment, or a complete one in ``pg_wal``) the segment is damaged. Records are
counted as changes unless they are one of a short list known to leave rows as they are
(hint-bit images, pruning, vacuum, freezing, visibility-map bits, row locks), so the set is
a superset of the tables whose rows changed (a rolled-back insert still counts). Tables changed without WAL (unlogged tables) and
changes of a table's file (TRUNCATE, VACUUM FULL, CLUSTER, rewrites) are the caller's to
detect by comparing the catalog at both snapshots.

The same reading also tells what an incremental needs to reuse its parent's schema dump
(:class:`~backup_tool.core.walnames.CatalogEvidence`): every relation file a record that may
change a row's content (any kind but :data:`ROW_PRESERVING`) references, those of heap
in-place updates apart, the databases whose relation map was updated, and whether the server
restarted within the span.
"""

from __future__ import annotations

import mmap
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from crc32c import crc32c

from backup_tool.core import walnames
from backup_tool.errors import BackupToolError, WalDamagedError
from backup_tool.physical import wal
from backup_tool.repository import walidentity
from backup_tool.repository.storage.base import Storage

PAGE_MAGIC = 0xD110
BLCKSZ = 8192
SHORT_PHD = 24
LONG_PHD = 40
RECORD_HEADER = 24
#: offsetof(XLogRecord, xl_crc): the header bytes the CRC covers, after the record's data.
XL_CRC_OFFSET = 20

XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
XLP_FIRST_IS_OVERWRITE_CONTRECORD = 0x0008

RM_XLOG, RM_SMGR, RM_RELMAP, RM_STANDBY, RM_HEAP2, RM_HEAP, RM_SEQ = 0, 2, 7, 8, 9, 10, 15
RM_MAX_BUILTIN = 21
XLOG_CHECKPOINT_SHUTDOWN, XLOG_END_OF_RECOVERY = 0x00, 0x90
XLOG_SWITCH, XLOG_FPI_FOR_HINT, XLOG_OVERWRITE_CONTRECORD = 0x40, 0xA0, 0xD0
XLOG_RELMAP_UPDATE = 0x00
XLOG_SMGR_CREATE, XLOG_SMGR_TRUNCATE = 0x10, 0x20
XLOG_RUNNING_XACTS = 0x10
#: How far back (in segments before the span) the start of a transaction is looked for.
MAX_SEGMENTS_BACK = 64

#: (resource manager, info & 0xF0) of records that never change a table's rows.
ROW_PRESERVING = frozenset({
    (RM_XLOG, XLOG_FPI_FOR_HINT),
    (RM_HEAP, 0x60),   # XLOG_HEAP_LOCK
    (RM_HEAP2, 0x10),  # XLOG_HEAP2_PRUNE
    (RM_HEAP2, 0x20),  # XLOG_HEAP2_VACUUM
    (RM_HEAP2, 0x30),  # XLOG_HEAP2_FREEZE_PAGE
    (RM_HEAP2, 0x40),  # XLOG_HEAP2_VISIBLE
    (RM_HEAP2, 0x60),  # XLOG_HEAP2_LOCK_UPDATED
    (RM_HEAP2, 0x70),  # XLOG_HEAP2_NEW_CID
})

XLOG_HEAP_INPLACE = 0x70

INPLACE_COLUMNS = {
    "pg_class": ("relpages", "reltuples", "relallvisible", "relhasindex", "relhasrules", "relhastriggers",
                 "relfrozenxid", "relminmxid"),
    "pg_database": ("datfrozenxid", "datminmxid", "datconnlimit"),
}
"""The only columns of ``pg_class`` and ``pg_database`` PostgreSQL 15 writes with a heap
in-place update (XLOG_HEAP_INPLACE):
``vac_update_relstats`` (VACUUM and ANALYZE: the statistics columns, ``relfrozenxid`` and
``relminmxid``, and ``relhasindex``/``relhasrules``/``relhastriggers`` cleared only when the
relation has no index, rule or trigger left), ``index_update_stats`` (CREATE INDEX and
REINDEX: ``relhasindex`` set, ``relpages``, ``reltuples``), ``vac_update_datfrozenxid``
and ``dropdb`` (``datconnlimit`` = -2 on the database being dropped)."""

BKPBLOCK_FORK_MASK = 0x0F
BKPBLOCK_HAS_IMAGE = 0x10
BKPBLOCK_HAS_DATA = 0x20
BKPBLOCK_SAME_REL = 0x80
BKPIMAGE_HAS_HOLE = 0x01
BKPIMAGE_COMPRESSED = 0x04 | 0x08 | 0x10
XLR_MAX_BLOCK_ID = 32
XLR_BLOCK_ID_DATA_SHORT = 255
XLR_BLOCK_ID_DATA_LONG = 254
XLR_BLOCK_ID_ORIGIN = 253
XLR_BLOCK_ID_TOPLEVEL_XID = 252
MAIN_FORK = 0

_RECORD = struct.Struct("<IIQBBxxI")
_PAGE = struct.Struct("<HHIQI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_RELFILE = struct.Struct("<III")
#: The most common layout: block 0 (no image, its own RelFileNode, block number), then short main data.
_ONE_BLOCK = struct.Struct("<BBHIIIIBB")

RelFile = tuple[int, int, int]
"""(tablespace oid, database oid, relfilenode) as WAL block references name a relation."""


class WalScanUncertain(BackupToolError):
    """The WAL could not be read with certainty (missing segment, unknown layout, damage)."""


class WalSegmentDamaged(WalScanUncertain, WalDamagedError):
    """A finished segment holds a record failing its CRC check (:func:`damaged_record_reason`)."""


class WalRecordDamaged(WalScanUncertain):
    """A record whose ``xl_crc`` does not match its bytes: torn or damaged. ``lsn`` is where
    it starts, ``following`` where the next record would start if its length were right."""

    def __init__(self, lsn: int, following: int) -> None:
        super().__init__(f"the record at {walnames.format_lsn(lsn)} fails its CRC check "
                         f"(incorrect resource manager data checksum)")
        self.lsn = lsn
        self.following = following


@dataclass(frozen=True)
class ScanResult:
    touched: frozenset[RelFile]
    records: int
    segments: int
    from_server: int = 0
    """How many of the segments were read from the server's ``pg_wal`` (archived or not)."""
    written: frozenset[RelFile] = frozenset()
    """Every relation file (any fork) a record of a :data:`DETAILED` or custom resource
    manager (sequences included) references that is neither of the :data:`ROW_PRESERVING`
    kinds nor a heap in-place update, and those SMGR create records name (not truncates: an
    SMGR truncate of a relation created before the transaction, as every catalog was, is
    VACUUM's, cutting off pages left empty)."""
    inplace: frozenset[RelFile] = frozenset()
    """The relation files heap in-place updates wrote (see :data:`INPLACE_COLUMNS`)."""
    relmaps: frozenset[int] = frozenset()
    """The database oids (0: the shared map) of relation map updates."""
    restarted: bool = False
    """Whether the span holds a shutdown checkpoint or an end of recovery: the server stopped
    (or crashed) and started again in it."""

    def merged(self, other: ScanResult) -> ScanResult:
        return ScanResult(self.touched | other.touched, self.records + other.records,
                          self.segments + other.segments, self.from_server, self.written | other.written,
                          self.inplace | other.inplace, self.relmaps | other.relmaps,
                          self.restarted or other.restarted)


SegmentSource = Callable[[int], bytes]
"""Returns the whole content of segment number ``segno`` (on the scanned timeline)."""


class _Walker:
    """Reads a range of the WAL stream: bytes at LSNs, page headers checked and skipped."""

    def __init__(self, source: SegmentSource, seg_size: int) -> None:
        self.source = source
        self.seg_size = seg_size
        self.segno = -1
        self.seg = b""
        self.loaded = 0

    def segment(self, segno: int) -> bytes:
        if segno != self.segno:
            data = self.source(segno)
            if len(data) != self.seg_size:
                raise WalScanUncertain(f"WAL segment {segno} has {len(data)} bytes, not {self.seg_size}")
            self.seg, self.segno = data, segno
            self.loaded += 1
            self.check_page(segno * self.seg_size)
        return self.seg

    def check_page(self, page_lsn: int) -> int:
        """Validate the header of the page at ``page_lsn``; return its ``xlp_info``."""
        seg = self.segment(page_lsn // self.seg_size) if page_lsn // self.seg_size != self.segno else self.seg
        off = page_lsn % self.seg_size
        magic, info, _tli, pageaddr, _rem = _PAGE.unpack_from(seg, off)
        if magic != PAGE_MAGIC or pageaddr != page_lsn:
            raise WalScanUncertain(f"WAL page at {walnames.format_lsn(page_lsn)} has magic {magic:#x} and address "
                                   f"{walnames.format_lsn(pageaddr)} (expected {PAGE_MAGIC:#x}, its own LSN)")
        if bool(info & XLP_LONG_HEADER) != (off == 0):
            raise WalScanUncertain(f"WAL page at {walnames.format_lsn(page_lsn)} has a wrong header kind")
        if info & XLP_FIRST_IS_OVERWRITE_CONTRECORD:
            raise WalScanUncertain(f"WAL page at {walnames.format_lsn(page_lsn)} overwrites a lost record")
        return int(info)

    def header_size(self, page_lsn: int) -> int:
        return LONG_PHD if page_lsn % self.seg_size == 0 else SHORT_PHD


def _maxalign(n: int) -> int:
    return (n + 7) & ~7


def _block_refs(buf: bytes, base: int, tot_len: int, where: int) -> tuple[tuple[tuple[int, RelFile], ...], int]:
    """(fork, relation) of each block reference of the record at ``buf[base:base+tot_len]``;
    and the length of its main data; raises unless the headers and the payload lengths they
    announce add up to ``tot_len``."""
    pos = base + RECORD_HEADER
    end = base + tot_len
    if tot_len >= RECORD_HEADER + _ONE_BLOCK.size:
        block_id, flags, data_len, spc, db, node, _blkno, next_id, main_len = _ONE_BLOCK.unpack_from(buf, pos)
        if (block_id == 0 and next_id == XLR_BLOCK_ID_DATA_SHORT
                and not flags & (BKPBLOCK_HAS_IMAGE | BKPBLOCK_SAME_REL)
                and bool(flags & BKPBLOCK_HAS_DATA) == (data_len > 0)
                and pos + _ONE_BLOCK.size + data_len + main_len == end):
            return ((flags & BKPBLOCK_FORK_MASK, (spc, db, node)),), main_len
    refs: list[tuple[int, RelFile]] = []
    payload = 0
    main_len = 0
    last_id = -1
    rel: RelFile | None = None
    try:
        while pos < end - payload:
            block_id = buf[pos]
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                main_len = buf[pos + 1]
                pos += 2
                break
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                main_len = _U32.unpack_from(buf, pos + 1)[0]
                pos += 5
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                pos += 3
                continue
            if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                pos += 5
                continue
            if block_id > XLR_MAX_BLOCK_ID or block_id <= last_id:
                raise WalScanUncertain(f"record at {walnames.format_lsn(where)} has block id {block_id} "
                                       f"after {last_id}")
            last_id = block_id
            flags = buf[pos + 1]
            data_len = _U16.unpack_from(buf, pos + 2)[0]
            if bool(flags & BKPBLOCK_HAS_DATA) != (data_len > 0):
                raise WalScanUncertain(f"record at {walnames.format_lsn(where)} has inconsistent block data flags")
            payload += data_len
            pos += 4
            if flags & BKPBLOCK_HAS_IMAGE:
                bimg_len = _U16.unpack_from(buf, pos)[0]
                bimg_info = buf[pos + 4]
                payload += bimg_len
                pos += 5
                if bimg_info & BKPIMAGE_HAS_HOLE and bimg_info & BKPIMAGE_COMPRESSED:
                    pos += 2
            if flags & BKPBLOCK_SAME_REL:
                if rel is None:
                    raise WalScanUncertain(f"record at {walnames.format_lsn(where)} reuses a relation it never named")
            else:
                rel = _RELFILE.unpack_from(buf, pos)
                pos += 12
            pos += 4
            refs.append((flags & BKPBLOCK_FORK_MASK, rel))
    except (IndexError, struct.error):
        raise WalScanUncertain(f"record at {walnames.format_lsn(where)} is cut short") from None
    if pos + payload + main_len != end:
        raise WalScanUncertain(f"record at {walnames.format_lsn(where)}: its parts add up to "
                               f"{pos + payload + main_len - base} bytes, not its length {tot_len}")
    return tuple(refs), main_len


@dataclass(frozen=True)
class Record:
    """One WAL record: where it starts, its resource manager and info byte, and the
    (fork, relation file) of each of its block references."""

    lsn: int
    rmid: int
    info: int
    xid: int
    blocks: tuple[tuple[int, RelFile], ...]
    main_data: bytes = b""


#: Resource managers whose records are read down to their block references: those that can
#: change a table's rows (XLOG full-page images, heap, generic WAL), sequences (an
#: extension's configuration sequence has its value in the schema dump), SMGR and the
#: relation map. The others (transactions, index access methods, ...) name no table's file:
#: every row, a catalog's included, lives in a heap (or its TOAST heap), and an index's
#: entries change only with their heap's rows. A resource manager id that is neither built
#: in nor in the custom range is refused.
DETAILED = frozenset({RM_XLOG, RM_SMGR, RM_RELMAP, RM_STANDBY, RM_HEAP2, RM_HEAP, RM_SEQ, 20})
RM_MIN_CUSTOM = 128

_Raw = tuple[int, int, int, int, tuple[tuple[int, RelFile], ...], bytes]


def _walk(source: SegmentSource, start: int, end: int, seg_size: int, everything: bool) -> Iterator[_Raw]:
    """(lsn, rmid, info, xid, block references, main data) of each record in ``[start, end)``.
    Block references (and, for SMGR and standby records, main data) are read for the
    :data:`DETAILED` and custom resource managers, or for all with ``everything``."""
    if start > end:
        raise WalScanUncertain(f"the WAL range {walnames.format_lsn(start)}..{walnames.format_lsn(end)} is reversed")
    if seg_size & (seg_size - 1):
        raise WalScanUncertain(f"WAL segment size {seg_size} is not a power of two")
    walker = _Walker(source, seg_size)
    unpack_record = _RECORD.unpack_from
    unpack_u32 = _U32.unpack_from
    crc = crc32c
    detailed = DETAILED
    lsn, prev = start, -1
    segno, seg, seg_end = -1, b"", -1
    while lsn < end:
        page_off = lsn & (BLCKSZ - 1)
        if page_off <= LONG_PHD or lsn == start:
            page = lsn - page_off
            header = walker.header_size(page)
            if page_off < header:
                raise WalScanUncertain(f"{walnames.format_lsn(lsn)} is not a record position")
            info_page = walker.check_page(page)
            if page_off == header and info_page & XLP_FIRST_IS_CONTRECORD:
                raise WalScanUncertain(f"WAL page at {walnames.format_lsn(page)} continues a record that had ended")
        if lsn >= seg_end:
            segno = lsn // seg_size
            seg = walker.segment(segno)
            seg_end = (segno + 1) * seg_size
        off = lsn & (seg_size - 1)
        if page_off + RECORD_HEADER <= BLCKSZ:
            tot_len, xid, xl_prev, info, rmid, xl_crc = unpack_record(seg, off)
        else:
            tot_len = unpack_u32(seg, off)[0]
        if tot_len < RECORD_HEADER or tot_len > 0x3FFFFFFF:
            raise WalScanUncertain(f"record at {walnames.format_lsn(lsn)} claims a length of {tot_len}")
        if page_off + tot_len <= BLCKSZ:
            buf, base, after = seg, off, lsn + tot_len
        else:
            buf, after = _read_record(walker, lsn, tot_len, BLCKSZ - page_off)
            base = 0
            seg = walker.seg if walker.segno == segno else walker.segment(segno)
            tot_len, xid, xl_prev, info, rmid, xl_crc = unpack_record(buf, 0)
        if prev >= 0 and xl_prev != prev:
            raise WalScanUncertain(f"record at {walnames.format_lsn(lsn)} points back to "
                                   f"{walnames.format_lsn(xl_prev)}, not to {walnames.format_lsn(prev)}")
        if RM_MAX_BUILTIN < rmid < RM_MIN_CUSTOM:
            raise WalScanUncertain(f"record at {walnames.format_lsn(lsn)} has unknown resource manager {rmid}")
        if crc(buf[base + RECORD_HEADER:base + tot_len] + buf[base:base + XL_CRC_OFFSET]) != xl_crc:
            following = (after + 7) & ~7
            raise WalRecordDamaged(lsn, following + (walker.header_size(following)
                                                     if not following & (BLCKSZ - 1) else 0))
        if everything or rmid in detailed or rmid >= RM_MIN_CUSTOM:
            refs, main_len = _block_refs(buf, base, tot_len, lsn)
            main = bytes(buf[base + tot_len - main_len:base + tot_len]) \
                if rmid in (RM_SMGR, RM_STANDBY, RM_RELMAP) else b""
        else:
            refs, main = (), b""
        yield lsn, rmid, info, xid, refs, main
        prev = lsn
        if rmid == RM_XLOG and info & 0xF0 == XLOG_SWITCH:
            lsn = (lsn // seg_size + 1) * seg_size + LONG_PHD
            continue
        lsn = (after + 7) & ~7
        if not lsn & (BLCKSZ - 1):
            lsn += walker.header_size(lsn)
    if lsn != end:
        raise WalScanUncertain(f"the records end at {walnames.format_lsn(lsn)}, not at {walnames.format_lsn(end)}")


def records(source: SegmentSource, start: int, end: int,
            seg_size: int = walnames.DEFAULT_SEGMENT_SIZE) -> Iterator[Record]:
    """Every record starting in ``[start, end)`` with all its block references, checked as
    the module docstring says; raises :class:`WalScanUncertain` (or the source's own error)
    when that is not possible. ``main_data`` is filled for SMGR, standby and relation map records only."""
    for raw in _walk(source, start, end, seg_size, True):
        yield Record(*raw)


def changes_rows(rmid: int, info: int) -> bool:
    """Whether a record may change the rows of the relations it references: all but the
    :data:`ROW_PRESERVING` kinds of the built-in resource managers."""
    return rmid > RM_MAX_BUILTIN or (rmid, info & 0xF0) not in ROW_PRESERVING


Seen = Callable[[RelFile], None]
"""Told each relation file as the scan first finds it touched, while it reads on (its answer
stands only once the scan has ended without an error)."""


def scan(source: SegmentSource, start: int, end: int, seg_size: int = walnames.DEFAULT_SEGMENT_SIZE,
         from_xid: int | None = None, seen: Seen | None = None) -> ScanResult:
    """The relation files whose rows the records in ``[start, end)`` may have changed:
    main-fork block references of row-changing records, and the relations SMGR create and
    truncate records name; and what :class:`ScanResult` says of every record besides (the
    relation files written, relation map updates, restarts). With ``from_xid``, only records
    of that transaction id or a later one count (32-bit ids compared as PostgreSQL does,
    modulo 2^32). ``seen`` is called with each touched file as it is found. Raises
    :class:`WalScanUncertain` when not certain."""
    touched: set[RelFile] = set()
    written: set[RelFile] = set()
    inplace: set[RelFile] = set()
    relmaps: set[int] = set()
    restarted = False

    def touch(rel: RelFile) -> None:
        if rel not in touched:
            touched.add(rel)
            if seen is not None:
                seen(rel)
    count = 0
    loaded: set[int] = set()

    def counting(segno: int) -> bytes:
        loaded.add(segno)
        return source(segno)

    preserving = ROW_PRESERVING
    for lsn, rmid, info, xid, refs, main in _walk(counting, start, end, seg_size, False):
        count += 1
        if not refs and rmid != RM_SMGR and rmid != RM_XLOG and rmid != RM_RELMAP:
            continue
        if from_xid is not None and not _xid_at_or_after(xid, from_xid):
            continue
        kind = info & 0xF0
        if refs and (rmid, kind) not in preserving:
            into = inplace if rmid == RM_HEAP and kind == XLOG_HEAP_INPLACE else written
            for fork, rel in refs:
                into.add(rel)
                if fork == MAIN_FORK and rel not in touched:
                    touch(rel)
        if rmid == RM_SMGR and kind in (XLOG_SMGR_CREATE, XLOG_SMGR_TRUNCATE):
            rel = _smgr_relation(main, kind, lsn)
            touch(rel)
            if kind == XLOG_SMGR_CREATE:
                written.add(rel)
        elif rmid == RM_RELMAP and kind == XLOG_RELMAP_UPDATE:
            relmaps.add(_relmap_database(main, lsn))
        elif rmid == RM_XLOG and kind in (XLOG_CHECKPOINT_SHUTDOWN, XLOG_END_OF_RECOVERY):
            restarted = True
        elif rmid == RM_XLOG and kind == XLOG_OVERWRITE_CONTRECORD:
            raise WalScanUncertain(f"record at {walnames.format_lsn(lsn)} overwrites a lost record")
    return ScanResult(frozenset(touched), count, len(loaded), written=frozenset(written),
                      inplace=frozenset(inplace), relmaps=frozenset(relmaps), restarted=restarted)


def _relmap_database(main: bytes, where: int) -> int:
    """The database (0: shared) of a relation map update (xl_relmap_update: dbid, tsid, nbytes, map)."""
    if len(main) < 12:
        raise WalScanUncertain(f"relation map record at {walnames.format_lsn(where)} is too short")
    dbid: int = _U32.unpack_from(main, 0)[0]
    return dbid


def _xid_at_or_after(xid: int, first: int) -> bool:
    """TransactionIdFollowsOrEquals(xid, first) for normal 32-bit xids (0-2 are not)."""
    return xid >= 3 and ((xid - first) & 0xFFFFFFFF) < 0x80000000


def first_record(source: SegmentSource, segno: int, seg_size: int) -> int:
    """The LSN of the first record that starts in segment ``segno``: past the rest of a
    record continued from the segment before (``xlp_rem_len`` of each page it covers)."""
    walker = _Walker(source, seg_size)
    lsn = segno * seg_size
    info = walker.check_page(lsn)
    rem = _U32.unpack_from(walker.seg, 16)[0] if info & XLP_FIRST_IS_CONTRECORD else 0
    lsn += LONG_PHD
    while rem:
        room = BLCKSZ - lsn % BLCKSZ
        if rem <= room:
            lsn += rem
            break
        rem -= room
        lsn += room
        info = walker.check_page(lsn)
        page_rem = _U32.unpack_from(walker.seg, lsn % seg_size + 16)[0]
        if not info & XLP_FIRST_IS_CONTRECORD or page_rem != rem:
            raise WalScanUncertain(f"WAL page at {walnames.format_lsn(lsn)} does not continue the record "
                                   f"before it as expected")
        lsn += walker.header_size(lsn)
    lsn = _maxalign(lsn)
    if lsn % BLCKSZ == 0:
        lsn += walker.header_size(lsn)
    return lsn


def last_record_page(segment: bytes, segno: int, seg_size: int) -> int | None:
    """The LSN of the last page of segment ``segno`` (its whole content ``segment``) on which
    a record may begin, from page headers alone: a record running past the segment's end
    begins on it or on no later page (every page after the one it begins on is all
    continuation: ``XLP_FIRST_IS_CONTRECORD`` with more left than the page holds). Pages of
    zeros at the end (after an ``XLOG_SWITCH``) are passed over. None when a page header is
    neither valid nor zero, or no page has room for a record to begin."""
    if len(segment) != seg_size:
        return None
    for off in range(seg_size - BLCKSZ, -1, -BLCKSZ):
        magic, info, _tli, pageaddr, rem = _PAGE.unpack_from(segment, off)
        page = segno * seg_size + off
        if magic == 0 and pageaddr == 0 and not segment[off:off + SHORT_PHD].strip(b"\0"):
            continue
        if magic != PAGE_MAGIC or pageaddr != page:
            return None
        header = LONG_PHD if off == 0 else SHORT_PHD
        if not info & XLP_FIRST_IS_CONTRECORD or header + _maxalign(rem) < BLCKSZ:
            return page
    return None


def running_xacts_next_xid(record: Record) -> int | None:
    """``nextXid`` of an XLOG_RUNNING_XACTS record (None for other records)."""
    if record.rmid != RM_STANDBY or record.info & 0xF0 != XLOG_RUNNING_XACTS:
        return None
    if len(record.main_data) < 24:
        raise WalScanUncertain(f"running-transactions record at {walnames.format_lsn(record.lsn)} is too short")
    next_xid: int = _U32.unpack_from(record.main_data, 12)[0]
    return next_xid


def start_before(source: SegmentSource, start: int, first_xid: int, seg_size: int,
                 max_segments: int = MAX_SEGMENTS_BACK) -> int:
    """A record position before ``start`` from which every record of transaction
    ``first_xid`` (32 bits) and of every later one lies ahead: the latest XLOG_RUNNING_XACTS
    record whose ``nextXid`` is not after it. The server writes that record while holding
    the lock that assigns xids, so no xid at or beyond its ``nextXid`` wrote before it.
    Raises :class:`WalScanUncertain` when none is found within ``max_segments``."""
    window_end = start
    segno = start // seg_size
    for _ in range(max_segments):
        if segno < 0:
            break
        begin = first_record(source, segno, seg_size)
        if begin < window_end:
            found = None
            for record in records(source, begin, window_end, seg_size):
                next_xid = running_xacts_next_xid(record)
                if next_xid is not None and _xid_at_or_after(first_xid, next_xid):
                    found = record.lsn
            if found is not None:
                return found
            window_end = begin
        segno -= 1
    raise WalScanUncertain(f"no record of the running transactions before transaction {first_xid} began was found "
                           f"within {max_segments} segments before {walnames.format_lsn(start)}")


def _read_record(walker: _Walker, lsn: int, tot_len: int, first: int) -> tuple[bytes, int]:
    """A record crossing pages: its first ``first`` bytes, then each continuation page whose
    header must say how much of the record remains."""
    seg = walker.segment(lsn // walker.seg_size)
    off = lsn % walker.seg_size
    parts = [seg[off:off + first]]
    remaining = tot_len - first
    pos = lsn + first
    while remaining > 0:
        info = walker.check_page(pos)
        page = walker.seg
        poff = pos % walker.seg_size
        rem = _U32.unpack_from(page, poff + 16)[0]
        if not info & XLP_FIRST_IS_CONTRECORD or rem != remaining:
            raise WalScanUncertain(f"WAL page at {walnames.format_lsn(pos)} does not continue the record at "
                                   f"{walnames.format_lsn(lsn)} ({remaining} bytes expected, the page says {rem})")
        hdr = walker.header_size(pos)
        take = min(BLCKSZ - hdr, remaining)
        parts.append(page[poff + hdr:poff + hdr + take])
        remaining -= take
        pos += hdr + take
    return b"".join(parts), pos


def _smgr_relation(main: bytes, kind: int, where: int) -> RelFile:
    """The relation an SMGR create (rnode, fork) or truncate (blkno, rnode, flags) names."""
    size, offset = (16, 0) if kind == XLOG_SMGR_CREATE else (20, 4)
    if len(main) != size:
        raise WalScanUncertain(f"SMGR record at {walnames.format_lsn(where)} has {len(main)} bytes of data, "
                               f"not the {size} its kind has")
    rel: RelFile = _RELFILE.unpack_from(main, offset)
    return rel


# --------------------------------------------------------------------------- archived segments

ARCHIVE_POLL_SECONDS = 0.1
#: Segments loaded ahead of the scan (each up to a segment's size in memory).
PREFETCH_SEGMENTS = 2


def _from_cluster(data: bytes | bytearray | mmap.mmap, name: str, span: walnames.WalSpan, where: str) -> None:
    header = walnames.parse_long_header(bytes(data[:walnames.LONG_HEADER_SIZE]))
    if header is None or header.system_identifier != span.system_identifier \
            or header.segment_size != span.segment_size or header.block_size != BLCKSZ:
        raise WalScanUncertain(f"{where} {name} does not come from this cluster "
                               f"(system identifier {span.system_identifier})")


def archive_source(storage: Storage, span: walnames.WalSpan) -> SegmentSource:
    """Segments of the span's timeline read from the repository's WAL archive, verified as
    ``wal fetch`` verifies them, and checked to come from the span's cluster; a segment that
    is not archived makes the scan uncertain."""
    def load(segno: int) -> bytes:
        name = walnames.segment_name(span.timeline, segno, span.segment_size)
        try:
            obj = wal.open_archived(storage, name)
        except wal.WalMissingError:
            raise WalScanUncertain(f"{name} is not in the WAL archive") from None
        return _archived_content(storage, obj, span)
    return load


def _archived_content(storage: Storage, obj: wal.WalFile, span: walnames.WalSpan) -> bytes:
    data = bytearray()
    for chunk in wal.read_archived(storage, obj):
        data += chunk
    _from_cluster(data, obj.name, span, "archived")
    return data  # type: ignore[return-value]  # a bytearray reads like bytes, without a copy


LiveSource = Callable[[str, "list[tuple[int, int]]"], "list[bytes] | None"]
"""The bytes of WAL segment ``name`` in each ``[start, stop)`` of a list of ranges, read at
once from the server's own ``pg_wal`` directory (``live(name, ranges)``), or None when the
file is not there or may have been recycled while it was read. The caller guarantees the
server has flushed its WAL through the span's end before the first call."""


@dataclass
class _Origins:
    """Which segments came from where (added to from the loading threads)."""

    archived: set[int] = field(default_factory=set)
    live: set[int] = field(default_factory=set)


def _pages_mismatch(data: bytes | mmap.mmap, segno: int, seg_size: int, ranges: tuple[range, ...]) -> str | None:
    """Why the pages of ``data`` (a segment's content) in ``ranges`` are not segment
    ``segno``'s, or None: each page must carry the magic and its own address, or be all
    zeros (the rest of a segment after a WAL switch). Pure."""
    base = segno * seg_size
    zero = bytes(SHORT_PHD)
    for pages in ranges:
        for off in pages:
            magic, _info, _tli, pageaddr, _rem = _PAGE.unpack_from(data, off)
            if magic == PAGE_MAGIC and pageaddr == base + off:
                continue
            if data[off:off + SHORT_PHD] == zero and not any(data[off:off + BLCKSZ]):
                continue
            return (f"its page at {walnames.format_lsn(base + off)} has magic {magic:#x} and address "
                    f"{walnames.format_lsn(pageaddr)}")
    return None


def server_source(storage: Storage, span: walnames.WalSpan, live: LiveSource, origins: _Origins,
                  local_first: bool = True) -> SegmentSource:
    """Each segment read from the server's ``pg_wal`` when it is there and its pages are the
    segment's (each page's address checked), else from the archive (verified as ``wal fetch``
    does); with ``local_first`` False, from the archive whenever it is there, and from
    ``pg_wal`` only the segments not archived yet (a segment not yet archived is never removed
    there), so no wait for the archiver either way. Of the segment holding the span's end only
    the pages up to it are read, and of the one holding its start (when no transaction is
    followed back before it) only its first page and the pages from the start on; the rest
    reads as zeros, which no page header check accepts, so a walk outside what was read can
    only make the scan uncertain. A segment that is neither in ``pg_wal`` (as itself) nor
    archived makes the scan uncertain."""
    size = span.segment_size
    end_segno = (span.end - 1) // size if span.end else 0
    start_segno = span.start // size
    start_page = span.start % size - span.start % BLCKSZ

    def from_server(segno: int, name: str) -> tuple[bytes | mmap.mmap | None, str]:
        stop = size
        if segno >= end_segno:
            stop = max(min(size, -(-(span.end - segno * size) // BLCKSZ) * BLCKSZ), BLCKSZ)
        start = start_page if segno == start_segno and not span.early_xids and start_page < stop else 0
        ranges = (range(0, BLCKSZ, BLCKSZ), range(start, stop, BLCKSZ)) if start else (range(0, stop, BLCKSZ),)
        got = live(name, [(pages.start, pages.stop) for pages in ranges])
        if got is None:
            return None, "it is not there"
        if len(got) != len(ranges):
            return None, f"it gave {len(got)} pieces, not {len(ranges)}"
        for pages, piece in zip(ranges, got, strict=True):
            if len(piece) != len(pages) * BLCKSZ:
                return None, f"it gave {len(piece)} bytes from {pages.start}, not {len(pages) * BLCKSZ}"
        data: bytes | mmap.mmap
        if len(got) == 1 and len(got[0]) == size:
            data = got[0]
        else:
            data = mmap.mmap(-1, size)  # pages never written read as zeros, without being allocated
            for pages, piece in zip(ranges, got, strict=True):
                data[pages.start:pages.stop] = piece
        mismatch = _pages_mismatch(data, segno, size, ranges)
        if mismatch is not None:
            return None, mismatch
        try:
            _from_cluster(data, name, span, "pg_wal/")
        except WalScanUncertain as exc:
            return None, str(exc)
        return data, ""

    def from_archive(segno: int, name: str) -> bytes | None:
        found = wal.find_archived(storage, name)
        if not found:
            return None
        if len({f.sha256 for f in found}) > 1:
            raise WalScanUncertain(f"{name} is archived more than once with different content")
        origins.archived.add(segno)
        return _archived_content(storage, found[0], span)

    def load(segno: int) -> bytes:
        name = walnames.segment_name(span.timeline, segno, size)
        if not local_first:
            archived = from_archive(segno, name)
            if archived is not None:
                return archived
        data, why = from_server(segno, name)
        if data is not None:
            origins.live.add(segno)
            return data  # type: ignore[return-value]  # an mmap reads like bytes
        archived = from_archive(segno, name)
        if archived is not None:
            return archived
        if why == "it is not there":
            raise WalScanUncertain(f"{name} is neither in the WAL archive nor in the server's pg_wal")
        raise WalScanUncertain(f"{name} is not in the WAL archive, and pg_wal/{name} is not that segment: {why}")
    return load


def _recent(source: SegmentSource, keep: int = 2) -> SegmentSource:
    """``source`` remembering the last ``keep`` segments it returned (the backward search
    reads a segment again right after finding where its first record starts)."""
    cache: dict[int, bytes] = {}

    def load(segno: int) -> bytes:
        if segno not in cache:
            if len(cache) >= keep:
                del cache[next(iter(cache))]
            cache[segno] = source(segno)
        return cache[segno]
    return load


class _Prefetch:
    """``source`` with the span's segments loaded ahead of the walk, ``ahead`` at a time on
    other threads (fetching, decompressing and hashing a segment mostly releases the GIL, so
    it overlaps the scan of the one before). The first is asked for alone, the next ones once
    the walk asks for it, so a source serving one request at a time (the server's ``pg_wal``
    over one connection) starts with it. Each segment is loaded at most once ahead; segments
    outside ``needed`` (the backward search) are loaded when asked for."""

    def __init__(self, source: SegmentSource, needed: range, ahead: int = PREFETCH_SEGMENTS) -> None:
        self.source = source
        self.needed = needed
        self.ahead = ahead
        self.pool = ThreadPoolExecutor(ahead, thread_name_prefix="wal-prefetch")
        self.futures: dict[int, Future[bytes]] = {}
        self.submitted: set[int] = set()
        self._submit_from(needed.start, 0)

    def _submit_from(self, segno: int, ahead: int) -> None:
        for n in range(segno, segno + ahead + 1):
            if n in self.needed and n not in self.submitted:
                self.submitted.add(n)
                self.futures[n] = self.pool.submit(self.source, n)

    def __call__(self, segno: int) -> bytes:
        self._submit_from(segno + 1, self.ahead)
        future = self.futures.pop(segno, None)
        return future.result() if future is not None else self.source(segno)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.futures.clear()


def segments_needed(start: int, end: int, seg_size: int) -> range:
    """Numbers of the segments holding the record bytes of ``[start, end)`` (an ``end``
    just past a page header needs nothing of that page)."""
    if end <= start:
        return range(0)
    last_byte = end - 1
    page = end - end % BLCKSZ
    if end - page == (LONG_PHD if page % seg_size == 0 else SHORT_PHD) and page > start:
        last_byte = page - 1
    return range(start // seg_size, last_byte // seg_size + 1)


def _archived(storage: Storage, name: str) -> bool:
    try:
        wal.open_archived(storage, name)
        return True
    except wal.WalMissingError:
        return False


def relations_written(storage: Storage, span: walnames.WalSpan, wait_seconds: float,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep, live: LiveSource | None = None,
                      seen: Seen | None = None) -> ScanResult:
    """:func:`scan` of the span from the archive, only when the archive says it is this
    cluster's (``wal push`` recorded its identity). With ``live`` (the server's ``pg_wal``,
    flushed through the span's end), each segment still there is read there (those archived
    too: a local read instead of a download), the rest from the archive, and nothing is
    waited for; should that give no answer, the span is read again with each segment taken
    from the archive wherever it is there (pg_wal only for those not archived yet), so a
    file in pg_wal never makes the answer worse than the archive's. Without ``live`` the
    span's segments may still be on their way to the archive (the caller just asked the
    server to switch; ``wal push`` may store them in any order): they are waited for up to
    ``wait_seconds``. ``seen``: see :func:`scan`."""
    needed = segments_needed(span.start, span.end, span.segment_size)
    if not needed:
        return ScanResult(frozenset(), 0, 0)
    def this_clusters() -> None:
        identity = walidentity.read_archive_identity(storage)
        if identity is None or identity.system_identifier != span.system_identifier:
            raise WalScanUncertain("the repository holds no WAL archive of this cluster")
    if live is None:
        this_clusters()
        _wait_archived(storage, span, needed, wait_seconds, clock, sleep)
        return _read_span(span, needed, archive_source(storage, span), _Origins(), seen)
    origins = _Origins()
    try:
        return _read_span(span, needed, server_source(storage, span, live, origins), origins, seen, this_clusters)
    except WalScanUncertain:
        if not origins.live:
            raise
    origins = _Origins()
    return _read_span(span, needed, server_source(storage, span, live, origins, local_first=False), origins, seen,
                      this_clusters)


def _read_span(span: walnames.WalSpan, needed: range, source: SegmentSource, origins: _Origins,
               seen: Seen | None, meanwhile: Callable[[], None] = lambda: None) -> ScanResult:
    """:func:`scan` of the span (and back to where its early transactions began) from
    ``source``, which records in ``origins`` where it read each segment; ``meanwhile`` is
    called once the first segments are being loaded (on other threads), before the scan."""
    loader = _Prefetch(source, needed)
    try:
        meanwhile()
        recent = _recent(loader)
        result = scan(recent, span.start, span.end, span.segment_size, seen=seen)
        if span.early_xids:
            first = min(span.early_xids) & 0xFFFFFFFF
            begin = start_before(recent, span.start, first, span.segment_size)
            early = scan(recent, begin, span.start, span.segment_size, from_xid=first, seen=seen)
            result = result.merged(early)
    except WalRecordDamaged as exc:
        served = frozenset(origins.live)
        kind = WalScanUncertain if at_end_of_written_wal(exc, span, served) else WalSegmentDamaged
        raise kind(damaged_record_reason(exc, span, served)) from None
    finally:
        loader.close()
    return replace(result, from_server=len(origins.live))


def at_end_of_written_wal(damaged: WalRecordDamaged, span: walnames.WalSpan, from_server: frozenset[int]) -> bool:
    """Whether the damaged record is the last of the WAL read from the server (one still being
    written, as PostgreSQL takes it) rather than inside a finished segment. Pure."""
    last = max(damaged.following - 1, damaged.lsn) // span.segment_size
    return damaged.following >= span.end and last in from_server


def damaged_record_reason(damaged: WalRecordDamaged, span: walnames.WalSpan, from_server: frozenset[int]) -> str:
    """What a record failing its CRC check means, given the numbers of the segments read from
    the server's ``pg_wal``. Pure.

    The last record of the WAL read from the server (the one the span's end follows, or that
    claims to run past it) may still have been being written: there, as for PostgreSQL, the
    WAL ends, so the span is not all there. Anywhere else the record was complete when read
    (a later one follows it, or its segment is archived, which the server does only to a
    finished segment): the segment holding it is damaged. Either way the scan gives no answer."""
    size = span.segment_size
    at = walnames.format_lsn(damaged.lsn)
    segnos = range(damaged.lsn // size, max(damaged.following - 1, damaged.lsn) // size + 1)
    if at_end_of_written_wal(damaged, span, from_server):
        return (f"the WAL the server has written ends at {at}: its last record fails its CRC check, as one still "
                f"being written does (PostgreSQL takes that as the end of WAL), short of "
                f"{walnames.format_lsn(span.end)}")
    places = ", ".join(("pg_wal/" if n in from_server else "archived WAL segment ")
                       + walnames.segment_name(span.timeline, n, size) for n in segnos)
    return f"{places} {'is' if len(segnos) == 1 else 'are'} damaged: {damaged}"


def _wait_archived(storage: Storage, span: walnames.WalSpan, needed: range, wait_seconds: float,
                   clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    missing = [walnames.segment_name(span.timeline, n, span.segment_size) for n in needed]
    deadline = clock() + wait_seconds
    while True:
        missing = [name for name in missing if not _archived(storage, name)]
        if not missing:
            return
        if clock() >= deadline:
            raise WalScanUncertain(f"{missing[0]} was not archived within {wait_seconds:g} s")
        sleep(ARCHIVE_POLL_SECONDS)


def changed_relations(storage: Storage, span: walnames.WalSpan, wait_seconds: float,
                      live: LiveSource | None = None, seen: Seen | None = None) -> walnames.WalChanges:
    """The incremental backup's WAL reader (:data:`backup_tool.logical.backup.ChangeSource`)."""
    result = relations_written(storage, span, wait_seconds, live=live, seen=seen)
    return walnames.WalChanges(result.touched, result.segments, result.from_server,
                               walnames.CatalogEvidence(result.written, result.inplace, result.relmaps,
                                                        result.restarted))
