"""Timestamps as the repository stores them: the one implementation every module uses.

Stored form: ISO 8601 in UTC with a ``Z`` suffix (``2026-11-25T02:00:00Z``, microseconds
when present). Reading accepts any ISO 8601 offset (``Z``/``z`` included) and takes a time
without zone as UTC; the result is always an aware UTC datetime.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from backup_tool.errors import UsageError

UTC = timezone.utc


def utc_iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso(ts: datetime | None) -> str | None:
    """:func:`utc_iso`, passing None through (for optional fields)."""
    return None if ts is None else utc_iso(ts)


def iso_seconds(ts: datetime | None) -> str | None:
    """The one style reports show times in: :func:`utc_iso` cut to the second
    (``2026-11-25T02:00:00Z``), None passed through."""
    return None if ts is None else ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_ISO_IN_TEXT = re.compile(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.\d+)?(?:Z|\+00:00|\+00)")


def seconds_in(text: str) -> str:
    """Every UTC timestamp inside ``text`` (a reason, a note) in the :func:`iso_seconds` style."""
    return _ISO_IN_TEXT.sub(r"\1T\2Z", text)


def parse_utc(text: str) -> datetime:
    """Inverse of :func:`utc_iso` for any ISO 8601 text; ValueError when it is not one."""
    ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def parse_ts(text: str, option: str = "--now") -> datetime:
    """The value of a command-line time option: ISO 8601 (``Z`` or an offset; none means UTC) as
    an aware UTC datetime; a UsageError naming ``option`` otherwise."""
    try:
        return parse_utc(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an ISO 8601 time",
                         "use e.g. 2026-11-25T14:02:00Z (a time without zone is UTC)") from None
