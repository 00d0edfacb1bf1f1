"""How a backup's per-table content checksums were computed, one vocabulary for every layer.

A manifest records its method (``checksum_method``); validation recomputes with the method the
backup used, so checksums stay comparable across tool versions. A manifest written before
methods were recorded used :attr:`ChecksumMethod.ROW_TEXT`. Every method guarantees the same
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
    TYPED_COLUMN = "typed-column"
    """Each column hashed on its own with a key of its position: the same native hashes as
    ``typed-row`` where they are a seeded function, every other value through its own output
    function (no row text to build and quote); the column hashes are combined per row and
    mixed by one more keyed hash (PostgreSQL 14 and later). About half the server CPU of
    ``typed-row`` on common tables."""

    @property
    def min_server_major(self) -> int:
        return 11 if self is ChecksumMethod.ROW_TEXT else 14


LEGACY_CHECKSUM_METHOD = ChecksumMethod.ROW_TEXT
"""The method of every manifest that does not name one."""


def checksum_method_for(server_major: int) -> ChecksumMethod:
    """The cheapest method a server of ``server_major`` computes. Pure."""
    return ChecksumMethod.TYPED_COLUMN if server_major >= ChecksumMethod.TYPED_COLUMN.min_server_major \
        else ChecksumMethod.ROW_TEXT
