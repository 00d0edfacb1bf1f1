"""Whether the archive reaches a time target (pure, from pg_waldump's commit records), and how
a table PITR names the moment it recovered (issue 13)."""

from __future__ import annotations

import os
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from support.clusters import DbHandle, PgServer

from backup_tool.cli.common import as_of
from backup_tool.core import walnames
from backup_tool.physical import walscan
from backup_tool.physical.pitr import (
    SCAN_STEP,
    CommitStop,
    TimeStop,
    commit_stop,
    reaches_time,
    time_stop,
    xact_ends,
    xact_times,
)
from backup_tool.postgres import walbasis

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


def test_the_scan_for_the_stop_reads_each_segment_once_and_misses_no_commit(
        pg_server: PgServer, fresh_db: Callable[[str], DbHandle], tmp_path: Path) -> None:
    """Real WAL of one transaction running over several segments with no commit in between,
    then commits on either side of the time: each run of pg_waldump starts a few pages at most
    before where the run before it ended (it used to start again at the last commit read,
    reading the segments of a long transaction once per step), and the stop is the one a
    single run over all the WAL gives, however the runs cut it."""
    db = fresh_db("stopscan")
    seg = walnames.DEFAULT_SEGMENT_SIZE
    with db.connect() as conn:
        conn.autocommit = True
        conn.execute("CREATE TABLE bulk (id int, pad text)")
        start = walnames.parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        conn.execute("INSERT INTO bulk VALUES (0, 'before')")
        conn.execute("INSERT INTO bulk SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 500000) g")
        target = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        conn.execute("INSERT INTO bulk VALUES (-1, 'after')")
        end = walnames.parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        conn.execute("SELECT pg_switch_wal()")
        names = [walnames.segment_name(1, n) for n in range(start // seg, (end - 1) // seg + 1)]
        folder = tmp_path / "wal"
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(walbasis.read_wal_file(conn, name, seg) or b"")
    assert len(names) >= 1 + SCAN_STEP, "the transaction must outlast two steps of the scan"
    waldump = pg_server.bin_dir / "pg_waldump"
    runs = tmp_path / "runs"
    wrapper = tmp_path / "pg_waldump"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(runs))}\nexec {shlex.quote(str(waldump))} "$@"\n')
    wrapper.chmod(0o755)
    whole = subprocess.run([str(waldump), "-r", "Transaction", "-p", str(folder), "-s", walnames.format_lsn(start),
                            "-e", walnames.format_lsn(walnames.segment_start_lsn(start // seg + len(names), seg))],
                           capture_output=True, text=True, check=True, env={**os.environ, "TZ": "UTC"})
    ends = xact_ends(whole.stdout)
    expected = time_stop(ends, target)
    assert expected.last_before is not None and expected.stop is not None

    found = commit_stop(str(wrapper), folder, lambda n: names[:n], start, start, target, seg, 64)

    assert found == CommitStop(expected.last_before, dict(ends)[expected.last_before])
    spans = [(walnames.parse_lsn(a[a.index("-s") + 1]), walnames.parse_lsn(a[a.index("-e") + 1]))
             for a in (line.split() for line in runs.read_text().splitlines())]
    assert len(spans) >= 2
    for (_, ended), (began, _) in zip(spans, spans[1:], strict=False):
        assert ended - 4 * walscan.BLCKSZ <= began < ended, [tuple(map(walnames.format_lsn, s)) for s in spans]


def test_the_last_page_a_record_may_begin_on_is_read_from_page_headers() -> None:
    """Whole continuation pages are passed over, so are zeroed pages after a WAL switch; a
    page header that is neither valid nor zero gives no answer."""
    seg, segno = 8 * walscan.BLCKSZ, 3

    def page(n: int, info: int = 0, rem: int = 0, addr: int | None = None) -> bytes:
        head = walscan._PAGE.pack(walscan.PAGE_MAGIC, info | (walscan.XLP_LONG_HEADER if n == 0 else 0), 1,
                                  segno * seg + n * walscan.BLCKSZ if addr is None else addr, rem)
        return head.ljust(walscan.BLCKSZ, b"\1")
    cont = walscan.XLP_FIRST_IS_CONTRECORD
    body = [page(0), page(1, cont, 100), page(2, cont, 9000)]
    full = [page(n, cont, 30000 - n) for n in range(3, 8)]
    assert walscan.last_record_page(b"".join(body + full), segno, seg) == segno * seg + walscan.BLCKSZ
    zeros = [bytes(walscan.BLCKSZ)] * 5
    assert walscan.last_record_page(b"".join(body + zeros), segno, seg) == segno * seg + walscan.BLCKSZ
    room_left = [page(0), page(1, cont, walscan.BLCKSZ - walscan.SHORT_PHD - 8), page(2, cont, 9000)]
    assert walscan.last_record_page(b"".join(room_left + full), segno, seg) == segno * seg + walscan.BLCKSZ
    no_room = [page(0), page(1, cont, walscan.BLCKSZ - walscan.SHORT_PHD), page(2, cont, 9000)]
    assert walscan.last_record_page(b"".join(no_room + full), segno, seg) == segno * seg
    assert walscan.last_record_page(b"".join(body + full[:-1] + [page(7, addr=5)]), segno, seg) is None
    assert walscan.last_record_page(b"".join(body), segno, seg) is None
