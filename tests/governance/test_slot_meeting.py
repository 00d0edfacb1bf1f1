"""One rule decides which backup meets a slot (``schedule.meet_slot``), and ``run-due`` and
``audit`` both judge by it; ``run-due --now`` only plans (``--dry-run``), so no backup is
ever recorded against a slot that has not come yet."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from simhistory import History, record, ts

from backup_tool.config.policy import Policy, Retention, Schedule
from backup_tool.core.cron import previous_slot
from backup_tool.governance.audit import Candidate, schedule_adherence
from backup_tool.governance.due import SlotStatus, decide_due, meet_slot
from backup_tool.repository.storage import open_storage

UTC = timezone.utc
P = Policy()
GRACE = timedelta(minutes=60)


def _c(bid: str, kind: str, when: str) -> Candidate:
    return Candidate(bid, kind, ts(when))


# ----------------------------------------------------------------------------- the rule


def test_on_time_late_pending_missed() -> None:
    slot, following = ts("2026-11-25T02:00Z"), ts("2026-11-26T02:00Z")
    on_time = meet_slot("full", slot, following, GRACE, ts("2026-11-25T12:00Z"), [_c("F", "full", "2026-11-25T03:00Z")])
    assert (on_time.status, on_time.backup and on_time.backup.id) == (SlotStatus.MET, "F")
    late = meet_slot("full", slot, following, GRACE, ts("2026-11-25T12:00Z"), [_c("F", "full", "2026-11-25T03:01Z")])
    assert (late.status, late.backup and late.backup.id) == (SlotStatus.LATE, "F")
    assert meet_slot("full", slot, following, GRACE, ts("2026-11-25T02:59Z"), []).status is SlotStatus.PENDING
    assert meet_slot("full", slot, following, GRACE, ts("2026-11-25T03:00Z"), []).status is SlotStatus.MISSED


def test_which_backups_can_meet_a_slot() -> None:
    slot, following = ts("2026-11-25T06:00Z"), ts("2026-11-25T12:00Z")
    now = ts("2026-11-25T20:00Z")
    before = _c("I0", "incremental", "2026-11-25T05:59Z")
    at_next = _c("I2", "incremental", "2026-11-25T12:00Z")
    assert meet_slot("incremental", slot, following, GRACE, now, [before, at_next]).status is SlotStatus.MISSED
    full = _c("F", "full", "2026-11-25T06:30Z")
    assert meet_slot("incremental", slot, following, GRACE, now, [full]).backup == full
    incr = _c("I1", "incremental", "2026-11-25T06:10Z")
    assert meet_slot("full", ts("2026-11-25T02:00Z"), None, GRACE, now, [incr]).status is SlotStatus.MISSED
    assert meet_slot("incremental", slot, following, GRACE, ts("2026-11-25T06:05Z"), [incr]).status \
        is SlotStatus.PENDING, "a backup after now does not exist yet"
    earliest = meet_slot("incremental", slot, following, GRACE, now, [full, incr])
    assert earliest.backup == incr


def test_run_due_and_audit_agree_on_a_backup_at_the_next_slot() -> None:
    """Hourly incrementals with a 60 min grace, one backup at exactly 01:00. run-due at 01:30
    calls 01:00 covered; the audit must not later call 01:00 missed (it used to give that
    backup to 00:00)."""
    policy = replace(P, schedule=replace(P.schedule, full="0 2 * * *", incremental="0 * * * *", grace_minutes=60))
    full = record("full", "2026-11-24T02:00Z", rid="F")
    at_one = record("incremental", "2026-11-25T01:00Z", parent="F", rid="I")
    assert decide_due([full, at_one], policy, ts("2026-11-25T01:30Z")).kinds == []
    cands = [Candidate(b.id, b.kind, b.started_at) for b in (full, at_one)]
    slots = {(s.schedule, s.slot): s for s in
             schedule_adherence(cands, policy, ts("2026-11-24T23:30Z"), ts("2026-11-25T03:30Z"))}
    assert (slots[("incremental", ts("2026-11-25T01:00Z"))].status,
            slots[("incremental", ts("2026-11-25T01:00Z"))].backup_id) == ("met", "I")
    assert slots[("incremental", ts("2026-11-25T00:00Z"))].status == "missed"


@st.composite
def histories(draw: Any) -> tuple[list[Any], datetime]:
    t = ts("2026-11-01T00:00Z")
    backups: list[Any] = []
    for i in range(draw(st.integers(1, 14))):
        t += timedelta(minutes=draw(st.integers(0, 60 * 30)))
        kind = draw(st.sampled_from(["full", "incremental"])) if backups else "full"
        parent = backups[-1].id if kind == "incremental" else None
        backups.append(record(kind, t, parent=parent, rid=f"b{i:02d}"))
    return backups, t + timedelta(minutes=draw(st.integers(0, 60 * 48)))


@settings(max_examples=300, deadline=None)
@given(histories(), st.sampled_from(["UTC", "Europe/Paris", "America/New_York"]),
       st.sampled_from(["0 */6 * * *", "0 * * * *", "30 1,13 * * mon-fri"]), st.integers(0, 180))
def test_run_due_is_due_exactly_when_the_audit_finds_the_slot_unmet(
        history: tuple[list[Any], datetime], tz: str, incremental: str, grace: int) -> None:
    backups, now = history
    policy = Policy(schedule=Schedule(timezone=tz, incremental=incremental, grace_minutes=grace),
                    retention=Retention(max_chain_length=100))
    cands = [Candidate(b.id, b.kind, b.started_at) for b in backups]
    audit = {(s.schedule, s.slot): s for s in schedule_adherence(cands, policy, ts("2026-10-20T00:00Z"), now)}
    plan = decide_due(backups, policy, now)
    full_slot = previous_slot(policy.schedule.full, tz, now)
    assert full_slot is not None
    assert ("full" in plan.kinds) == (audit[("full", full_slot)].backup_id is None)
    if "full" not in plan.kinds:
        incr_slot = previous_slot(incremental, tz, now)
        incr_met = incr_slot is None or audit[("incremental", incr_slot)].backup_id is not None
        assert ("incremental" in plan.kinds) == (not incr_met)


# ----------------------------------------------------------------------------- the CLI


def test_run_due_now_only_plans(cli: Any, tmp_path: Path) -> None:
    """``run-due --now <tomorrow>`` used to take a real backup today and record it as
    tomorrow's; now it is refused (exit 2, one line), and ``--dry-run`` says what would be
    taken at that time and why, taking nothing."""
    repo = str(tmp_path / "repo")
    h = History(open_storage(repo))
    full = h.full("2026-11-25T02:01Z")
    before = sorted(p.relative_to(repo) for p in Path(repo).rglob("*"))
    dsn = "postgresql://app@127.0.0.1:1/app?connect_timeout=2"

    refused = cli("run-due", "--repo", repo, "--dsn", dsn, "--now", "2026-11-26T02:05:00Z")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "--dry-run" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.relative_to(repo) for p in Path(repo).rglob("*")) == before

    plan = cli.json("run-due", "--repo", repo, "--dsn", dsn, "--now", "2026-11-26T02:05:00Z", "--dry-run")
    assert plan["dry_run"] is True and plan["taken"] == []
    assert plan["due"] == [{"kind": "full", "slot": "2026-11-26T02:00:00Z",
                            "reason": "full slot 2026-11-26T02:00:00Z not taken yet"}]
    assert sorted(p.relative_to(repo) for p in Path(repo).rglob("*")) == before

    covered = cli.json("run-due", "--repo", repo, "--dsn", dsn, "--now", "2026-11-25T05:00:00Z", "--dry-run")
    assert covered["due"] == [] and f"full: {full.id} covers slot 2026-11-25T02:00:00Z (met)" in covered["notes"]
    text = cli("run-due", "--repo", repo, "--dsn", dsn, "--now", "2026-11-26T04:00:00Z", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert ("would take full for slot 2026-11-26T02:00:00Z: full slot 2026-11-26T02:00:00Z not taken yet "
            "(missed, taking it now)") in text.stdout
    assert "dry run: nothing taken" in text.stdout

    audit = cli.json("audit", "--repo", repo, "--now", "2026-11-26T04:00:00Z")
    slot = next(s for s in audit["schedule"]["slots"] if s["slot"] == "2026-11-26T02:00:00Z" and s["schedule"] == "full")
    assert slot["status"] == "missed", "what run-due plans to take, the audit calls missed"
