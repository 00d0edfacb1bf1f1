"""Data page checksums, verified while a direct base backup copies the cluster, as
PostgreSQL's own base backup (``basebackup.c``) verifies them for pg_basebackup.

Guaranteed to match PostgreSQL's verdict page for page:

- Which files: relation files (:func:`relation_segment`: ``<relfilenode>[_fsm|_vm|_init][.<segno>]``)
  directly under ``global/`` or ``base/<db>/``, as PostgreSQL 17+'s
  ``parse_filename_for_nontemp_relation`` reads them (15's ``is_checksummed_file`` differs
  only on stray files there). Never ``pg_control``, ``pg_filenode.map``, ``PG_VERSION``,
  ``pg_internal.init`` (they are not relation files).
- Which pages: every whole page, except new pages (``pd_upper`` 0, no checksum yet) and
  pages whose ``pd_lsn`` is at or after the backup's start LSN (written during the copy,
  possibly torn; WAL replay from the start rewrites them).
- The checksum: ``pg_checksum_page`` of ``checksum_impl.h`` (32 FNV-1a-like lanes over the
  page's native-order 32-bit words with ``pd_checksum`` zeroed, two rounds of zeros, the
  lanes XOR-folded, the block number XORed in, ``% 65535 + 1``), computed with numpy over
  all candidate pages of a piece at once. The block number counts the segment's blocks
  in: ``segno * RELSEG_SIZE + block``.
- A mismatching page is read again once (a read torn by a concurrent write) and counted as
  a failure only if it still mismatches; the re-read page is what gets stored, as in
  PostgreSQL (unless it straddles two pieces of the copy: WAL replay rewrites a page torn
  there anyway). A page that is gone on the re-read (the file was truncated) is no failure.

This module imports numpy; only direct base backups of clusters with data checksums load it.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

N_SUMS = 32
FNV_PRIME = np.uint32(16777619)
BASE_OFFSETS = np.array([
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
], dtype=np.uint32)
# pd_checksum is the first uint16 of the page's third 32-bit word (bytes 8-9).
CHECKSUM_WORD = 2
CHECKSUM_KEEP = np.uint32(0xFFFF0000 if sys.byteorder == "little" else 0x0000FFFF)
RELATION_SEGMENT = re.compile(r"^([1-9]\d{0,9})(?:_(?:fsm|vm|init))?(?:\.(\d+))?$")

Words = npt.NDArray[np.uint32]


def relation_segment(path: str) -> int | None:
    """The segment number of ``path`` (relative to the data directory) if PostgreSQL's
    base backup verifies its pages, else None."""
    parent, _, name = path.rpartition("/")
    head, _, last = parent.rpartition("/")
    if not (parent == "global" or (head == "base" and last.isdigit())):
        return None
    m = RELATION_SEGMENT.match(name)
    if m is None or int(m.group(1)) > 0xFFFFFFFF:
        return None
    return int(m.group(2)) if m.group(2) else 0


def page_checksums(words: Words, blocks: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint16]:
    """``pg_checksum_page`` of each page: ``words`` is (pages, block_size / 4) native-order
    words, ``blocks`` each page's block number. The pages are not modified."""
    pages, per_page = words.shape
    lanes = words.reshape(pages, per_page // N_SUMS, N_SUMS)
    sums = np.empty((pages, N_SUMS), dtype=np.uint32)
    sums[:] = BASE_OFFSETS
    tmp = np.empty_like(sums)
    first = lanes[:, 0, :].copy()
    first[:, CHECKSUM_WORD] &= CHECKSUM_KEEP
    for row in range(per_page // N_SUMS):
        np.bitwise_xor(sums, first if row == 0 else lanes[:, row, :], out=tmp)
        np.multiply(tmp, FNV_PRIME, out=sums)
        np.right_shift(tmp, 17, out=tmp)
        np.bitwise_xor(sums, tmp, out=sums)
    for _ in range(2):
        np.multiply(sums, FNV_PRIME, out=tmp)
        np.right_shift(sums, 17, out=sums)
        np.bitwise_xor(tmp, sums, out=sums)
    folded = np.bitwise_xor.reduce(sums, axis=1)
    folded ^= blocks
    return (folded % np.uint32(65535) + np.uint32(1)).astype(np.uint16)


@dataclass(frozen=True)
class Failure:
    """A page that failed verification twice: its block number within the relation
    (``segno * RELSEG_SIZE`` counted in), the checksum computed and the one on the page."""

    block: int
    calculated: int
    stored: int


@dataclass(frozen=True)
class PieceCheck:
    """What verifying one piece found: pages checksummed, failures, and whether the file
    ends in a partial page (its listed size is no multiple of the page size; not verified)."""

    verified: int
    failures: tuple[Failure, ...]
    partial_tail: bool = False


@dataclass(frozen=True)
class PageVerifier:
    """Verifies pages of one backup: ``start_lsn`` from ``pg_backup_start``, the server's
    ``block_size`` and ``segment_blocks`` (RELSEG_SIZE)."""

    start_lsn: int
    block_size: int = 8192
    segment_blocks: int = 131072

    def _candidates(self, pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.intp]:
        """Indexes of the pages to checksum: not new, last written before the backup started."""
        words = pages.view(np.uint32)
        lsn = (words[:, 0].astype(np.uint64) << np.uint64(32)) | words[:, 1]
        upper = pages.view(np.uint16)[:, 7]
        return np.flatnonzero((upper != 0) & (lsn < np.uint64(self.start_lsn)))

    def bad_pages(self, pages: npt.NDArray[np.uint8], first_block: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(pages checksummed, [(index, calculated, stored)] of those that fail) among
        ``pages`` ((n, block_size) bytes), the first being block ``first_block``."""
        idx = self._candidates(pages)
        if not len(idx):
            return 0, []
        chosen = pages if len(idx) == len(pages) else pages[idx]
        blocks = (idx + first_block).astype(np.uint32)
        calculated = page_checksums(chosen.view(np.uint32), blocks)
        stored = chosen.view(np.uint16)[:, 4]
        wrong = np.flatnonzero(calculated != stored)
        return len(idx), [(int(idx[i]), int(calculated[i]), int(stored[i])) for i in wrong]

    def check(self, fd: int, data: memoryview, name: str, offset: int, last: bool) -> PieceCheck | None:
        """Verify the pages starting within ``data`` (the bytes of the file ``name`` read
        from ``fd`` at ``offset``; writable, re-read pages are put back into it); None if
        ``name`` is no relation file. A page running past the end of ``data`` is completed
        by reading the rest of it, unless ``last`` (the file's last piece: a partial page at
        the listed end is reported, not verified)."""
        segno = relation_segment(name)
        if segno is None:
            return None
        bs = self.block_size
        first_page = -(-offset // bs)
        start = first_page * bs - offset
        whole = max(0, (len(data) - start) // bs)
        base_block = segno * self.segment_blocks + first_page
        failures: list[Failure] = []
        verified = 0
        if whole:
            pages = np.frombuffer(data, dtype=np.uint8, count=whole * bs, offset=start).reshape(whole, bs)
            verified, bad = self.bad_pages(pages, base_block)
            for i, calculated, stored in bad:
                failure = self._recheck(fd, (first_page + i) * bs, base_block + i, calculated, stored,
                                        data[start + i * bs:start + (i + 1) * bs])
                if failure is not None:
                    failures.append(failure)
        tail_at = start + whole * bs
        tail = len(data) - tail_at if start < len(data) else 0
        partial = False
        if tail > 0:
            if last:
                partial = True
            else:
                rest = os.pread(fd, bs - tail, offset + len(data))
                if len(rest) == bs - tail:
                    page = bytes(data[tail_at:]) + rest
                    n, bad = self.bad_pages(np.frombuffer(page, dtype=np.uint8).reshape(1, bs), base_block + whole)
                    verified += n
                    for _, calculated, stored in bad:
                        failure = self._recheck(fd, (first_page + whole) * bs, base_block + whole, calculated,
                                                stored, None)
                        if failure is not None:
                            failures.append(failure)
        return PieceCheck(verified, tuple(failures), partial)

    def _recheck(self, fd: int, at: int, block: int, calculated: int, stored: int,
                 into: memoryview | None) -> Failure | None:
        """Read the page at file offset ``at`` again; a failure only if it still fails."""
        again = os.pread(fd, self.block_size, at)
        if len(again) < self.block_size:
            return None
        _, bad = self.bad_pages(np.frombuffer(again, dtype=np.uint8).reshape(1, self.block_size), block)
        if into is not None:
            into[:] = again
        if not bad:
            return None
        _, calculated, stored = bad[0]
        return Failure(block, calculated, stored)
