"""The WAL archive: names and keys, continuity and base backup choice (pure functions), and
`wal push` / `wal fetch` through the real CLI against both repository kinds."""

from __future__ import annotations

import io
import os
import pwd
import subprocess
import tarfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from backup_tool.core import walnames
from backup_tool.errors import NotFoundError, RefusedError, UsageError
from backup_tool.governance import walcoverage
from backup_tool.physical import basetar, pitr, wal, walack, walspool
from backup_tool.physical.basebackup import parse_backup_label, stop_lsn_from_manifest
from backup_tool.postgres.cluster import conf_quote
from backup_tool.repository import walarchive
from backup_tool.repository.manifest import Manifest, PhysicalInfo, parse_manifest

SEG = 16 << 20
T0 = datetime(2026, 11, 24, 20, 0, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- pure functions


def test_names_keys_and_lsns() -> None:
    assert wal.wal_file_kind("000000010000000000000003") == "segment"
    assert wal.wal_file_kind("00000002.history") == "history"
    assert wal.wal_file_kind("000000010000000000000003.00000028.backup") == "backup"
    assert wal.wal_file_kind("000000010000000000000003.partial") == "partial"
    for bad in ("RECOVERYXLOG", "../etc/passwd", "00000001000000000000000g", ""):
        with pytest.raises(UsageError):
            wal.wal_file_kind(bad)
    sha = "a" * 64
    assert wal.object_key("0000000100000002000000FF", sha) == f"wal/0000000100000002/0000000100000002000000FF-{sha}.zst"
    assert wal.object_key("00000002.history", sha) == f"wal/history/00000002.history-{sha}.zst"
    assert walnames.parse_lsn("0/3000060") == 0x3000060
    assert walnames.parse_lsn("1A/FF") == (0x1A << 32) | 0xFF
    assert wal.format_lsn(walnames.parse_lsn("16/B374D848")) == "16/B374D848"
    with pytest.raises(UsageError):
        walnames.parse_lsn("nonsense")
    assert wal.segment_name(1, 0x1FF) == "0000000100000001000000FF"
    assert wal.segment_number("0000000100000001000000FF") == 0x1FF
    assert wal.segment_name(3, wal.lsn_segment(walnames.parse_lsn("2/5000028"))) == "000000030000000200000005"
    assert wal.segment_name(1, 5, 64 << 20) == "000000010000000000000005"
    assert wal.segment_number("000000010000000100000003", 64 << 20) == 64 + 3


def test_pg_timestamp_is_postgres_own_form() -> None:
    ts = datetime(2026, 11, 24, 20, 38, 49, 408950, tzinfo=timezone.utc)
    assert pitr.pg_timestamp(ts) == "2026-11-24 20:38:49.40895+00"
    assert pitr.pg_timestamp(ts.replace(microsecond=0)) == "2026-11-24 20:38:49+00"
    local = ts.astimezone(timezone(timedelta(hours=2)))
    assert pitr.pg_timestamp(local) == "2026-11-24 20:38:49.40895+00"
    assert pitr.parse_time("2026-11-24T20:38:49") == ts.replace(microsecond=0)
    settings = pitr.recovery_settings(pitr.Target("time", time=ts), "cmd %f %p")
    assert settings["recovery_target_time"] == "2026-11-24 20:38:49.40895+00"
    assert settings["recovery_target_action"] == "promote"
    assert settings["recovery_target_timeline"] == "latest"
    assert "recovery_target_action" not in pitr.recovery_settings(pitr.Target("latest"), "cmd")
    with pytest.raises(UsageError):
        pitr.make_target(target_time="2026-11-24T20:00:00Z", latest=True)
    with pytest.raises(UsageError):
        pitr.make_target()


def seg(name: str, minutes: float) -> wal.WalSegment:
    return wal.WalSegment(name, int(name[:8], 16), f"wal/{name[:16]}/{name}-{'0' * 64}.zst", 100,
                          T0 + timedelta(minutes=minutes))


def segs(tli: int, first: int, last: int, start_minute: float = 0) -> list[wal.WalSegment]:
    return [seg(wal.segment_name(tli, n), start_minute + i) for i, n in enumerate(range(first, last + 1))]


def test_walnames_round_trips() -> None:
    from backup_tool.core import walnames

    for size in (1 << 20, 16 << 20, 64 << 20, 1 << 30):
        for segno in (0, 1, walnames.segments_per_log(size) - 1, walnames.segments_per_log(size), 123457):
            name = walnames.segment_name(7, segno, size)
            assert walnames.is_segment(name) and walnames.segment_timeline(name) == 7
            assert walnames.segment_number(name, size) == segno
            assert walnames.segment_number(walnames.next_segment(name, size), size) == segno + 1
    assert walnames.next_segment("0000000100000001000000FF") == "000000010000000200000000"
    assert walnames.format_lsn(walnames.parse_lsn("1A/FF00028")) == "1A/FF00028"
    assert walnames.segment_prefix("000000010000000000000002.00000028.backup") == "000000010000000000000002"
    assert walnames.segment_prefix("00000002.history") is None
    assert wal.segment_name is walnames.segment_name and walnames.parse_lsn is walnames.parse_lsn


def test_status_audit_check_and_pitr_agree_across_a_timeline_switch() -> None:
    """Timeline 2 forked from 1 inside segment 5 and lacks its segment 6, which timeline 1
    (abandoned) has. Recovery along timeline 2 cannot cross 6: everyone must say so. (The
    old ``retention.wal_gaps`` merged timelines by position and saw no gap.)"""
    from backup_tool.config.policy import Policy
    from backup_tool.governance.audit import build_report
    from backup_tool.governance.status import CRITICAL, WalState, evaluate
    from backup_tool.repository.records import BackupRecord

    hist = {2: wal.parse_history("1\t0/5800000\tno reason\n")}
    archive = segs(1, 2, 9) + [s for s in segs(2, 5, 9, start_minute=20) if s.name != "000000020000000000000006"]
    now = T0 + timedelta(hours=1)
    base = BackupRecord("20261124T195500Z-Babcd", "base", T0 - timedelta(minutes=5), now + timedelta(days=7),
                        finished_at=T0 - timedelta(minutes=4), start_wal="000000010000000000000002")
    full = BackupRecord("20261124T195000Z-Fabcd", "full", T0 - timedelta(minutes=10), now + timedelta(days=7),
                        finished_at=T0 - timedelta(minutes=9))
    expected = [("000000020000000000000006", "000000020000000000000006")]

    covs, gaps = wal.archive_coverage(archive, hist, 1, walnames.parse_lsn("0/2000028"))  # check, wal status
    assert [(g.first_missing, g.last_missing) for g in gaps] == expected
    assert [(c.timeline, c.last_segment) for c in covs] == [(1, "000000010000000000000009"),
                                                            (2, "000000020000000000000005")]
    path = walcoverage.timeline_path(walcoverage.newest_timeline(1, hist), hist[2])  # restore pitr, as pitr.plan does
    cov = walcoverage.coverage(archive, path, walnames.parse_lsn("0/2000028"))
    assert [(g.first_missing, g.last_missing) for g in cov.gaps] == expected
    state = WalState(tuple(s.name for s in archive), max(s.modified for s in archive), histories=hist)
    status = evaluate([full, base], [], state, Policy(), now)  # status
    assert status.metrics["wal_gaps"] == 1 and status.code == CRITICAL
    assert "000000020000000000000006" in next(c.detail for c in status.checks if c.name == "wal")
    assert list(build_report([full, base], [], [], state, Policy(), now).pitr.gaps) == expected  # audit


def test_coverage_gaps_and_timelines() -> None:
    path1 = walcoverage.timeline_path(1, [])
    cov = walcoverage.coverage(segs(1, 3, 9), path1, walnames.parse_lsn("0/3000028"))
    assert cov.last_segment == "000000010000000000000009" and not cov.gaps
    assert cov.end_lsn == 10 * SEG and cov.archived_until == T0 + timedelta(minutes=6)

    holed = [s for s in segs(1, 3, 9) if s.name != "000000010000000000000006"]
    cov = walcoverage.coverage(holed, path1, walnames.parse_lsn("0/3000028"))
    assert cov.last_segment == "000000010000000000000005"
    assert [str(g) for g in cov.gaps] == ["missing from 000000010000000000000006 up to 000000010000000000000007"]

    # timeline 2 forked from 1 inside segment 6: segment 6 onwards is read from timeline 2
    history2 = wal.parse_history("1\t0/6012345\tbefore 2026-11-24 20:05:00+00\n")
    assert history2 == [(1, 0x6012345)]
    path2 = walcoverage.timeline_path(2, history2)
    assert [(s.timeline, s.begin, s.end) for s in path2] == [(1, 0, 0x6012345), (2, 0x6012345, None)]
    assert walcoverage.timeline_for(path2, 5, SEG) == 1 and walcoverage.timeline_for(path2, 6, SEG) == 2
    archive = segs(1, 3, 9) + segs(2, 6, 8, start_minute=20)
    cov = walcoverage.coverage(archive, path2, walnames.parse_lsn("0/3000028"))
    assert cov.last_segment == "000000020000000000000008" and not cov.gaps and cov.timeline == 2
    assert walcoverage.newest_timeline(1, {2}) == 2 and walcoverage.newest_timeline(1, {3}) == 1
    assert walcoverage.newest_timeline(1, {2, 3, 5}) == 3


def base_manifest(backup_id: str, start: str, stop: str, stop_minute: float, tli: int = 1) -> Manifest:
    phys = PhysicalInfo(start_lsn=start, stop_lsn=stop, timeline=tli,
                        start_wal=wal.segment_name(tli, wal.lsn_segment(walnames.parse_lsn(start))),
                        stop_wal=wal.segment_name(tli, wal.lsn_segment(walnames.parse_lsn(stop))),
                        stop_time=T0 + timedelta(minutes=stop_minute), wal_segment_size=SEG,
                        checkpoint="fast", backup_label="START WAL LOCATION: ...")
    started = T0 + timedelta(minutes=stop_minute - 0.5)
    return Manifest(id=backup_id, kind="base", parent_id=None, database="app", server_version="15.1",
                    server_version_num=150001, encoding="UTF8", system_identifier="1",
                    started_at=started, finished_at=started, expires_at=started + timedelta(days=7),
                    policy={}, snapshot_lsn=stop, schema=None, globals=None, schema_fingerprint="",
                    tables=(), sequences=(), inventory={}, physical=phys)


def test_base_manifest_round_trips() -> None:
    m = base_manifest("20261124T200000Z-B0001", "0/3000028", "0/3000100", 1)
    again = parse_manifest(m.to_json(), "m")
    assert again == m
    assert again.summary()["start_lsn"] == "0/3000028" and again.summary()["checkpoint"] == "fast"


def test_choose_base_backup() -> None:
    old = base_manifest("B1", "0/3000028", "0/3000100", 1)
    new = base_manifest("B2", "0/7000028", "0/7000100", 5)
    archive = segs(1, 3, 12)  # segment n archived at minute n - 3
    target = lambda minutes: pitr.Target("time", time=T0 + timedelta(minutes=minutes))  # noqa: E731

    assert pitr.choose_base_backup([old, new], archive, {}, target(6)).backup.id == "B2"
    assert pitr.choose_base_backup([old, new], archive, {}, target(3)).backup.id == "B1"
    assert pitr.choose_base_backup([old, new], archive, {}, pitr.Target("latest")).backup.id == "B2"
    lsn = pitr.Target("lsn", lsn=walnames.parse_lsn("0/6000000"))
    assert pitr.choose_base_backup([old, new], archive, {}, lsn).backup.id == "B1"
    assert pitr.choose_base_backup([old, new], archive, {}, pitr.Target("name", name="x"),
                                   restore_point_lsn=walnames.parse_lsn("0/8000000")).backup.id == "B2"

    window = r"covers 2026-11-24T20:01:00Z \.\. 2026-11-24T20:09:00Z.*before the oldest"
    with pytest.raises(RefusedError, match=window):
        pitr.choose_base_backup([old, new], archive, {}, target(0.5))
    with pytest.raises(RefusedError, match="not archived yet"):
        pitr.choose_base_backup([old, new], archive, {}, target(30))
    with pytest.raises(NotFoundError):
        pitr.choose_base_backup([], archive, {}, target(3))

    # a gap after the newest backup's WAL: time targets beyond it are refused, naming the gap
    holed = [s for s in archive if s.name != "00000001000000000000000A"]
    with pytest.raises(RefusedError, match="gap"):
        pitr.choose_base_backup([old, new], holed, {}, target(8.5))
    assert pitr.choose_base_backup([old, new], holed, {}, target(6)).backup.id == "B2"

    # a backup whose own WAL is incomplete is never chosen
    no_b2_wal = [s for s in archive if s.name != "000000010000000000000007"]
    assert pitr.choose_base_backup([old, new], no_b2_wal, {}, target(3)).backup.id == "B1"


def test_choose_follows_timelines() -> None:
    before_fork = base_manifest("B1", "0/3000028", "0/3000100", 1)
    after_fork_tl1 = base_manifest("B2", "0/9000028", "0/9000100", 7)
    history = {2: [(1, walnames.parse_lsn("0/6012345"))]}
    archive = segs(1, 3, 10) + segs(2, 6, 8, start_minute=20)
    plan = pitr.choose_base_backup([before_fork, after_fork_tl1], archive, history, pitr.Target("latest"))
    assert plan.backup.id == "B1" and plan.timeline == 2
    assert plan.coverage.last_segment == "000000020000000000000008"
    plan = pitr.choose_base_backup([before_fork, after_fork_tl1], archive, history,
                                   pitr.Target("latest", timeline=1))
    assert plan.backup.id == "B2" and plan.timeline == 1


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_walker_captures_named_members_wherever_the_chunks_cut(tar_format: int) -> None:
    buf = io.BytesIO()
    label = b"START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\nCHECKPOINT LOCATION: 0/3000060\n" \
            b"BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-25 13:39:52 UTC\n" \
            b"LABEL: backup-tool x\nSTART TIMELINE: 1\n"
    manifest = b'{"WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/3000028", "End-LSN": "0/3000100"}]}'
    long_name = "base/" + "x" * 150
    members = (("base/1/1234", os.urandom(70000)), (long_name, b"y" * 10), ("backup_label", label),
               ("empty", b""), ("big", b"z" * 2000), ("backup_manifest", manifest))
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    for step in (1, 511, 777, len(raw)):
        walker = basetar.TarWalker({"backup_label", "backup_manifest", "empty", "big", long_name}, limit=1000)
        for i in range(0, len(raw), step):
            walker.feed(raw[i:i + step], lambda offset, big: None)
        assert walker.found == {"backup_label": label, "backup_manifest": manifest, "empty": b"",
                                long_name: b"y" * 10}
        assert [m.name for m in walker.members] == [name for name, _ in members]
    parsed = parse_backup_label(label.decode())
    assert (parsed.start_lsn, parsed.start_wal, parsed.timeline) == ("0/3000028", "000000010000000000000003", 1)
    assert stop_lsn_from_manifest(manifest) == ("0/3000100", 1)


def test_parse_recovery_log() -> None:
    log = """\
2026-11-25 13:40:20.1 UTC [926] LOG:  restored log file "000000010000000000000004" from archive
2026-11-25 13:40:20.2 UTC [926] LOG:  restored log file "000000010000000000000005" from archive
2026-11-25 13:40:22.0 UTC [926] LOG:  recovery stopping before commit of transaction 961, time 2026-11-25 13:40:02.147573+00
2026-11-25 13:40:22.0 UTC [926] LOG:  redo done at 0/5024610 system usage: CPU: user: 0.00 s
2026-11-25 13:40:22.0 UTC [926] LOG:  last completed transaction was at log time 2026-11-25 13:40:01.298485+00
2026-11-25 13:40:22.4 UTC [926] LOG:  selected new timeline ID: 2
"""
    point = pitr.parse_recovery_log(log)
    assert point.stop_reason.startswith("recovery stopping before commit of transaction 961")
    assert point.redo_done_lsn == "0/5024610" and point.timeline == 2 and point.segments_restored == 2
    assert point.last_transaction_time == datetime(2026, 11, 25, 13, 40, 1, 298485, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- push / fetch via the CLI


def fake_pg_wal(root: Path, names: list[str], ready: bool = True) -> Path:
    pg_wal = root / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (pg_wal / name).write_bytes(os.urandom(4096) + bytes([i]) * (SEG // 64))
        if ready:
            (pg_wal / "archive_status" / f"{name}.ready").touch()
    return pg_wal


def keys_under(repo: str, prefix: str) -> list[str]:
    from backup_tool.repository.storage import open_storage

    return [o.key for o in open_storage(repo).list(prefix)]


def test_push_is_idempotent_and_never_overwrites(cli: Any, repo: str, tmp_path: Path) -> None:
    pg_wal = fake_pg_wal(tmp_path, ["000000010000000000000001", "00000002.history"], ready=False)
    seg_path = pg_wal / "000000010000000000000001"
    first = cli("wal", "push", seg_path, "--repo", repo)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "" and first.stderr == ""
    again = cli.json("wal", "push", seg_path, "--repo", repo)
    assert again["already_archived"] is True
    (key,) = keys_under(repo, "wal/0000000100000000/")
    assert key.startswith("wal/0000000100000000/000000010000000000000001-")

    original = seg_path.read_bytes()
    seg_path.write_bytes(b"different" + original[9:])
    conflict = cli("wal", "push", seg_path, "--repo", repo)
    assert conflict.returncode == 1
    assert "already archived with different content" in conflict.stderr
    assert keys_under(repo, "wal/0000000100000000/") == [key]

    assert cli("wal", "push", pg_wal / "00000002.history", "--repo", repo).returncode == 0
    assert [k.split("-")[0] for k in keys_under(repo, "wal/history/")] == ["wal/history/00000002.history"]

    dest = tmp_path / "restored"
    fetched = cli("wal", "fetch", "000000010000000000000001", dest, "--repo", repo)
    assert fetched.returncode == 0, fetched.stderr
    assert dest.read_bytes() == original


def test_fetch_missing_is_quick_and_corrupt_is_an_error(cli: Any, local_repo: str, tmp_path: Path) -> None:
    started = time.monotonic()
    missing = cli("wal", "fetch", "0000000100000000000000AA", tmp_path / "x", "--repo", local_repo)
    assert missing.returncode == 1 and "not in the archive" in missing.stderr
    assert time.monotonic() - started < 5
    assert not (tmp_path / "x").exists()

    pg_wal = fake_pg_wal(tmp_path, ["000000010000000000000002"], ready=False)
    assert cli("wal", "push", pg_wal / "000000010000000000000002", "--repo", local_repo).returncode == 0
    (key,) = keys_under(local_repo, "wal/")
    path = Path(local_repo) / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    dest = tmp_path / "RECOVERYXLOG"
    corrupt = cli("wal", "fetch", "000000010000000000000002", dest, "--repo", local_repo)
    assert corrupt.returncode == 3, corrupt.stderr
    assert "corrupt" in corrupt.stderr and "Traceback" not in corrupt.stderr
    assert not dest.exists() and list(tmp_path.glob(".RECOVERYXLOG*")) == []
    strict = cli("wal", "fetch", "000000010000000000000002", dest, "--repo", local_repo, "--abort-on-error")
    assert strict.returncode == 255 and "corrupt" in strict.stderr
    assert not dest.exists()

    # truncated object (e.g. a partial upload that slipped through): also refused
    path.write_bytes(bytes(data[:100]))
    assert cli("wal", "fetch", "000000010000000000000002", dest, "--repo", local_repo).returncode == 3
    assert not dest.exists()


def test_list_segments_and_health(tmp_path: Path, local_repo: str) -> None:
    from backup_tool.repository.storage import open_storage

    storage = open_storage(local_repo)
    names = [wal.segment_name(1, n) for n in (3, 4, 6)]
    pg_wal = fake_pg_wal(tmp_path, names + ["00000002.history"], ready=False)
    for name in names:
        wal.push_file(storage, pg_wal / name)
    listed = walarchive.list_segments(storage)
    assert [s.name for s in listed] == names and {s.timeline for s in listed} == {1}
    assert all(s.key.endswith(".zst") and len(s.sha256) == 64 and s.size > 0 for s in listed)
    health = wal.archive_health(storage, [(1, walnames.parse_lsn("0/3000028"), SEG)])
    assert [str(g) for g in health.gaps] == ["missing from 000000010000000000000005 up to 000000010000000000000006"]
    checks = {c.name: c for c in health.checks(max_age=timedelta(hours=1))}
    assert not checks["wal_continuity"].ok and checks["wal_newest_age"].ok
    stale = wal.archive_health(storage, [(1, walnames.parse_lsn("0/3000028"), SEG)],
                               now=datetime.now(timezone.utc) + timedelta(hours=3))
    assert not {c.name: c for c in stale.checks(max_age=timedelta(hours=1))}["wal_newest_age"].ok


def test_fetch_reads_ahead_verified_segments(cli: Any, local_repo: str, tmp_path: Path) -> None:
    names = [wal.segment_name(1, n) for n in range(1, 6)]
    source = tmp_path / "source"
    source.mkdir()
    for i, name in enumerate(names):
        header = bytearray(os.urandom(40))  # a long page header as PostgreSQL 15 writes it
        header[0:2] = (0xD110).to_bytes(2, "little")
        header[2:4] = (0x0002).to_bytes(2, "little")
        header[8:16] = ((i + 1) * SEG).to_bytes(8, "little")
        header[24:32] = (7311234567890123456).to_bytes(8, "little")
        header[32:36] = SEG.to_bytes(4, "little")
        header[36:40] = (8192).to_bytes(4, "little")
        (source / name).write_bytes(bytes(header) + bytes([i]) * 100000)
        assert cli("wal", "push", source / name, "--repo", local_repo).returncode == 0
    pg_wal = tmp_path / "data" / "pg_wal"
    pg_wal.mkdir(parents=True)
    dest = pg_wal / "RECOVERYXLOG"
    first = cli("wal", "fetch", names[0], dest, "--repo", local_repo, "--prefetch", "3")
    assert first.returncode == 0, first.stderr
    assert dest.read_bytes() == (source / names[0]).read_bytes()
    ahead = pg_wal / walspool.SPOOL_DIR / "prefetch"
    deadline = time.monotonic() + 20
    while sorted(p.name for p in ahead.glob("0*")) != names[0:4]:  # the fetched one is kept, 3 read ahead
        assert time.monotonic() < deadline, sorted(p.name for p in ahead.glob("*"))
        time.sleep(0.1)

    moved = Path(local_repo).rename(tmp_path / "repo-offline")
    assert walspool.try_fast_fetch(["wal", "fetch", names[1], str(dest), "--repo", local_repo]) is True
    assert dest.read_bytes() == (source / names[1]).read_bytes()
    served = cli("wal", "fetch", names[2], dest, "--repo", local_repo)
    assert served.returncode == 0, served.stderr
    assert dest.read_bytes() == (source / names[2]).read_bytes()
    offline = cli("wal", "fetch", names[4], dest, "--repo", local_repo)
    assert offline.returncode == 1
    dest.unlink()
    # at the end of the archive PostgreSQL asks again for the last segment it replayed
    assert walspool.try_fast_fetch(["wal", "fetch", names[2], str(dest), "--repo", local_repo]) is True
    assert dest.read_bytes() == (source / names[2]).read_bytes()
    never = cli("wal", "fetch", "00000001.history", pg_wal / "RECOVERYHISTORY", "--repo", local_repo)
    assert never.returncode == 1 and "not in the archive" in never.stderr
    moved.rename(local_repo)
    # segments older than the last one taken are dropped; the last one and those ahead stay
    assert sorted(p.name for p in ahead.glob("0*")) == names[2:4]


def test_recovery_segments_follow_the_timeline_path() -> None:
    path = walcoverage.timeline_path(2, [(1, walnames.parse_lsn("0/5000100"))])
    assert walcoverage.recovery_segments(path, walnames.parse_lsn("0/3000028"), "000000020000000000000007") == [
        "000000010000000000000003", "000000010000000000000004", "000000020000000000000005",
        "000000020000000000000006", "000000020000000000000007"]
    assert walcoverage.recovery_segments(path, walnames.parse_lsn("0/3000028"), None) == []


def test_recovery_prefetch_stays_a_window_ahead_and_stops_at_the_archive_end(tmp_path: Path) -> None:
    from backup_tool.repository.storage import open_storage

    storage = open_storage(str(tmp_path / "repo"))
    names = [wal.segment_name(1, n) for n in range(1, 8)]
    source = tmp_path / "source"
    source.mkdir()
    for i, name in enumerate(names[:5]):  # the archive ends after the fifth
        (source / name).write_bytes(os.urandom(64) + bytes([i]) * 50000)
        wal.push_file(storage, source / name)
    pg_wal = tmp_path / "data" / "pg_wal"
    pg_wal.mkdir(parents=True)
    owned: list[str] = []
    ahead = pg_wal / walspool.SPOOL_DIR / "prefetch"
    prefetch = wal.RecoveryPrefetch(storage, names, pg_wal, lambda p: owned.append(p.name), workers=2,
                                    window=3).start()
    try:
        def present() -> list[str]:
            return sorted(p.name for p in ahead.glob("0*"))

        def wait_for(want: list[str]) -> None:
            deadline = time.monotonic() + 20
            while present() != want:
                assert time.monotonic() < deadline, present()
                time.sleep(0.05)

        wait_for(names[0:3])
        time.sleep(0.3)
        assert present() == names[0:3]  # no more than the window ahead of recovery
        assert not walspool.try_fast_fetch(["wal", "fetch", names[0], str(tmp_path / "elsewhere" / "x")])
        dest = pg_wal / "RECOVERYXLOG"
        for taken in names[0:2]:
            assert walspool.take_prefetched(taken, dest)
            assert dest.read_bytes() == (source / taken).read_bytes()
        wait_for(names[1:4])  # the last one taken stays (PostgreSQL may ask again) and counts
        for taken in names[2:4]:
            assert walspool.take_prefetched(taken, dest)
            assert dest.read_bytes() == (source / taken).read_bytes()
        wait_for(names[3:5])
        for name in names[3:5]:
            assert (ahead / name).read_bytes() == (source / name).read_bytes()
        deadline = time.monotonic() + 20
        while prefetch.failure is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert names[5] in prefetch.failure
    finally:
        fetched = prefetch.stop()
    assert sorted(fetched) == names[0:5]
    assert set(names[0:5]) <= set(owned) and "prefetch" in owned
    assert not list(ahead.glob(".0*"))  # no partial download left behind


def test_answers_from_the_spool_load_no_command_line(tmp_path: Path) -> None:
    """PostgreSQL starts ``wal push``/``wal fetch`` once per segment: one answered from the
    spool must not import the command line framework, psycopg or boto3."""
    import subprocess
    import sys

    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    segment = pg_wal / walnames.segment_name(1, 1)
    segment.write_bytes(b"\0" * 1000)
    repo = str(tmp_path / "repo")
    walack.write_marker(str(segment), walack.marker_line(repo, "k", "0" * 64, 1000, 10, False,
                                                         walack.file_identity(segment.stat())))
    ahead = pg_wal / walspool.SPOOL_DIR / "prefetch"
    ahead.mkdir()
    (ahead / walnames.segment_name(1, 2)).write_bytes(b"\1" * 1000)
    root = Path(wal.__file__).resolve().parents[2]  # the checkout whose backup_tool is under test
    for argv in (["wal", "push", str(segment), "--repo", repo],
                 ["wal", "fetch", walnames.segment_name(1, 2), str(pg_wal / "RECOVERYXLOG"), "--repo", repo]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "backup_tool", *argv], cwd=root,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {ln.split("|")[-1].strip() for ln in done.stderr.splitlines() if ln.startswith("import time:")}
        assert ("backup_tool.physical.walack" if argv[1] == "push" else "backup_tool.physical.walspool") in imported
        assert not {m for m in imported if m.split(".")[0] in ("typer", "psycopg", "boto3", "botocore")}, argv
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == b"\1" * 1000


def test_a_scratch_recovery_is_told_what_it_cannot_need() -> None:
    """The segment after the archive's end, the next timeline's history probe and, on
    timeline 1, timeline 1's history file: nothing a recovery to a time inside the archive
    needs."""
    archive = segs(1, 3, 12)
    plan = pitr.choose_base_backup([base_manifest("B1", "0/3000028", "0/3000100", 1)], archive, {},
                                   pitr.Target("time", time=T0 + timedelta(minutes=6)))
    assert pitr.scratch_unneeded(plan) == ("00000002.history", "00000001.history", "00000001000000000000000D")
    forked = archive + segs(2, 6, 8, start_minute=20)
    plan2 = pitr.choose_base_backup([base_manifest("B1", "0/3000028", "0/3000100", 1)], forked,
                                    {2: wal.parse_history("1\t0/6012345\tbefore\n")},
                                    pitr.Target("time", time=T0 + timedelta(minutes=22)))
    assert plan2.timeline == 2
    assert pitr.scratch_unneeded(plan2) == ("00000003.history", "000000020000000000000009")


def test_a_recovery_run_now_is_told_only_what_the_archive_lacks() -> None:
    """``restore pitr`` answers "not archived" from files for what the plan's archive did not
    hold: the next timeline's history only while no promotion archived it."""
    plan = pitr.choose_base_backup([base_manifest("B1", "0/3000028", "0/3000100", 1)], segs(1, 3, 12), {},
                                   pitr.Target("latest"))
    assert pitr.known_absent(plan, frozenset()) == ("00000002.history", "00000001.history",
                                                    "00000001000000000000000D")
    assert pitr.known_absent(plan, frozenset({"00000002.history"})) == ("00000001.history",
                                                                          "00000001000000000000000D")


def test_the_restored_configuration_keeps_the_plain_restore_command(tmp_path: Path) -> None:
    """After the recovery the answers from files go and postgresql.auto.conf names ``wal
    fetch`` again: a later recovery of the restored cluster must ask the repository."""
    pgdata = tmp_path / "data"
    (pgdata / "pg_wal").mkdir(parents=True)
    plan = pitr.choose_base_backup([base_manifest("B1", "0/3000028", "0/3000100", 1)], segs(1, 3, 5), {},
                                   pitr.Target("latest"))
    plain = "backup-tool wal fetch %f %p --abort-on-error --repo 's3://b/x'"
    shell = pitr._scratch_restore_command(plain, pgdata, plan, pwd.getpwuid(os.getuid()).pw_name,
                                          pitr.known_absent(plan, frozenset()))
    (pgdata / "postgresql.auto.conf").write_text("port = 5433\n")
    pitr._append_conf(pgdata, {"restore_command": shell, "recovery_target_timeline": "latest"}, "recovery")
    walspool.prefetch_dir(pgdata / "pg_wal" / "RECOVERYXLOG").mkdir(parents=True)
    layout = pitr.Layout(plan, pgdata, "postgres", plain, {"restore_command": shell}, 0, 0.0)
    assert run_restore_command(shell, pgdata, "000000010000000000000006") == 1
    pitr.settle_restore_command(layout)
    text = (pgdata / "postgresql.auto.conf").read_text()
    assert f"\nrestore_command = {conf_quote(plain)}\nrecovery_target_timeline = 'latest'\n" in text
    assert "ln -f" not in text and text.startswith("port = 5433\n")
    assert list((pgdata / "pg_wal" / walspool.SPOOL_DIR).iterdir()) == []


def run_restore_command(command: str, pgdata: Path, name: str) -> int:
    """Run ``restore_command`` for ``name`` as PostgreSQL does (placeholders, /bin/sh, in
    the data directory)."""
    text = command.replace("%%", "\0").replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG").replace("\0", "%")
    (pgdata / "pg_wal" / "RECOVERYXLOG").unlink(missing_ok=True)
    return subprocess.run(["/bin/sh", "-c", text], cwd=pgdata).returncode


def test_a_scratch_restore_command_answers_from_files_in_the_shell(tmp_path: Path) -> None:
    """Read-ahead segments are linked into place (the one taken kept as NAME.taken for the
    second request PostgreSQL makes, older ones dropped), unneeded files are "not archived",
    anything else runs the tool."""
    pgdata = tmp_path / "data %x"
    (pgdata / "pg_wal").mkdir(parents=True)
    plan = pitr.choose_base_backup([base_manifest("B1", "0/3000028", "0/3000100", 1)], segs(1, 3, 5), {},
                                   pitr.Target("time", time=T0 + timedelta(minutes=1)))
    tool = "printf %s %f > tool-ran; exit 7"
    command = pitr._scratch_restore_command(tool, pgdata, plan, pwd.getpwuid(os.getuid()).pw_name)
    ahead = walspool.prefetch_dir(pgdata / "pg_wal" / "RECOVERYXLOG")
    ahead.mkdir(parents=True, exist_ok=True)
    first, second = "000000010000000000000003", "000000010000000000000004"
    for name in (first, second):
        (ahead / name).write_bytes(name.encode() * 10)
    got = pgdata / "pg_wal" / "RECOVERYXLOG"

    assert run_restore_command(command, pgdata, first) == 0 and got.read_bytes() == first.encode() * 10
    assert sorted(p.name for p in ahead.iterdir()) == [f"{first}.taken", second]
    assert run_restore_command(command, pgdata, second) == 0 and got.read_bytes() == second.encode() * 10
    assert sorted(p.name for p in ahead.iterdir()) == [f"{second}.taken"]
    assert run_restore_command(command, pgdata, second) == 0 and got.read_bytes() == second.encode() * 10
    assert not (pgdata / "tool-ran").exists()

    for unneeded in pitr.scratch_unneeded(plan):
        assert run_restore_command(command, pgdata, unneeded) == 1 and not got.exists()
    assert not (pgdata / "tool-ran").exists()
    assert run_restore_command(command, pgdata, "000000010000000000000005") == 7
    assert (pgdata / "tool-ran").read_text() == "000000010000000000000005"


def _six_archived_segments(tmp_path: Path) -> tuple[Any, list[str], Path, Path]:
    """A local repository holding six archived segments of timeline 1, an empty pg_wal, and
    where a RecoveryPrefetch in it lays its segments."""
    from backup_tool.repository.storage import open_storage

    storage = open_storage(str(tmp_path / "repo"))
    names = [wal.segment_name(1, n) for n in range(1, 7)]
    source = tmp_path / "source"
    source.mkdir()
    for i, name in enumerate(names):
        (source / name).write_bytes(os.urandom(64) + bytes([i]) * 50000)
        wal.push_file(storage, source / name)
    pg_wal = tmp_path / "data" / "pg_wal"
    pg_wal.mkdir(parents=True)
    return storage, names, pg_wal, pg_wal / walspool.SPOOL_DIR / "prefetch"


def test_recovery_prefetch_fetches_nothing_past_its_limit(tmp_path: Path) -> None:
    """Once a table PITR knows where recovery stops, the read-ahead fetches no segment after
    it (each one is decompressed, verified and written on the cores the restore needs), and
    a caller waiting for segments is not kept waiting for those it will never get."""
    storage, names, pg_wal, ahead = _six_archived_segments(tmp_path)
    prefetch = wal.RecoveryPrefetch(storage, names, pg_wal, lambda p: None, workers=1, window=6)
    prefetch.limit(3)
    prefetch.limit(5)  # a limit never widens
    prefetch.start()
    try:
        assert prefetch.wait_leading(6) == names[0:3]
        time.sleep(0.3)
        assert sorted(p.name for p in ahead.glob("0*")) == names[0:3]
        assert all((ahead / n).read_bytes() == (tmp_path / "source" / n).read_bytes() for n in names[0:3])
        assert prefetch.failure is None
    finally:
        assert sorted(prefetch.stop()) == names[0:3]
    for name in names:
        (ahead / name).unlink(missing_ok=True)
    waiting = wal.RecoveryPrefetch(storage, names, pg_wal, lambda p: None, workers=2, window=2).start()
    try:
        assert waiting.wait_leading(2) == names[0:2]
        time.sleep(0.2)  # the next worker waits for recovery to take one
        waiting.limit(2)
        assert waiting.wait_leading(6) == names[0:2]
        time.sleep(0.2)
        assert sorted(p.name for p in ahead.glob("0*")) == names[0:2]
    finally:
        assert sorted(waiting.stop()) == names[0:2]


def test_fetches_on_one_thread_share_a_decompressor_and_each_gets_its_own_content(tmp_path: Path) -> None:
    """One thread's downloads reuse one decompressor and buffer: a segment after one abandoned
    half-way, and after one whose stored object is damaged (refused), is still whole."""
    from backup_tool.errors import IntegrityError
    from backup_tool.repository.storage import open_storage

    storage = open_storage(str(tmp_path / "repo"))
    names = [wal.segment_name(1, n) for n in range(1, 4)]
    source = tmp_path / "source"
    source.mkdir()
    for i, name in enumerate(names):
        (source / name).write_bytes(os.urandom(3 << 20) + bytes([i]) * (2 << 20))
        wal.push_file(storage, source / name)
    dctx, buffer = wal._thread_tools()
    steps = wal._read_archived_into(storage, wal.open_archived(storage, names[0]), dctx, buffer)
    assert next(steps) > 0
    steps.close()
    wal.fetch(storage, names[1], tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == (source / names[1]).read_bytes()
    stored = tmp_path / "repo" / wal.open_archived(storage, names[2]).key
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.chmod(0o644)
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        wal.fetch(storage, names[2], tmp_path / "b")
    wal.fetch(storage, names[0], tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == (source / names[0]).read_bytes()
    assert wal._thread_tools()[0] is dctx


def test_recovery_prefetch_drops_what_it_holds_past_a_limit(tmp_path: Path) -> None:
    """The segments a table PITR's scan read past where recovery stops (up to the first
    commit after the time) are never replayed: once the limit says so they leave the
    read-ahead at once, those below it stay, and a segment asked for past it anyway is
    still fetched by the restore_command's fallback (the prologue finds nothing)."""
    storage, names, pg_wal, ahead = _six_archived_segments(tmp_path)
    prefetch = wal.RecoveryPrefetch(storage, names, pg_wal, lambda p: None, workers=2, window=6).start()
    try:
        assert prefetch.wait_leading(6) == names
        prefetch.limit(3)
        assert sorted(p.name for p in ahead.glob("0*")) == names[0:3]
        assert all((ahead / n).read_bytes() == (tmp_path / "source" / n).read_bytes() for n in names[0:3])
    finally:
        assert sorted(prefetch.stop()) == names


def test_a_stop_lets_recovery_ask_for_the_segment_after_its_own() -> None:
    seg = 16 << 20
    start = 0x14000028
    assert pitr.stop_segments(start, 0x14000100, seg) == 2
    assert pitr.stop_segments(start, 0x1D81AA98, seg) == 11  # 0x14..0x1D, and 0x1E
    assert pitr.stop_segments(start, 0x1DFFFFF0, seg) == 11
