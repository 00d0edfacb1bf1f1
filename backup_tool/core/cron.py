"""Cron expressions and the slots they define (pure: no clock, no I/O).

A *slot* is one moment a cron expression fires, read in a time zone (an IANA name) and
converted to UTC. Cron semantics are Vixie cron's: five fields (minute, hour, day of month,
month, day of week; names, ranges, lists and steps allowed, ``@daily``-style macros too); when
both day fields are restricted a day matching either one fires. Across a daylight-saving change
a wall-clock time that does not exist fires at the same instant an hour later, and a time that
occurs twice fires once (the first time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import TYPE_CHECKING, Mapping
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    pass

UTC = timezone.utc
MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
    ("month", 1, 12, MONTHS), ("day of week", 0, 7, DAYS))
SEARCH_DAYS = 4 * 366 + 1


# ----------------------------------------------------------------------------- cron


@dataclass(frozen=True)
class Cron:
    """A parsed five-field cron expression."""

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    def matches_date(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def _parse_value(token: str, lo: int, hi: int, names: Mapping[str, int], what: str) -> int:
    value = names.get(token.lower()) if names else None
    if value is None:
        if not token.isdigit():
            raise ValueError(f"{what}: {token!r} is not a number" + (" or a name" if names else ""))
        value = int(token)
    if not lo <= value <= hi:
        raise ValueError(f"{what}: {value} is outside {lo}-{hi}")
    return value


def _parse_field(text: str, lo: int, hi: int, names: Mapping[str, int], what: str) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{what}: bad step {step_text!r}")
            step = int(step_text)
        if rng == "*":
            start, end = lo, hi
        elif "-" in rng:
            a, _, b = rng.partition("-")
            start, end = _parse_value(a, lo, hi, names, what), _parse_value(b, lo, hi, names, what)
            if start > end:
                raise ValueError(f"{what}: range {rng!r} runs backwards")
        elif rng:
            start = _parse_value(rng, lo, hi, names, what)
            end = hi if step_text else start
        else:
            raise ValueError(f"{what}: empty item in {text!r}")
        values.update(range(start, end + 1, step))
    return values


def parse_cron(expr: str) -> Cron:
    """Parse a cron expression; ValueError says which field is wrong."""
    text = MACROS.get(expr.strip().lower(), expr.strip())
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"{len(parts)} fields instead of 5")
    sets = [_parse_field(p, lo, hi, names, what) for p, (what, lo, hi, names) in zip(parts, FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in sets[4])
    return Cron(expr=expr, minutes=tuple(sorted(sets[0])), hours=tuple(sorted(sets[1])),
                days=frozenset(sets[2]), months=frozenset(sets[3]), weekdays=weekdays,
                any_day=parts[2].startswith("*"), any_weekday=parts[4].startswith("*"))


def _day_slots(cron: Cron, d: date, zone: ZoneInfo) -> list[datetime]:
    if not cron.matches_date(d):
        return []
    found = {datetime.combine(d, time(h, m), zone).astimezone(UTC)
             for h in cron.hours for m in cron.minutes}
    return sorted(found)


def slots_between(expr: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """Every slot in [start, end), UTC, ascending."""
    cron, zone = parse_cron(expr), ZoneInfo(tz)
    day = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date() + timedelta(days=1)
    found: set[datetime] = set()
    while day <= last:
        found.update(s for s in _day_slots(cron, day, zone) if start <= s < end)
        day += timedelta(days=1)
    return sorted(found)


def previous_slot(expr: str, tz: str, now: datetime) -> datetime | None:
    """The newest slot at or before ``now`` (None if the expression has not fired for 4 years)."""
    if not expr:
        return None
    cron, zone = parse_cron(expr), ZoneInfo(tz)
    day = now.astimezone(zone).date() + timedelta(days=1)
    for _ in range(SEARCH_DAYS):
        earlier = [s for s in _day_slots(cron, day, zone) if s <= now]
        if earlier:
            return earlier[-1]
        day -= timedelta(days=1)
    return None


def next_slot(expr: str, tz: str, now: datetime) -> datetime | None:
    """The first slot strictly after ``now``."""
    if not expr:
        return None
    cron, zone = parse_cron(expr), ZoneInfo(tz)
    day = now.astimezone(zone).date() - timedelta(days=1)
    for _ in range(SEARCH_DAYS):
        later = [s for s in _day_slots(cron, day, zone) if s > now]
        if later:
            return later[0]
        day += timedelta(days=1)
    return None


def last_due_slot(expr: str, tz: str, now: datetime, grace: timedelta) -> datetime | None:
    """The newest slot whose grace period has fully elapsed by ``now``."""
    return previous_slot(expr, tz, now - grace)
