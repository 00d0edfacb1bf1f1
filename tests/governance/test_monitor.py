"""Monitoring: the pure status verdict (each rule), Nagios exit codes and the one summary line
through the CLI, and the Prometheus textfile."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from simhistory import History, record, seed_schedule, ts

from backup_tool.config.policy import Policy
from backup_tool.core.walnames import segment_name
from backup_tool.governance.status import CRITICAL, OK, UNKNOWN, WARNING, Verification, WalState, evaluate
from backup_tool.jobs.status import write_textfile
from backup_tool.render.prometheus import prometheus_text
from backup_tool.repository.storage import open_storage

P = Policy()


def _check(report: Any, name: str) -> Any:
    return next(c for c in report.checks if c.name == name)


def test_fresh_full_is_ok() -> None:
    full = record("full", "2026-11-25T02:00Z")
    report = evaluate([full], [], None, P, ts("2026-11-25T03:00Z"))
    assert report.code == OK
    assert report.summary.startswith("BACKUP OK - ") and "| full_age=3600s" in report.summary
    assert "\n" not in report.summary


def test_no_full_is_critical() -> None:
    report = evaluate([], [], None, P, ts("2026-11-25T03:00Z"))
    assert report.code == CRITICAL and "no full backup" in report.summary


def test_missed_full_pages_after_grace_only() -> None:
    full = record("full", "2026-11-24T02:00Z")
    incr = record("incremental", "2026-11-25T00:00Z", parent=full.id)
    assert evaluate([full, incr], [], None, P, ts("2026-11-25T02:59Z")).code == OK
    report = evaluate([full, incr], [], None, P, ts("2026-11-25T03:01Z"))
    assert report.code == CRITICAL
    assert "full backup missed" in report.summary and "2026-11-25T02:00:00Z" in report.summary


def test_late_incremental_warns() -> None:
    full = record("full", "2026-11-25T02:00Z")
    report = evaluate([full], [], None, P, ts("2026-11-25T07:01Z"))
    assert report.code == WARNING and _check(report, "incremental").severity == WARNING
    assert "incremental late" in report.summary


def test_failed_verification_is_critical_and_stale_warns() -> None:
    full = record("full", "2026-11-20T02:00Z")
    latest = record("full", "2026-11-25T02:00Z")
    bad = Verification(ts("2026-11-25T05:00Z"), False, (latest.id,), False,
                       ({"name": f"objects {latest.id}", "ok": False, "detail": "sha256 mismatch"},))
    report = evaluate([full, latest], [bad], None, P, ts("2026-11-25T06:00Z"))
    assert report.code == CRITICAL and "sha256 mismatch" in report.summary
    good = replace(bad, ok=True, checks=())
    assert evaluate([full, latest], [good], None, P, ts("2026-11-25T06:00Z")).code == OK
    stale = replace(good, at=ts("2026-11-21T05:00Z"))
    report = evaluate([full, latest], [stale], None, P, ts("2026-11-25T06:00Z"))
    assert report.code == WARNING and "no verification in 48 h" in report.summary
    off = replace(P, monitoring=replace(P.monitoring, verify_max_age_hours=0))
    assert evaluate([full, latest], [], None, off, ts("2026-11-25T06:00Z")).code == OK


def test_wal_archive_rules() -> None:
    full = record("full", "2026-11-25T02:00Z")
    base = record("base", "2026-11-25T01:00Z", start_wal=segment_name(1, 10))
    now = ts("2026-11-25T03:00Z")
    names = tuple(segment_name(1, p) for p in range(10, 20))
    fresh = WalState(names, ts("2026-11-25T02:55Z"))
    assert evaluate([full, base], [], fresh, P, now).code == OK
    stale = WalState(names, ts("2026-11-25T01:30Z"))
    report = evaluate([full, base], [], stale, P, now)
    assert report.code == CRITICAL and "WAL archive stale" in report.summary
    gapped = WalState(tuple(n for n in names if n != segment_name(1, 14)), ts("2026-11-25T02:55Z"))
    report = evaluate([full, base], [], gapped, P, now)
    assert report.code == CRITICAL and "gap" in report.summary and segment_name(1, 14) in report.summary
    empty = WalState((), None)
    assert evaluate([full, base], [], empty, P, now).code == CRITICAL
    assert evaluate([full], [], empty, P, now).code == OK


def test_scheduled_base_missing_is_critical() -> None:
    policy = replace(P, schedule=replace(P.schedule, base="0 3 * * *"))
    full = record("full", "2026-11-25T02:00Z")
    assert evaluate([full], [], None, policy, ts("2026-11-25T05:00Z")).code == CRITICAL


def test_prometheus_text_and_atomic_write(tmp_path: Path) -> None:
    full = record("full", "2026-11-25T02:00Z", size_bytes=1234)
    ok = Verification(ts("2026-11-25T04:00Z"), True, (full.id,), False, ())
    report = evaluate([full], [ok], WalState((segment_name(1, 1),), ts("2026-11-25T04:30Z")), P,
                      ts("2026-11-25T05:00Z"), repository="s3://b/p")
    text = prometheus_text(report)
    lines = text.splitlines()
    assert 'backup_tool_status{repository="s3://b/p"} 0' in lines
    assert 'backup_tool_last_size_bytes{repository="s3://b/p",kind="full"} 1234' in lines
    assert any(ln.startswith('backup_tool_last_success_timestamp_seconds{repository="s3://b/p",kind="full"} ')
               for ln in lines)
    assert 'backup_tool_wal_archive_lag_seconds{repository="s3://b/p"} 1800' in lines
    assert 'backup_tool_verification_age_seconds{repository="s3://b/p"} 3600' in lines
    for ln in lines:
        if not ln.startswith("#"):
            name, value = ln.rsplit(" ", 1)
            float(value)
            assert name.startswith("backup_tool_") and name.endswith("}")
    target = tmp_path / "textfile" / "backup_tool.prom"
    write_textfile(target, text)
    write_textfile(target, text)
    assert target.read_text() == text
    assert [p.name for p in target.parent.iterdir()] == ["backup_tool.prom"]


def test_status_cli_exit_codes(cli: Any, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    h = History(open_storage(repo))
    seed_schedule(h, ts("2026-11-20T00:00Z"), 5, skip={ts("2026-11-24T18:00Z")})
    prom = tmp_path / "metrics.prom"
    proc = cli("status", "--repo", repo, "--now", "2026-11-24T17:00:00Z", "--prometheus", str(prom),
               "--policy", _no_verify_policy(tmp_path))
    assert proc.returncode == OK, proc.stdout + proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and proc.stdout.startswith("BACKUP OK")
    assert "backup_tool_status" in prom.read_text()
    late = cli("status", "--repo", repo, "--now", "2026-11-24T19:30:00Z", "--policy", _no_verify_policy(tmp_path))
    assert late.returncode == WARNING and late.stdout.startswith("BACKUP WARNING - incremental late")
    missed = cli("status", "--repo", repo, "--now", "2026-11-26T03:30:00Z", "--json")
    assert missed.returncode == CRITICAL
    data = missed.json()
    assert data["status"] == "CRITICAL" and data["code"] == 2 and "full backup missed" in data["summary"]
    unknown = cli("status", "--repo", "s3://", "--prometheus", str(prom))
    assert unknown.returncode == UNKNOWN and unknown.stdout.startswith("BACKUP UNKNOWN")
    assert 'backup_tool_up{repository="s3://"} 0' in prom.read_text()
    assert 'backup_tool_status{repository="s3://"} 3' in prom.read_text()
    badpolicy = cli("status", "--repo", repo, "--policy", str(tmp_path / "missing.toml"))
    assert badpolicy.returncode == UNKNOWN


def _no_verify_policy(tmp_path: Path) -> str:
    path = tmp_path / "noverify.toml"
    path.write_text("[monitoring]\nverify_max_age_hours = 0\n")
    return str(path)


def test_verification_records_are_read(cli: Any, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    storage = open_storage(repo)
    h = History(storage)
    full = h.full("2026-11-25T02:00Z")
    storage.put_bytes("verifications/20261125T050000000000Z-abcd.json", json.dumps(
        {"at": "2026-11-25T05:00:00Z", "backups": [full.id], "restore_test": False, "ok": False,
         "checks": [{"name": f"objects {full.id}", "ok": False, "detail": "data/1 damaged"}]}).encode())
    proc = cli("status", "--repo", repo, "--now", "2026-11-25T06:00:00Z")
    assert proc.returncode == CRITICAL and "last verification" in proc.stdout and "damaged" in proc.stdout
