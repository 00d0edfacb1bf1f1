"""Health checks (``backup-tool health``, run-due, status, audit): each check fails on a database
with its problem planted, naming the object and the figures, and passes once it is fixed; what
is due is a pure function of (records, policy, now)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from backup_tool.config import Settings
from backup_tool.errors import ConfigError, UsageError
from backup_tool.health import (
    HealthRecord,
    audit_table,
    decide_health_due,
    resolve_names,
    run_health,
    status_checks,
)
from backup_tool.policy import Policy, parse_policy
from conftest import DbHandle, PgServer

UTC = timezone.utc
P = Policy()


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def rec(check: str, at: str, ok: bool = True, detail: str = "") -> HealthRecord:
    return HealthRecord(check, ts(at), ok, "ok" if ok else "fail", detail, "app", at)


# ----------------------------------------------------------------------------- pure: what is due


def test_nothing_recorded_every_check_is_due() -> None:
    plan = decide_health_due([], P, ts("2025-08-25T10:00:00Z"))
    assert plan.checks == ["schema", "rls", "foreign_keys", "index_performance", "function_execution"]
    assert {d.reason for d in plan.due} == {"never run"}


def test_documented_frequencies_daily_and_weekly() -> None:
    # 2025-08-25 is a Monday; the document's next checks: daily 2025-08-26 09:00, weekly Saturday 2025-08-30 09:00.
    monday = ts("2025-08-25T09:05:00Z")
    runs = [rec(c, "2025-08-25T09:01:00Z") for c in ("schema", "foreign_keys", "function_execution")] + \
        [rec(c, "2025-08-23T09:01:00Z") for c in ("rls", "index_performance")]
    plan = decide_health_due(runs, P, monday)
    assert plan.checks == []
    assert dict(plan.next_runs) == {"schema": ts("2025-08-26T09:00:00Z"), "rls": ts("2025-08-30T09:00:00Z"),
                                    "foreign_keys": ts("2025-08-26T09:00:00Z"),
                                    "index_performance": ts("2025-08-30T09:00:00Z"),
                                    "function_execution": ts("2025-08-26T09:00:00Z")}
    # Tuesday 09:00: the three daily checks are due, the weekly ones are not.
    assert decide_health_due(runs, P, ts("2025-08-26T09:00:00Z")).checks == [
        "schema", "foreign_keys", "function_execution"]
    assert decide_health_due(runs, P, ts("2025-08-26T08:59:59Z")).checks == []
    # Saturday: all five; a failed run still covers its slot (it is reported, not re-run).
    sat = decide_health_due(runs, P, ts("2025-08-30T09:30:00Z"))
    assert sat.checks == ["schema", "rls", "foreign_keys", "index_performance", "function_execution"]
    failed = runs + [rec("rls", "2025-08-30T09:31:00Z", ok=False)]
    assert "rls" not in decide_health_due(failed, P, ts("2025-08-30T09:40:00Z")).checks


def test_missed_days_run_once_and_policy_frequencies() -> None:
    runs = [rec("schema", "2025-08-20T09:00:00Z")]
    due = decide_health_due(runs, P, ts("2025-08-25T12:00:00Z"))
    item = next(d for d in due.due if d.check == "schema")
    assert item.slot == ts("2025-08-25T09:00:00Z") and "last run 2025-08-20T09:00:00Z" in item.reason
    after = runs + [rec("schema", "2025-08-25T12:00:05Z")]
    assert "schema" not in decide_health_due(after, P, ts("2025-08-25T12:05:00Z")).checks
    policy = parse_policy('[schedule]\ntimezone = "Europe/Paris"\n[health]\nschema = "30 6 * * *"\nrls = ""\n'
                          'foreign_keys = "hourly"\nindex_performance = "off"\nfunction_execution = "weekly"\n',
                          "p.toml")
    plan = decide_health_due([rec("function_execution", "2025-08-23T07:00:00Z")], policy,
                             ts("2025-08-25T05:00:00Z"))
    assert plan.checks == ["schema", "foreign_keys"]
    assert plan.due[0].slot == ts("2025-08-25T04:30:00Z")  # 06:30 Paris (CEST)
    assert [n for n, _ in plan.next_runs] == ["schema", "foreign_keys", "function_execution"]


@pytest.mark.parametrize("text, needle", [
    ('[health]\nschema = "sometimes"\n', "health.schema"),
    ('[health]\nexposed_schemas = []\n', "exposed_schemas"),
    ('[health]\nsmoke_calls = "SELECT 1"\n', "wrong type"),
    ('[health]\nbloat_ratio = 2\n', "bloat_ratio"),
    ('[health]\ncolour = "red"\n', "unknown key health.colour"),
])
def test_bad_health_policy_is_refused(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_policy(text, "bad.toml")


def test_unknown_check_name_is_a_usage_error() -> None:
    assert resolve_names(["rls,schema"]) == ["schema", "rls"]
    with pytest.raises(UsageError, match="'nope'"):
        resolve_names(["nope"])


# ----------------------------------------------------------------------------- pure: status and audit


def test_status_failed_warns_overdue_warns_then_critical() -> None:
    never = status_checks([], P, ts("2025-08-25T12:00:00Z"))
    assert [(s.check, s.severity) for s in never] == [(c, 0) for c in
                                                      ("schema", "rls", "foreign_keys", "index_performance",
                                                       "function_execution")]
    runs = [rec(c, "2025-08-25T09:01:00Z") for c in ("schema", "foreign_keys", "function_execution")] + \
        [rec("rls", "2025-08-23T09:01:00Z"), rec("index_performance", "2025-08-23T09:01:00Z", ok=False,
                                                  detail="duplicate indexes on public.projects")]
    now = {s.check: s for s in status_checks(runs, P, ts("2025-08-25T12:00:00Z"))}
    assert now["schema"].severity == 0 and now["rls"].severity == 0
    assert now["index_performance"].severity == 1 and "duplicate indexes" in now["index_performance"].detail
    # The next daily slot (Tue 09:00) passes its 60 min grace: WARNING; a second missed slot: CRITICAL.
    assert {s.check: s.severity for s in status_checks(runs, P, ts("2025-08-26T09:59:00Z"))}["schema"] == 0
    late = {s.check: s for s in status_checks(runs, P, ts("2025-08-26T10:01:00Z"))}
    assert late["schema"].severity == 1 and "overdue" in late["schema"].detail
    very = {s.check: s for s in status_checks(runs, P, ts("2025-08-27T10:01:00Z"))}
    assert very["schema"].severity == 2 and "more than one period" in very["schema"].detail
    assert very["rls"].severity == 0  # weekly: next slot Saturday


def test_audit_table_is_the_documents_table() -> None:
    runs = [rec("schema", "2025-08-25T09:01:00Z"), rec("rls", "2025-08-23T09:01:00Z"),
            rec("foreign_keys", "2025-08-24T09:01:00Z", ok=False, detail="orphan"),
            rec("foreign_keys", "2025-08-25T09:01:00Z")]
    table = audit_table(runs, P, ts("2025-08-25T10:00:00Z"), ts("2025-07-26T10:00:00Z"))
    rows = {r["check"]: r for r in table["checks"]}
    assert (rows["schema"]["frequency"], rows["schema"]["last_status"], rows["schema"]["next_check"]) == (
        "Daily", "passed", "2025-08-26T09:00:00Z")
    assert (rows["rls"]["frequency"], rows["rls"]["next_check"]) == ("Weekly", "2025-08-30T09:00:00Z")
    assert rows["index_performance"]["last_status"] == "never run"
    assert table["failures"] == [{"check": "foreign_keys", "at": "2025-08-24T09:01:00Z", "database": "app",
                                  "detail": "orphan"}]
