"""Schedule: cron parsing and slots (time zones, DST), what is due (pure, exhaustive and
property-based), and the crontab / systemd / Kubernetes renderings."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simhistory import record, ts
from support.paths import REPO_ROOT

from backup_tool.config.policy import Policy, Retention, Schedule, parse_policy
from backup_tool.config.settings import Settings
from backup_tool.core.cron import next_slot, parse_cron, previous_slot, slots_between
from backup_tool.core.timestamps import parse_ts
from backup_tool.errors import ConfigError, UsageError
from backup_tool.governance.due import decide_due
from backup_tool.render.units import render_schedule

UTC = timezone.utc
P = Policy()


# ----------------------------------------------------------------------------- cron


@pytest.mark.parametrize("expr", ["0 2 * * *", "*/15 * * * *", "0 0 1,15 * *", "30 4 * jan-mar mon-fri",
                                  "0 0 * * 7", "5-10/2 */3 * * SUN", "@daily", "@hourly", "@weekly", "0 12 L-1 * *"[:0] + "0 12 1 * *"])
def test_valid_cron(expr: str) -> None:
    _agrees_with_croniter(expr, datetime(2026, 11, 25, 13, 7, tzinfo=UTC), fires=8)


def _agrees_with_croniter(expr: str, start: datetime, fires: int) -> None:
    """The parser's next slots equal those of croniter, an independent implementation."""
    from croniter import croniter

    reference = croniter(expr, start)
    now = start
    for _ in range(fires):
        mine = next_slot(expr, "UTC", now)
        theirs = reference.get_next(datetime)
        assert mine == theirs, (expr, now)
        assert mine is not None
        now = mine


def _field(lo: int, hi: int, star_step: bool = True) -> st.SearchStrategy[str]:
    """One cron field. Left out, because croniter reads them unlike Vixie cron: one-value ranges
    (croniter takes ``0-0`` in day of week for "every day") and ``*/n`` in the day fields
    (Vixie treats them as unrestricted for the day-of-month/day-of-week OR rule)."""
    value = st.integers(lo, hi)
    rng = st.tuples(value, value).filter(lambda ab: ab[0] != ab[1]).map(lambda ab: f"{min(ab)}-{max(ab)}")
    step = st.integers(1, hi - lo + 1)
    item = st.one_of(value.map(str), rng, st.tuples(rng, step).map(lambda rs: f"{rs[0]}/{rs[1]}"))
    listed = st.lists(item, min_size=1, max_size=3).map(",".join)
    stars = [st.just("*")] + ([step.map(lambda s: f"*/{s}")] if star_step else [])
    return st.one_of(*stars, listed)


@settings(max_examples=150, deadline=None)
@given(minute=_field(0, 59), hour=_field(0, 23), dom=_field(1, 28, star_step=False), month=_field(1, 12),
       dow=_field(0, 6, star_step=False), minute_of_start=st.integers(0, 60 * 24 * 400))
def test_cron_next_fire_times_match_croniter(minute: str, hour: str, dom: str, month: str, dow: str,
                                             minute_of_start: int) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minute_of_start, seconds=17)
    _agrees_with_croniter(f"{minute} {hour} {dom} {month} {dow}", start, fires=4)


@pytest.mark.parametrize("expr, needle", [
    ("0 2 * *", "fields"), ("60 2 * * *", "minute"), ("0 24 * * *", "hour"), ("0 0 0 * *", "day of month"),
    ("0 0 * 13 *", "month"), ("0 0 * * 8", "day of week"), ("0 0 * * mon-", "day of week"),
    ("*/0 * * * *", "step"), ("5-1 * * * *", "backwards"), ("x * * * *", "minute"), ("@reboot", "fields"),
])
def test_invalid_cron_names_the_field(expr: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_cron(expr)


def test_default_schedule_slots_in_one_day() -> None:
    day = ts("2026-11-25T00:00:00Z")
    assert slots_between("0 2 * * *", "UTC", day, day + timedelta(days=1)) == [ts("2026-11-25T02:00:00Z")]
    assert [s.hour for s in slots_between("0 */6 * * *", "UTC", day, day + timedelta(days=1))] == [0, 6, 12, 18]


def test_day_of_month_or_day_of_week() -> None:
    slots = slots_between("0 0 13 * 5", "UTC", ts("2026-11-01"), ts("2026-12-01"))
    days = [s.day for s in slots]
    assert days == [6, 13, 20, 27]  # Fridays (6, 20, 27 and the 13th, itself a Friday)
    only_fridays = slots_between("0 0 * * fri", "UTC", ts("2026-11-01"), ts("2026-12-01"))
    assert [s.day for s in only_fridays] == [6, 13, 20, 27]
    thirteenth_or_monday = slots_between("0 0 13 * mon", "UTC", ts("2026-11-01"), ts("2026-12-01"))
    assert [s.day for s in thirteenth_or_monday] == [2, 9, 13, 16, 23, 30]


def test_timezone_is_honoured_across_dst() -> None:
    winter = slots_between("0 2 * * *", "America/New_York", ts("2026-01-10"), ts("2026-01-11"))
    summer = slots_between("0 2 * * *", "America/New_York", ts("2026-07-10"), ts("2026-07-11"))
    assert winter == [ts("2026-01-10T07:00:00Z")] and summer == [ts("2026-07-10T06:00:00Z")]


def test_dst_gap_and_overlap_fire_once() -> None:
    spring = slots_between("30 2 * * *", "Europe/Paris", ts("2026-03-28T12:00Z"), ts("2026-03-30T12:00Z"))
    assert spring == [ts("2026-03-29T01:30:00Z"), ts("2026-03-30T00:30:00Z")]  # 02:30 does not exist: 03:30 CEST
    autumn = slots_between("30 2 * * *", "Europe/Paris", ts("2026-10-24T12:00Z"), ts("2026-10-26T12:00Z"))
    assert autumn == [ts("2026-10-25T00:30:00Z"), ts("2026-10-26T01:30:00Z")]  # 02:30 twice: fires once
    hourly = slots_between("0 * * * *", "Europe/Paris", ts("2026-10-24T21:00Z"), ts("2026-10-25T03:00Z"))
    assert len(hourly) == len(set(hourly)) == 5  # the repeated 02:00 fires once, at its first occurrence


def test_previous_and_next_slot() -> None:
    now = ts("2026-11-25T13:00:00Z")
    assert previous_slot("0 2 * * *", "UTC", now) == ts("2026-11-25T02:00:00Z")
    assert previous_slot("0 2 * * *", "UTC", ts("2026-11-25T02:00:00Z")) == ts("2026-11-25T02:00:00Z")
    assert next_slot("0 */6 * * *", "UTC", now) == ts("2026-11-25T18:00:00Z")
    assert previous_slot("0 0 29 2 *", "UTC", now) == ts("2024-02-29T00:00:00Z")
    assert previous_slot("0 0 30 2 *", "UTC", now) is None
    assert previous_slot("", "UTC", now) is None


CRONS = ["0 2 * * *", "0 */6 * * *", "*/20 * * * *", "15 3 * * mon", "0 0 1 * *", "0 9-17 * * 1-5", "0 0 13 * 5"]
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
instants = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2028, 12, 31)).map(
    lambda d: d.replace(tzinfo=UTC))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(CRONS), st.sampled_from(ZONES), instants)
def test_previous_and_next_bracket_now(expr: str, tz: str, now: datetime) -> None:
    prev, nxt = previous_slot(expr, tz, now), next_slot(expr, tz, now)
    assert prev is not None and nxt is not None and prev <= now < nxt
    assert slots_between(expr, tz, prev, nxt + timedelta(seconds=1)) in ([prev, nxt], [prev, nxt])
    assert not slots_between(expr, tz, prev + timedelta(seconds=1), nxt)


def test_parse_ts() -> None:
    assert parse_ts("2026-08-25T14:02:00Z") == ts("2026-08-25T14:02:00Z")
    assert parse_ts("2026-08-25T14:02:00") == ts("2026-08-25T14:02:00Z")
    assert parse_ts("2026-08-25T16:02:00+02:00") == ts("2026-08-25T14:02:00Z")
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_ts("yesterday")


# ----------------------------------------------------------------------------- policy keys


@pytest.mark.parametrize("text, needle", [
    ("[schedule]\nfull = '0 25 * * *'\n", "schedule] full"),
    ("[schedule]\ntimezone = 'Mars/Olympus'\n", "schedule.timezone"),
    ("[schedule]\nrun_due = ''\n", "run_due"),
    ("[retention]\ngarbage_grace_hours = 0\n", "garbage_grace_hours"),
    ("[audit]\nwindow_days = 0\n", "audit.window_days"),
    ("[monitoring]\nverify_max_age_hours = -1\n", "monitoring"),
])
def test_bad_schedule_policy(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy(text, "/etc/p.toml")
    assert "/etc/p.toml" in str(err.value) and needle in str(err.value)


def test_optional_schedules_may_be_empty() -> None:
    p = parse_policy("[schedule]\nincremental = ''\nbase = ''\nmaintenance = ''\n", "x.toml")
    assert p.schedule.incremental == ""


def test_shipped_policies_load() -> None:
    root = REPO_ROOT / "policies"
    paths = sorted(root.glob("*.toml"))
    assert [p.name for p in paths] == ["compliance.toml", "default.toml", "staging.toml"]
    for path in paths:
        assert parse_policy(path.read_text(), str(path)).name == path.stem


# ----------------------------------------------------------------------------- due


def test_empty_repository_needs_a_full() -> None:
    plan = decide_due([], P, ts("2026-11-25T13:00Z"))
    assert plan.kinds == ["full"] and "no full" in plan.items[0].reason


def test_full_slot_not_taken_then_taken() -> None:
    now = ts("2026-11-25T02:03Z")
    yesterday = record("full", "2026-11-24T02:00:30Z")
    incr = record("incremental", "2026-11-25T00:00:20Z", parent=yesterday.id)
    plan = decide_due([yesterday, incr], P, now)
    assert plan.kinds == ["full"] and plan.items[0].slot == ts("2026-11-25T02:00Z")
    today = record("full", "2026-11-25T02:03Z")
    assert decide_due([yesterday, incr, today], P, now).kinds == []


def test_missed_full_is_taken_late_once() -> None:
    old = record("full", "2026-11-23T02:00Z")
    now = ts("2026-11-25T09:30Z")
    plan = decide_due([old], P, now)
    assert plan.kinds == ["full"] and "missed, taking it now" in plan.items[0].reason
    late = record("full", "2026-11-25T09:30Z")
    assert decide_due([old, late], P, now + timedelta(minutes=5)).kinds == []


def test_incremental_due_and_covered_by_full() -> None:
    full = record("full", "2026-11-25T02:00Z")
    assert decide_due([full], P, ts("2026-11-25T05:59Z")).kinds == []
    plan = decide_due([full], P, ts("2026-11-25T06:01Z"))
    assert plan.kinds == ["incremental"] and plan.items[0].slot == ts("2026-11-25T06:00Z")
    incr = record("incremental", "2026-11-25T06:01Z", parent=full.id)
    assert decide_due([full, incr], P, ts("2026-11-25T06:02Z")).kinds == []


def test_chain_at_max_length_takes_a_full() -> None:
    policy = replace(P, retention=replace(P.retention, max_chain_length=2))
    full = record("full", "2026-11-25T02:00Z")
    i1 = record("incremental", "2026-11-25T06:00Z", parent=full.id)
    i2 = record("incremental", "2026-11-25T12:00Z", parent=i1.id)
    plan = decide_due([full, i1, i2], policy, ts("2026-11-25T18:00Z"))
    assert plan.kinds == ["full"] and "max_chain_length 2" in plan.items[0].reason
    assert decide_due([full, i1], policy, ts("2026-11-25T12:00Z")).kinds == ["incremental"]


def test_a_backup_counts_from_when_it_started() -> None:
    """A full taken on the 25th never covers the 27th's slot, whatever run-due was told."""
    full = record("full", "2026-11-25T02:00Z")
    taken_now = record("full", "2026-11-25T13:00Z")
    plan = decide_due([full, taken_now], P, ts("2026-11-27T03:00Z"))
    assert plan.kinds == ["full"] and plan.items[0].slot == ts("2026-11-27T02:00Z")


def test_backups_after_now_are_ignored() -> None:
    later = record("full", "2026-11-30T02:00Z")
    assert decide_due([later], P, ts("2026-11-25T13:00Z")).kinds == ["full"]


def test_incrementals_off_and_base_schedule() -> None:
    policy = replace(P, schedule=replace(P.schedule, incremental="", base="0 3 * * 0"))
    full = record("full", "2026-11-25T02:00Z")
    plan = decide_due([full], policy, ts("2026-11-25T13:00Z"))
    assert plan.kinds == ["base"]
    base = record("base", "2026-11-25T13:00Z")
    assert decide_due([full, base], policy, ts("2026-11-25T13:05Z")).kinds == []
    assert decide_due([full, base], policy, ts("2026-11-29T03:00Z")).kinds == ["full", "base"]


def test_policy_timezone_decides_the_slot() -> None:
    policy = replace(P, schedule=replace(P.schedule, timezone="Europe/Paris"))
    full = record("full", "2026-11-25T01:30Z")  # 02:30 Paris: after the 02:00 Paris slot
    assert decide_due([full], policy, ts("2026-11-25T04:30Z")).kinds == []
    assert decide_due([full], P, ts("2026-11-25T04:30Z")).kinds == ["full"]  # 02:00 UTC slot not taken


@st.composite
def histories(draw: Any) -> tuple[list[Any], datetime]:
    start = ts("2026-11-01T00:00Z")
    n = draw(st.integers(0, 12))
    backups: list[Any] = []
    t = start
    for _ in range(n):
        t += timedelta(minutes=draw(st.integers(1, 60 * 40)))
        kind = draw(st.sampled_from(["full", "incremental"])) if backups else "full"
        parent = backups[-1].id if kind == "incremental" else None
        backups.append(record(kind, t, parent=parent))
    now = t + timedelta(minutes=draw(st.integers(0, 60 * 72)))
    return backups, now


@settings(max_examples=300, deadline=None)
@given(histories(), st.sampled_from(["UTC", "Europe/Paris", "America/New_York"]),
       st.integers(1, 8))
def test_run_due_twice_takes_at_most_one(history: tuple[list[Any], datetime], tz: str, chain: int) -> None:
    backups, now = history
    policy = Policy(schedule=Schedule(timezone=tz), retention=Retention(max_chain_length=chain))
    plan = decide_due(backups, policy, now)
    assert len(plan.items) <= 1
    if plan.items:
        item = plan.items[0]
        parent = backups[-1].id if item.kind == "incremental" else None
        taken = record(item.kind, now, parent=parent)
        assert decide_due(backups + [taken], policy, now).kinds == []
        assert decide_due(backups + [taken], policy, now + timedelta(minutes=3)).kinds in ([], ["incremental"], ["full"])


# ----------------------------------------------------------------------------- rendering


def _settings(policy: Policy | None = None) -> Settings:
    return Settings("s3://acme-backups/prod", "postgresql://app:s3cr3t-pw@db.internal:5432/app", policy or P)


def test_cron_rendering() -> None:
    text = render_schedule(_settings(), "cron", ["/usr/local/bin/backup-tool"])
    assert "s3cr3t-pw" not in text
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert "BACKUP_TOOL_REPO=s3://acme-backups/prod" in lines
    assert any(ln.startswith("DATABASE_URL=") and "db.internal" in ln for ln in lines)
    jobs = [ln for ln in lines if ln[0].isdigit() or ln[0] == "*"]
    assert jobs[0].startswith("*/5 * * * *") and "/usr/local/bin/backup-tool run-due --json" in jobs[0]
    assert "status --prometheus" in jobs[0]
    assert jobs[1].startswith("30 5 * * *") and "retention apply" in jobs[1] and "verify latest" in jobs[1]
    for job in jobs:
        parse_cron(" ".join(job.split()[:5]))


def test_systemd_rendering() -> None:
    policy = replace(P, schedule=replace(P.schedule, timezone="Europe/Paris", maintenance="30 5 * * 1-5"))
    text = render_schedule(_settings(policy), "systemd", ["/usr/bin/backup-tool"], name="app")
    assert "s3cr3t-pw" not in text
    assert "# --- /etc/systemd/system/backup-tool-app-run-due.timer ---" in text
    assert "OnCalendar=*-*-* *:00,05,10,15,20,25,30,35,40,45,50,55:00 Europe/Paris" in text
    assert "OnCalendar=Mon,Tue,Wed,Thu,Fri *-*-* 05:30:00 Europe/Paris" in text
    assert "ExecStart=/usr/bin/backup-tool run-due --json" in text
    service = text.split("# --- /etc/systemd/system/backup-tool-app-run-due.service ---")[1].split("# ---")[0]
    exec_lines = [ln for ln in service.splitlines() if ln.startswith("Exec")]
    # the metrics refresh runs after success *and* failure of run-due: systemd skips a second
    # ExecStart of a oneshot once the first failed, never an ExecStopPost
    assert exec_lines == ["ExecStart=/usr/bin/backup-tool run-due --json",
                          "ExecStopPost=-/usr/bin/backup-tool status --prometheus /var/lib/node_exporter/textfile_collector/backup_tool.prom"]
    assert "EnvironmentFile=/etc/backup-tool/app.env" in text and "Persistent=true" in text


def test_kubernetes_rendering_is_valid_yaml_with_secret_refs() -> None:
    yaml = pytest.importorskip("yaml")
    text = render_schedule(_settings(replace(P, schedule=replace(P.schedule, timezone="Europe/Paris"))),
                           "kubernetes", ["backup-tool"], image="registry.example/backup-tool:1.0")
    assert "s3cr3t-pw" not in text
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [d["kind"] for d in docs] == ["CronJob", "CronJob"]
    run_due = docs[0]
    assert run_due["spec"]["schedule"] == "*/5 * * * *" and run_due["spec"]["timeZone"] == "Europe/Paris"
    assert run_due["spec"]["concurrencyPolicy"] == "Forbid"
    container = run_due["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/backup-tool:1.0"
    assert "backup-tool run-due --json" in container["command"][-1]
    assert container["envFrom"][0]["secretRef"]["name"] == "backup-tool-app"
    assert {"name": "BACKUP_TOOL_REPO", "value": "s3://acme-backups/prod"} in container["env"]
    assert all(e["name"] != "DATABASE_URL" for e in container["env"])
    assert docs[1]["spec"]["schedule"] == "30 5 * * *"


def test_unparsable_dsn_is_named_not_dropped() -> None:
    bad = Settings("s3://acme-backups/prod", "nonsense=1 s3cr3t-pw", P)
    for fmt in ("cron", "systemd", "kubernetes"):
        with pytest.raises(ConfigError, match="DSN") as err:
            render_schedule(bad, fmt, ["backup-tool"])
        assert "s3cr3t-pw" not in str(err.value)


def test_unknown_format() -> None:
    with pytest.raises(UsageError):
        render_schedule(_settings(), "launchd", ["backup-tool"])


def test_schedule_cli(cli: Any, tmp_path: Path) -> None:
    proc = cli("schedule", "--repo", str(tmp_path / "r"), "--format", "cron")
    assert proc.returncode == 0, proc.stderr
    assert "run-due" in proc.stdout and "BACKUP_TOOL_REPO=" in proc.stdout
    data = cli.json("schedule", "--repo", str(tmp_path / "r"), "--format", "systemd")
    assert data["format"] == "systemd" and "[Timer]" in data["text"]
    bad = cli("schedule", "--repo", str(tmp_path / "r"), "--format", "launchd")
    assert bad.returncode == 2 and "unknown schedule format" in bad.stderr
