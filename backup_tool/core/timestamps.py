"""Timestamps as the repository stores them: the one implementation every module uses.

Stored form: ISO 8601 in UTC with a ``Z`` suffix (``2026-11-25T02:00:00Z``, microseconds
when present). Reading accepts any ISO 8601 offset (``Z``/``z`` included) and takes a time
without zone as UTC; the result is always an aware UTC datetime.
"""

from __future__ import annotations

from datetime import datetime, timezone

UTC = timezone.utc


def utc_iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso(ts: datetime | None) -> str | None:
    """:func:`utc_iso`, passing None through (for optional fields)."""
    return None if ts is None else utc_iso(ts)


def parse_utc(text: str) -> datetime:
    """Inverse of :func:`utc_iso` for any ISO 8601 text; ValueError when it is not one."""
    ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
