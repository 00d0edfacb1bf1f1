"""How a backup's per-table content checksums were computed, one vocabulary for every layer.

A manifest records its method (``checksum_method``); validation recomputes with the method the
backup used, so checksums stay comparable across tool versions. A manifest written before
methods were recorded used :attr:`ChecksumMethod.ROW_TEXT`. Both methods guarantee the same
thing: two tables whose checksums are equal hold the same multiset of rows' text forms (up to a
64-bit hash collision), whatever the order of their rows.
"""

from __future__ import annotations

from enum import StrEnum


class ChecksumMethod(StrEnum):
    ROW_TEXT = "row-text"
    """Sum of ``hashtextextended(row::text)``: every value through its output function."""
    TYPED_ROW = "typed-row"
    """Columns of types whose hash determines their text form are hashed natively, the rest
    through their text form; one keyed 64-bit hash per row (PostgreSQL 14 and later)."""

    @property
    def min_server_major(self) -> int:
        return 14 if self is ChecksumMethod.TYPED_ROW else 11


LEGACY_CHECKSUM_METHOD = ChecksumMethod.ROW_TEXT
"""The method of every manifest that does not name one."""


def checksum_method_for(server_major: int) -> ChecksumMethod:
    """The cheapest method a server of ``server_major`` computes. Pure."""
    return ChecksumMethod.TYPED_ROW if server_major >= ChecksumMethod.TYPED_ROW.min_server_major \
        else ChecksumMethod.ROW_TEXT
