"""Compliance audit: schedule adherence (pure), and the full report over two weeks of
simulated history before and after retention, in JSON, Markdown and self-contained HTML."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from backup_tool.governance.audit import Candidate, build_report, render_html, render_markdown, schedule_adherence
from backup_tool.governance.status import Verification, WalState
from backup_tool.config.policy import Policy
from backup_tool.core.walnames import segment_name
from backup_tool.repository.storage import open_storage
from simhistory import History, record, seed_schedule, ts

P = Policy()


def test_slot_statuses() -> None:
    start, now = ts("2026-11-24T00:00Z"), ts("2026-11-25T12:59Z")
    cands = [Candidate("F1", "full", ts("2026-11-24T02:10Z")),          # full slot 24th met
             Candidate("I1", "incremental", ts("2026-11-24T06:00Z")),   # met exactly at the slot
             Candidate("I2", "incremental", ts("2026-11-24T14:30Z")),   # 12:00 slot late (grace 60 min)
             Candidate("F2", "full", ts("2026-11-25T04:00Z")),          # full 25th late; also the 00:00 incr? no
             Candidate("D1", "incremental", ts("2026-11-25T06:20Z"), deleted=True)]
    slots = {(s.schedule, s.slot.strftime("%d %H")): s for s in schedule_adherence(cands, P, start, now)}
    assert slots[("full", "24 02")].status == "met" and slots[("full", "24 02")].backup_id == "F1"
    assert slots[("incremental", "24 00")].status == "late"  # the 02:10 full covers it, late
    assert slots[("incremental", "24 00")].backup_id == "F1"
    assert slots[("incremental", "24 06")].backup_id == "I1"
    assert slots[("incremental", "24 12")].status == "late" and slots[("incremental", "24 12")].backup_id == "I2"
    assert slots[("incremental", "24 18")].status == "missed"
    assert slots[("full", "25 02")].status == "late" and slots[("full", "25 02")].backup_id == "F2"
    assert slots[("incremental", "25 00")].status == "late"  # the late full covers it, late
    assert slots[("incremental", "25 00")].backup_id == "F2"

    assert slots[("incremental", "25 06")].status == "met" and slots[("incremental", "25 06")].backup_deleted
    assert slots[("incremental", "25 12")].status == "pending"
    assert len(slots) == 2 + 7


def test_each_backup_meets_one_slot_per_schedule() -> None:
    policy = replace(P, schedule=replace(P.schedule, incremental="*/10 * * * *", grace_minutes=60))
    cands = [Candidate("I1", "incremental", ts("2026-11-25T00:05Z"))]
    slots = schedule_adherence(cands, policy, ts("2026-11-25T00:00Z"), ts("2026-11-25T02:00Z"))
    incr = [s for s in slots if s.schedule == "incremental"]
    assert sum(1 for s in incr if s.backup_id == "I1") == 1


def test_findings_and_verdict() -> None:
    now = ts("2026-11-25T12:00Z")
    full = record("full", "2026-11-25T02:00Z", expires_days=30)
    incr = record("incremental", "2026-11-25T06:00Z", parent=full.id)
    clean_policy = replace(P, audit=replace(P.audit, window_days=1))
    ok = Verification(ts("2026-11-25T07:00Z"), True, (full.id,), True,
                      ({"name": f"objects {full.id}", "ok": True}, {"name": f"restore_test {full.id}", "ok": True}))
    report = build_report([full, incr], [], [ok], None, clean_policy, now)
    assert report.verdict == "COMPLIANT", report.findings
    row = report.backups[0]
    assert row.last_verified == ts("2026-11-25T07:00Z") and row.last_restore_test_ok is True
    locked = replace(clean_policy, object_lock=replace(P.object_lock, mode="compliance"))
    report = build_report([full, incr], [], [ok], None, locked, now)
    assert report.verdict == "NON-COMPLIANT"
    assert any(f.area == "immutability" and full.id in f.message for f in report.findings)
    orphan = record("incremental", "2026-11-25T06:00Z", parent="20261101T000000Z-Fgone")
    report = build_report([full, orphan], [], [ok], None, clean_policy, now)
    assert any(f.area == "integrity" and "cannot be restored" in f.message for f in report.findings)


def test_pitr_coverage_and_gaps() -> None:
    now = ts("2026-11-25T12:00Z")
    base = record("base", "2026-11-17T03:00Z", start_wal=segment_name(1, 100))
    full = record("full", "2026-11-25T02:00Z")
    names = tuple(segment_name(1, p) for p in range(100, 200) if p != 150)
    report = build_report([base, full], [], [], WalState(names, ts("2026-11-25T11:59Z")), P, now)
    assert report.pitr.gaps == ((segment_name(1, 150), segment_name(1, 150)),)
    assert any(f.area == "pitr" and "gap" in f.message for f in report.findings)
    whole = tuple(segment_name(1, p) for p in range(100, 200))
    report = build_report([base, full], [], [], WalState(whole, ts("2026-11-25T11:59Z")), P, now)
    assert report.pitr.recoverable_from == base.finished_at and not [f for f in report.findings if f.area == "pitr"]


def test_two_weeks_of_history_audit_and_retention(cli: Any, tmp_path: Path) -> None:
    """The acceptance scenario: every slot met or missed correctly, retention deletes exactly
    what the policy says, the audit still accounts for deleted backups from the log, and an
    early deletion (retention run with a future --now) is flagged."""
    repo = str(tmp_path / "repo")
    storage = open_storage(repo)
    h = History(storage)
    missed = {ts("2026-11-05T02:00Z"), ts("2026-11-09T12:00Z"), ts("2026-11-12T18:00Z")}
    late = {ts("2026-11-07T18:00Z"): timedelta(hours=3), ts("2026-11-10T02:00Z"): timedelta(hours=2)}
    seed_schedule(h, ts("2026-11-01T00:00Z"), 14, skip=missed, delay=late)
    now = "2026-11-15T00:30:00Z"

    audit = cli.json("audit", "--repo", repo, "--now", now)
    slots = audit["schedule"]["slots"]
    by_slot = {(s["schedule"], s["slot"]): s for s in slots}
    expected_full = [f"2026-11-{d:02d}T02:00:00Z" for d in range(2, 15)]  # the window opens at the first full
    assert sorted(s for k, s in by_slot if k == "full") == expected_full
    assert by_slot[("full", "2026-11-05T02:00:00Z")]["status"] == "missed"
    assert by_slot[("full", "2026-11-10T02:00:00Z")]["status"] == "late"
    assert by_slot[("incremental", "2026-11-09T12:00:00Z")]["status"] == "missed"
    assert by_slot[("incremental", "2026-11-12T18:00:00Z")]["status"] == "missed"
    assert by_slot[("incremental", "2026-11-07T18:00:00Z")]["status"] == "late"
    assert by_slot[("incremental", "2026-11-15T00:00:00Z")]["status"] == "pending"
    bad = {k for k, s in by_slot.items() if s["status"] not in ("met", "pending")}
    assert bad == {("full", "2026-11-05T02:00:00Z"), ("full", "2026-11-10T02:00:00Z"),
                   ("incremental", "2026-11-09T12:00:00Z"), ("incremental", "2026-11-12T18:00:00Z"),
                   ("incremental", "2026-11-07T18:00:00Z")}
    assert audit["schedule"]["counts"]["full"] == {"met": 11, "late": 1, "missed": 1, "pending": 0}
    assert audit["verdict"] == "NON-COMPLIANT"
    assert any("2 incremental slot(s) missed" in f["message"] for f in audit["findings"])
    assert any(f["area"] == "retention" and "past expiry" in f["message"] for f in audit["findings"])

    plan = cli.json("retention", "apply", "--repo", repo, "--now", now, "--dry-run")
    applied = cli.json("retention", "apply", "--repo", repo, "--now", now)
    assert applied["deleted"] == plan["deleted"] and len(applied["deleted"]) > 10
    by_id = {m.id: m for m in h.manifests}
    for backup_id in applied["deleted"]:
        m = by_id[backup_id]
        assert m.kind == "incremental" and m.expires_at <= ts(now)
    kept = set(applied["kept"])
    for backup_id in kept:
        m = by_id[backup_id]
        if m.parent_id:
            assert m.parent_id in kept
    assert {m.id for m in h.manifests if m.kind == "full"} <= kept

    after = cli.json("audit", "--repo", repo, "--now", now)
    after_slots = {(s["schedule"], s["slot"]): s["status"] for s in after["schedule"]["slots"]}
    assert after_slots == {k: s["status"] for k, s in by_slot.items()}
    deleted_slots = [s for s in after["schedule"]["slots"] if s["backup_deleted"]]
    assert len(deleted_slots) == len(applied["deleted"])
    assert {d["id"] for d in after["deletions"]} == set(applied["deleted"])
    assert not any(f["area"] == "retention" for f in after["findings"])
    assert after["retention_runs"] == 1

    early = cli.json("retention", "apply", "--repo", repo, "--now", "2027-02-01T00:00:00Z")
    assert early["deleted"]
    flagged = cli.json("audit", "--repo", repo)
    assert any(f["severity"] == "critical" and "before its expiry" in f["message"] for f in flagged["findings"])

    md = cli("audit", "--repo", repo, "--now", now, "--format", "markdown")
    assert md.returncode == 0 and md.stdout.startswith("# Backup compliance audit — NON-COMPLIANT")
    assert "| 2026-11-05T02:00:00Z | full | MISSED | — | — |" in md.stdout
    strict = cli("audit", "--repo", repo, "--now", now, "--strict")
    assert strict.returncode == 3
    out = tmp_path / "audit.html"
    written = cli.json("audit", "--repo", repo, "--now", now, "--format", "html", "--output", str(out))
    assert written["verdict"] == "NON-COMPLIANT" and written["output"] == str(out)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "PITR window" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must be self-contained"
    assert "<script" not in page


def test_renderers_escape_and_handle_empty(tmp_path: Path) -> None:
    report = build_report([], [], [], None, P, ts("2026-11-25T12:00Z"), repository="/r/<x>")
    assert report.verdict == "NON-COMPLIANT"  # every slot in the window missed
    page = render_html(report)
    assert "/r/&lt;x&gt;" in page and "<x>" not in page
    assert "# Backup compliance audit" in render_markdown(report)
    json.dumps(report.to_dict())
    assert isinstance(report.now, datetime)
