"""Compliance audit: schedule adherence (pure), and the full report over two weeks of
simulated history before and after retention, in JSON, Markdown and self-contained HTML."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from simhistory import History, record, seed_schedule, ts

from backup_tool.config.policy import Policy
from backup_tool.core.walnames import segment_name
from backup_tool.governance.audit import BackupEvidence, Candidate, build_report, repository_state, schedule_adherence
from backup_tool.governance.status import RestoreTest, Verification, WalState
from backup_tool.render.audit import render, render_html, render_markdown
from backup_tool.repository.retention_log import LogEntry
from backup_tool.repository.storage import open_storage
from backup_tool.repository.storage.base import AtRest, ObjectLock

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


TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|\+00:00| UTC)?")


def test_one_timestamp_style_to_the_second_everywhere() -> None:
    """Real backups start at microsecond times; reasons and notes carry times from elsewhere:
    every time in every format reads 2026-11-25T02:00:00Z."""
    now = ts("2026-11-25T12:00:00.654321Z")
    full = record("full", "2026-11-25T02:00:07.123456Z", lock_mode="compliance",
                  lock_until=ts("2026-12-25T02:00:07.123456Z"))
    gone = LogEntry("run1", ts("2026-11-24T01:00:00.5Z"), "20261101T020000Z-Fgone", "full",
                    ts("2026-11-01T02:00:00.25Z"), None, ts("2026-12-01T02:00:00.25Z"),
                    ("expired 2026-12-01T02:00:00.250000+00:00",), "default")
    check = Verification(ts("2026-11-25T07:00:00.999999Z"), True, (full.id,), False,
                         ({"name": f"objects {full.id}", "ok": True},))
    report = build_report([full], [gone], [check], None, P, now,
                          facts=["first seen 2026-11-20T01:02:03.456789Z"])
    for fmt in ("json", "markdown", "html"):
        text = render(report, fmt)
        shown = set(TIMESTAMP.findall(text))
        assert shown and {t for t in shown if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", t)} == set(), fmt
        assert "2026-11-25T02:00:07Z" in text and "2026-12-01T02:00:00Z" in text and "2026-11-20T01:02:03Z" in text


def test_empty_sections_say_none() -> None:
    report = build_report([], [], [], None, P, ts("2026-11-25T12:00Z"))
    md = render_markdown(report)
    sections = dict(re.findall(r"^## (.+?)\n\n(.*?)(?=^## |\Z)", md, re.S | re.M))
    for title in ("Scope", "Backups", "Point-in-time recovery", "Restore tests (recovery-time evidence)",
                  "Verification runs", "Health checks"):
        assert re.search(r"^(- )?none$", sections[title], re.M), (title, sections[title])
    assert re.search(r"Deletions \(append-only log\):\n\nnone$", sections["Retention adherence"], re.M)


def test_scope_encryption_lock_and_repository_state() -> None:
    """Each backup says where it was taken and how it is kept at rest; the scope groups the
    sources; an old backup that records no host says so; the store's lock is checked against
    the recorded one; the repository state digest is the documented sha256."""
    now = ts("2026-11-25T12:00Z")
    until = ts("2026-12-25T02:00Z")
    new = record("full", "2026-11-25T02:00Z", lock_mode="compliance", lock_until=until)
    old = record("full", "2026-11-24T02:00Z", lock_mode="compliance", lock_until=until)
    other = record("full", "2026-11-25T03:00Z", database="crm")
    evidence = {
        new.id: BackupEvidence("db1.internal:5432", "7301234567890123456", "0.1.0", "k-3f2a",
                               AtRest("aws:kms", "arn:aws:kms:eu-west-1:1:key/x", ObjectLock("compliance", until))),
        old.id: BackupEvidence(None, "7301234567890123456", None, None, AtRest("AES256", None, None)),
        other.id: BackupEvidence("db2.internal:5432", "7309999999999999999", "0.1.0", None, AtRest(applicable=False)),
    }
    state = repository_state([(f"manifests/{b.id}.json", f"{i}" * 64) for i, b in enumerate((new, old, other))])
    lines = "".join(sorted(f"manifests/{b.id}.json {i}" + f"{i}" * 63 + "\n" for i, b in enumerate((new, old, other))))
    assert state.sha256 == hashlib.sha256(lines.encode()).hexdigest() and state.manifests == 3
    report = build_report([new, old, other], [], [], None, P, now, backup_evidence=evidence,
                          tool_version="0.1.0", repo_state=state)
    body = report.to_dict()
    assert body["tool_version"] == "0.1.0" and body["repository_state"]["sha256"] == state.sha256
    assert [(s["database"], s["host"], s["system_identifier"], s["backups"]) for s in body["scope"]] == [
        ("app", None, "7301234567890123456", 1), ("app", "db1.internal:5432", "7301234567890123456", 1),
        ("crm", "db2.internal:5432", "7309999999999999999", 1)]
    rows = {b["id"]: b for b in body["backups"]}
    assert rows[new.id]["encryption"] == {"client_side_key_id": "k-3f2a", "sse": "aws:kms",
                                          "sse_kms_key_id": "arn:aws:kms:eu-west-1:1:key/x",
                                          "text": "client-side key k-3f2a; SSE aws:kms (KMS key arn:aws:kms:eu-west-1:1:key/x)"}
    assert rows[new.id]["store_lock"] == {"mode": "compliance", "retain_until": "2026-12-25T02:00:00Z", "legal_hold": False}
    assert rows[old.id]["store_lock"] == {"mode": None, "retain_until": None, "legal_hold": False}
    assert rows[other.id]["encryption"]["text"] == "no client-side encryption; no SSE (local directory)"
    assert [f.message for f in report.findings if f.area == "immutability"] == [
        f"{old.id} records Object Lock until 2026-12-25T02:00:00Z but the store holds no lock on its manifest"]
    md = render_markdown(report)
    assert "| app | not recorded | 7301234567890123456 | 1 |" in md
    assert f"- Repository state read: sha256 {state.sha256} of 3 manifest(s)" in md
    assert "- Tool: backup-tool 0.1.0" in md
    assert "compliance until 2026-12-25T02:00:00Z (store); compliance until 2026-12-25T02:00:00Z (recorded)" in md
    assert "none (store); compliance until 2026-12-25T02:00:00Z (recorded)" in md


def test_restore_test_durations_and_backups_covered() -> None:
    now = ts("2026-11-25T12:00Z")
    a, b = record("full", "2026-11-24T02:00Z"), record("full", "2026-11-25T02:00Z")
    old_run = Verification(ts("2026-11-24T05:00Z"), True, (a.id,), True,
                           ({"name": f"objects {a.id}", "ok": True}, {"name": f"restore_test {a.id}", "ok": True}))
    new_run = Verification(ts("2026-11-25T05:00Z"), True, (a.id, b.id), True,
                           ({"name": f"objects {a.id}", "ok": True}, {"name": f"objects {b.id}", "ok": True},
                            {"name": f"restore_test {b.id}", "ok": True}), "",
                           (RestoreTest(b.id, True, 12.34),))
    report = build_report([a, b], [], [old_run, new_run], None, P, now)
    body = report.to_dict()
    assert [v["restore_tests"] for v in body["verifications"]] == [None, [{"backup": b.id, "ok": True, "seconds": 12.34}]]
    assert {r["id"]: r["last_restore_test_seconds"] for r in body["backups"]} == {a.id: None, b.id: 12.34}
    md = render_markdown(report)
    assert f"| {a.id} | 2026-11-24T05:00:00Z | ok | not recorded |" in md
    assert f"| {b.id} | 2026-11-25T05:00:00Z | ok | 12.3 s |" in md
    assert f"| 2026-11-25T05:00:00Z | ok | {a.id}, {b.id} | yes |" in md
    assert "2026-11-25T05:00:00Z ok in 12.3 s" in md and "2026-11-24T05:00:00Z ok (duration not recorded)" in md


def test_retention_state_is_not_said_twice() -> None:
    """A retained backup reads "retained until …", never "retained: retained until …"."""
    now = ts("2026-11-25T12:00Z")
    full = record("full", "2026-11-25T02:00Z")
    report = build_report([full], [], [], None, P, now)
    for text in (render_markdown(report), render_html(report)):
        assert "retained until 2026-12-25" in text
        assert "retained: retained" not in text
