"""Whether the archive reaches a time target (pure, from pg_waldump's commit records), and how
a table PITR names the moment it recovered (issue 13)."""

from __future__ import annotations

from datetime import datetime, timezone

from backup_tool.cli.common import as_of
from backup_tool.physical.pitr import reaches_time, xact_times

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
