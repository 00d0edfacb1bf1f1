"""Whether the archive reaches a time target (pure, from pg_waldump's commit records), and how
a table PITR names the moment it recovered (issue 13)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from backup_tool.cli.common import as_of
from backup_tool.physical.pitr import TimeStop, commit_stop, reaches_time, time_stop, xact_ends, xact_times

WALDUMP = """\
rmgr: Heap        len (rec/tot):     59/  8215, tx:        725, lsn: 0/01516E00, prev 0/01516DC8, desc: INSERT off 3
rmgr: Transaction len (rec/tot):    405/   405, tx:        725, lsn: 0/01516F70, prev 0/01516F28, desc: COMMIT 2026-11-26 02:27:40.273616 UTC; inval msgs: catcache 80
rmgr: Transaction len (rec/tot):     34/    34, tx:        726, lsn: 0/01517148, prev 0/01517108, desc: ABORT 2026-11-26 02:27:41.5 UTC
rmgr: Transaction len (rec/tot):     50/    50, tx:          0, lsn: 0/01517170, prev 0/01517148, desc: COMMIT_PREPARED 731: 2026-11-26 02:27:42 UTC
rmgr: Transaction len (rec/tot):     34/    34, tx:        727, lsn: 0/015171A8, prev 0/01517170, desc: ASSIGNMENT xtop 727: subxacts: 728
"""


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def test_commit_abort_and_prepared_records_give_their_times() -> None:
    assert xact_times(WALDUMP) == [utc("2026-11-26 02:27:40.273616"), utc("2026-11-26 02:27:41.5"),
                                   utc("2026-11-26 02:27:42")]
    assert xact_times("rmgr: XLOG len (rec/tot): 114/114, desc: CHECKPOINT_ONLINE redo 0/2000028") == []


def test_the_newest_segment_with_a_commit_decides() -> None:
    target = utc("2026-11-26 02:27:41")
    after = (utc("2026-11-26 02:27:40"), utc("2026-11-26 02:27:41.2"))
    before = (utc("2026-11-26 02:27:40"),)
    assert reaches_time(target, [("seg3", ()), ("seg2", after)]) is True
    assert reaches_time(target, [("seg3", ()), ("seg2", before), ("seg1", after)]) is False
    assert reaches_time(target, [("seg3", ()), ("seg2", ())]) is None
    assert reaches_time(target, [("seg2", (target,))]) is False


def test_the_moment_recovered_is_named_to_the_hundredth() -> None:
    assert (as_of(utc("2026-11-26 21:38:07.958"), utc("2026-11-26 21:38:10"))
            == "as of 2026-11-26 21:38:07.95 UTC (last commit before 21:38:10)")
    assert (as_of(utc("2026-11-25 23:59:59"), utc("2026-11-26 00:00:00.5"))
            == "as of 2026-11-25 23:59:59.00 UTC (last commit before 2026-11-26 00:00:00.5)")


def test_commit_and_abort_records_give_their_lsn_and_time_in_wal_order() -> None:
    assert xact_ends(WALDUMP) == [(0x01516F70, utc("2026-11-26 02:27:40.273616")),
                                  (0x01517148, utc("2026-11-26 02:27:41.5")),
                                  (0x01517170, utc("2026-11-26 02:27:42"))]


def test_recovery_to_a_time_stops_before_the_first_record_after_it_in_wal_order() -> None:
    """As PostgreSQL does with recovery_target_inclusive: a record at the time itself is
    replayed; the first one after it stops recovery, whatever the times of those after it (a
    commit timestamped before the time but written after the stop is not replayed)."""
    ends = [(10, utc("2026-11-26 02:27:40")), (20, utc("2026-11-26 02:27:41")), (30, utc("2026-11-26 02:27:43")),
            (40, utc("2026-11-26 02:27:40.5"))]
    assert time_stop(ends, utc("2026-11-26 02:27:41")) == TimeStop(20, 30)
    assert time_stop(ends, utc("2026-11-26 02:27:40.9")) == TimeStop(10, 20)
    assert time_stop(ends, utc("2026-11-26 02:27:39")) == TimeStop(None, 10)
    assert time_stop(ends[:2], utc("2026-11-26 02:27:42")) == TimeStop(20, None)
    assert time_stop([], utc("2026-11-26 02:27:42")) == TimeStop(None, None)


def test_the_scan_for_the_stop_refuses_what_it_cannot_read_in_one_run(tmp_path: Path) -> None:
    """No stop is named (recovery then stops at the time) when the segments held are none,
    change timeline, leave a gap, or do not begin where replay begins; pg_waldump is not run
    (the path given for it does not exist)."""
    missing = str(tmp_path / "no-pg_waldump")
    start = 0x0F000028

    def held(names: list[str]) -> Callable[[int], list[str]]:
        return lambda n: names
    for names in ([], ["00000001000000000000000F", "000000020000000000000010"],
                  ["00000001000000000000000F", "000000010000000000000011"], ["000000010000000000000010"]):
        assert commit_stop(missing, tmp_path, held(names), start, start, utc("2026-11-26 02:27:41"),
                           16 << 20, 64) is None
