"""Timelines and archive coverage (pure): which timeline holds each position, and whether the
archived segments reach from a base backup's start to a target without a gap.

The one gap rule every command uses (``check``, ``status``, ``audit``, ``restore pitr``): a
segment is needed for every position on the path of timelines from the start to the target,
following the history files' switch points, and each missing one is a gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from backup_tool.core.walnames import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT_RE,
    lsn_segment,
    parse_lsn,
    segment_name,
    segment_number,
    segment_timeline,
)
from backup_tool.repository.walarchive import WalSegment

if TYPE_CHECKING:

    pass


# --------------------------------------------------------------------------- coverage (pure)


@dataclass(frozen=True)
class TimelineSpan:
    """The WAL of ``timeline`` that a recovery along some timeline path reads: [begin, end)."""

    timeline: int
    begin: int
    end: int | None


def parse_history(text: str) -> list[tuple[int, int]]:
    """``(parent timeline, switch point LSN)`` entries of a timeline history file, oldest first."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2:
            entries.append((int(parts[0]), parse_lsn(parts[1])))
    return entries


def timeline_path(target: int, history: list[tuple[int, int]]) -> list[TimelineSpan]:
    """The spans a recovery to ``target`` replays, given ``target``'s history entries."""
    spans = []
    begin = 0
    for tli, switch in history:
        spans.append(TimelineSpan(tli, begin, switch))
        begin = switch
    spans.append(TimelineSpan(target, begin, None))
    return spans


def newest_timeline(start: int, history_timelines: Iterable[int]) -> int:
    """What ``recovery_target_timeline = 'latest'`` picks: probe start+1, start+2... while the
    archive holds their history files (as PostgreSQL does)."""
    have = set(history_timelines)
    newest = start
    while newest + 1 in have:
        newest += 1
    return newest


def timeline_for(path: list[TimelineSpan], segno: int, seg_size: int) -> int:
    """The timeline whose file recovery reads for segment ``segno`` (the newest one whose
    span begins in or before that segment)."""
    chosen = path[0].timeline
    for span in path:
        if span.begin // seg_size <= segno:
            chosen = span.timeline
    return chosen


def recovery_segments(path: list[TimelineSpan], start_lsn: int, last_segment: str | None,
                      seg_size: int = DEFAULT_SEGMENT_SIZE) -> list[str]:
    """The segment names a recovery along ``path`` asks for, in order, from the one holding
    ``start_lsn`` to ``last_segment`` (the archive's last continuous one). Pure."""
    if last_segment is None:
        return []
    first, last = lsn_segment(start_lsn, seg_size), segment_number(last_segment, seg_size)
    return [segment_name(timeline_for(path, n, seg_size), n, seg_size) for n in range(first, last + 1)]



@dataclass(frozen=True)
class Gap:
    """Missing WAL along a timeline path: from ``first_missing`` to ``last_missing``, with
    ``next_present`` the segment recovery would need to resume at."""

    first_missing: str
    next_present: str
    last_missing: str = ""

    def __str__(self) -> str:
        return f"missing from {self.first_missing} up to {self.next_present}"


@dataclass(frozen=True)
class Coverage:
    """Continuous WAL along a timeline path, from a starting segment.

    ``end_lsn`` is the first byte *not* covered (the end of the last continuous segment);
    ``archived_until`` the time that last segment was archived, so every record before
    that moment up to ``end_lsn`` can be replayed. ``gaps`` are holes followed by more WAL
    (a gap makes recovery past it impossible).
    """

    start_segment: str
    last_segment: str | None
    end_lsn: int
    archived_until: datetime | None
    gaps: tuple[Gap, ...] = field(default_factory=tuple)
    timeline: int = 1

    @property
    def continuous(self) -> bool:
        return not self.gaps


def _walk(present: Mapping[str, datetime | None], path: list[TimelineSpan], start: int,
          seg_size: int) -> tuple[str | None, int, tuple[Gap, ...]]:
    """(last continuous segment, its number + 1, gaps) along ``path`` from segment ``start``.

    Linear in the number of names plus the span walked: every segment number from ``start``
    to the newest one on the path is looked at once.
    """
    def name_at(segno: int) -> str:
        return segment_name(timeline_for(path, segno, seg_size), segno, seg_size)

    relevant = [segno for n in present if SEGMENT_RE.match(n)
                and (segno := segment_number(n, seg_size)) >= start
                and segment_timeline(n) == timeline_for(path, segno, seg_size)]
    top = max(relevant, default=start - 1)
    last: str | None = None
    end = start
    gaps: list[Gap] = []
    segno = start
    broken = False
    while segno <= top:
        name = name_at(segno)
        if name not in present:
            nxt = segno + 1
            while nxt <= top and name_at(nxt) not in present:
                nxt += 1
            if nxt <= top:
                gaps.append(Gap(name, name_at(nxt), name_at(nxt - 1)))
            broken = True
            segno = nxt
            continue
        if not broken:
            last, end = name, segno + 1
        segno += 1
    return last, end, tuple(gaps)


def coverage(segments: Iterable[WalSegment], path: list[TimelineSpan], start_lsn: int,
             seg_size: int = DEFAULT_SEGMENT_SIZE) -> Coverage:
    """How far the archive lets recovery go from ``start_lsn`` along ``path``."""
    present: dict[str, datetime | None] = {s.name: s.modified for s in segments}
    start = lsn_segment(start_lsn, seg_size)
    last, end, gaps = _walk(present, path, start, seg_size)
    return Coverage(segment_name(timeline_for(path, start, seg_size), start, seg_size),
                    last, end * seg_size, present[last] if last else None, gaps, path[-1].timeline)


def timeline_paths(start_timeline: int, hist: Mapping[int, Sequence[tuple[int, int]]]) -> list[list[TimelineSpan]]:
    """Every timeline path a recovery starting on ``start_timeline`` can follow: that
    timeline itself and each later one whose archived history descends from it."""
    paths = []
    for target in sorted({start_timeline, *[t for t in hist if t > start_timeline]}):
        history = list(hist.get(target, []))
        if target != start_timeline and start_timeline not in {p for p, _ in history}:
            continue
        paths.append(timeline_path(target, history))
    return paths


def archive_coverage(segments: Iterable[WalSegment], hist: Mapping[int, Sequence[tuple[int, int]]],
                     start_timeline: int, start_lsn: int,
                     seg_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[tuple[Coverage, ...], tuple[Gap, ...]]:
    """Coverage along every timeline path from (``start_timeline``, ``start_lsn``) and the
    union of their gaps: what ``check``, ``wal status``, ``status`` and ``audit`` report."""
    segments = list(segments)
    covs = tuple(coverage(segments, path, start_lsn, seg_size) for path in timeline_paths(start_timeline, hist))
    gaps: list[Gap] = []
    for cov in covs:
        gaps.extend(g for g in cov.gaps if g not in gaps)
    return covs, tuple(gaps)


def archive_gaps(names: Iterable[str], hist: Mapping[int, Sequence[tuple[int, int]]], start: str | None,
                 seg_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[Gap, ...]:
    """The gaps :func:`archive_coverage` finds, from segment names alone: from ``start`` (the
    oldest base backup's first segment), or from the oldest archived segment without one."""
    names = [n for n in names if SEGMENT_RE.match(n)]
    if start is None:
        if not names:
            return ()
        start = min(names, key=lambda n: (segment_number(n, seg_size), n))
    segments = [WalSegment(n, segment_timeline(n), "", 0, _EPOCH) for n in dict.fromkeys(names)]
    return archive_coverage(segments, hist, segment_timeline(start),
                            segment_number(start, seg_size) * seg_size, seg_size)[1]


_EPOCH = datetime.fromtimestamp(0, timezone.utc)
