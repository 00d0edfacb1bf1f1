"""Health checks (``backup-tool health``, run-due, status, audit): each check fails on a database
with its problem planted, naming the object and the figures, and passes once it is fixed; what
is due is a pure function of (records, policy, now)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from support.clusters import DbHandle, PgServer

from backup_tool.config.policy import Policy, parse_policy
from backup_tool.config.settings import Settings
from backup_tool.errors import ConfigError, UsageError
from backup_tool.governance.health import HealthRecord, audit_table, decide_health_due, status_checks
from backup_tool.jobs.health import resolve_names, run_health

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


# ----------------------------------------------------------------------------- live database, planted problems

SCHEMA = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN NOINHERIT; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN NOINHERIT; END IF;
END $$;
CREATE SCHEMA "Billing";
CREATE TABLE public.profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text UNIQUE NOT NULL,
                              tags text[] DEFAULT '{}');
CREATE TABLE public.projects (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                              owner_id uuid NOT NULL REFERENCES public.profiles (id), "Name" text NOT NULL);
CREATE INDEX projects_owner_id_idx ON public.projects (owner_id);
CREATE TABLE public.documents (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                               project_id bigint NOT NULL REFERENCES public.projects (id) ON DELETE CASCADE,
                               body jsonb NOT NULL DEFAULT '{}');
CREATE INDEX documents_project_id_idx ON public.documents (project_id);
CREATE TABLE public.page_views (profile_id uuid NOT NULL REFERENCES public.profiles (id), viewed_at date NOT NULL,
                                path text) PARTITION BY RANGE (viewed_at);
CREATE TABLE public.page_views_2025 PARTITION OF public.page_views FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE public.page_views_2026 PARTITION OF public.page_views FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX page_views_profile_idx ON public.page_views (profile_id, viewed_at);
CREATE TABLE "Billing"."Invoices" (id bigint PRIMARY KEY, profile_id uuid REFERENCES public.profiles (id),
                                   amount numeric(12, 2));
CREATE INDEX invoices_profile_idx ON "Billing"."Invoices" (profile_id);
ALTER TABLE public.profiles ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.documents ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.page_views ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_views ON public.page_views FOR SELECT TO authenticated USING (path IS NOT NULL);
CREATE POLICY own_profile ON public.profiles FOR SELECT TO authenticated USING (email = current_user);
CREATE POLICY own_projects ON public.projects FOR ALL TO authenticated USING (owner_id IS NOT NULL);
CREATE POLICY project_documents ON public.documents FOR SELECT TO authenticated
    USING (EXISTS (SELECT 1 FROM public.projects p WHERE p.id = project_id));
GRANT SELECT ON ALL TABLES IN SCHEMA public TO anon, authenticated;
CREATE FUNCTION public.project_count(owner uuid) RETURNS bigint LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT count(*) FROM public.projects WHERE owner_id = owner);
END $$;
CREATE FUNCTION public.recent_audit() RETURNS bigint LANGUAGE plpgsql STABLE AS $$
DECLARE n bigint;
BEGIN
  SELECT count(*) INTO n FROM public.audit_trail WHERE at > now() - interval '1 day';
  RETURN n;
END $$;
CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.body := NEW.body || jsonb_build_object('touched', true);
  RETURN NEW;
END $$;
CREATE TRIGGER documents_touch BEFORE UPDATE ON public.documents FOR EACH ROW EXECUTE FUNCTION public.touch();
CREATE FUNCTION public.email_of(p uuid) RETURNS text LANGUAGE sql STABLE AS
    $$ SELECT email FROM public.profiles WHERE id = p $$;
INSERT INTO public.profiles (id, email) VALUES ('00000000-0000-0000-0000-000000000001', 'ana@example.com'),
                                               ('00000000-0000-0000-0000-000000000002', 'zoë@example.com');
INSERT INTO public.projects (owner_id, "Name") SELECT '00000000-0000-0000-0000-000000000001', 'p' || g
  FROM generate_series(1, 3) g;
INSERT INTO public.documents (project_id, body) SELECT 1 + g % 3, jsonb_build_object('n', g)
  FROM generate_series(1, 3000) g;
INSERT INTO public.page_views SELECT '00000000-0000-0000-0000-000000000001', date '2025-12-25' + g, '/p/' || g
  FROM generate_series(1, 20) g;
INSERT INTO "Billing"."Invoices" VALUES (1, '00000000-0000-0000-0000-000000000002', 10.50), (2, NULL, 3);
"""
AUDIT_TRAIL = """
CREATE TABLE public.audit_trail (at timestamptz NOT NULL DEFAULT now(), what text);
ALTER TABLE public.audit_trail ENABLE ROW LEVEL SECURITY;
CREATE POLICY audit_read ON public.audit_trail FOR SELECT TO authenticated USING (true);
GRANT SELECT ON public.audit_trail TO anon, authenticated;
INSERT INTO public.audit_trail (what) VALUES ('created');
"""
SMOKE = "SELECT public.recent_audit()"


@pytest.fixture(scope="module")
def health_db(pg_server: PgServer) -> Iterator[DbHandle]:
    """One small Supabase-like database for the module; each test plants a problem and undoes it."""
    db = pg_server.create_db("health_src")
    try:
        with db.connect() as conn:
            conn.execute(SCHEMA + AUDIT_TRAIL + "ANALYZE;")
        yield db
    finally:
        pg_server.drop_db(db.name)


def settings_for(db: DbHandle, tmp_path: Path, health: str = "") -> Settings:
    policy = parse_policy(f"[health]\n{health}", str(tmp_path / "policy.toml"))
    (tmp_path / "repo").mkdir(exist_ok=True)
    return Settings(repo_url=str(tmp_path / "repo"), dsn=db.dsn, policy=policy)


def one(db: DbHandle, tmp_path: Path, name: str, health: str = "", full: bool = False) -> Any:
    report = run_health(settings_for(db, tmp_path, health), [name], full=full)
    [check] = report.checks
    return check


def failing(check: Any) -> list[str]:
    return [f.message for f in check.findings if f.level.value == "fail"]


def test_clean_database_passes_every_check(health_db: DbHandle, tmp_path: Path) -> None:
    report = run_health(settings_for(health_db, tmp_path, f'smoke_calls = ["{SMOKE}"]\n'))
    levels = {c.name: c.level.value for c in report.checks}
    assert levels == {"schema": "warn", "rls": "ok", "foreign_keys": "ok", "index_performance": "ok",  # noqa
                      "function_execution": "ok"}, "\n".join(c.detail for c in report.checks)
    assert report.ok
    schema = report.checks[0]
    assert schema.detail.startswith("not checked: no backup of database 'health_src'")


def test_rls_disabled_on_a_policy_table(health_db: DbHandle, tmp_path: Path) -> None:
    health_db.execute("ALTER TABLE public.documents DISABLE ROW LEVEL SECURITY")
    try:
        check = one(health_db, tmp_path, "rls")
        assert not check.ok
        assert failing(check) == [
            "public.documents has 1 policies but RLS is disabled (they are not applied)",
            "public.documents is readable by anon, authenticated with RLS disabled (every row exposed)"]
    finally:
        health_db.execute("ALTER TABLE public.documents ENABLE ROW LEVEL SECURITY")
    assert one(health_db, tmp_path, "rls").level.value == "ok"


def test_rls_exposed_schema_setting(health_db: DbHandle, tmp_path: Path) -> None:
    check = one(health_db, tmp_path, "rls", 'exposed_schemas = ["public", "Billing"]\n')
    assert failing(check) == ['"Billing"."Invoices" in exposed schema Billing has RLS disabled']


def test_unindexed_foreign_key_and_duplicate_index(health_db: DbHandle, tmp_path: Path) -> None:
    health_db.execute("DROP INDEX public.documents_project_id_idx")
    health_db.execute("CREATE INDEX projects_owner_again ON public.projects (owner_id)")
    try:
        check = one(health_db, tmp_path, "index_performance")
        messages = failing(check)
        assert len(messages) == 2, messages
        assert messages[0].startswith("duplicate indexes on public.projects: projects_owner_again, "
                                      "projects_owner_id_idx (same columns")
        assert messages[1].startswith("foreign key documents_project_id_fkey on public.documents (project_id) "
                                      "has no index leading with its columns (table ")
    finally:
        health_db.execute("DROP INDEX public.projects_owner_again")
        health_db.execute("CREATE INDEX documents_project_id_idx ON public.documents (project_id)")
    fixed = one(health_db, tmp_path, "index_performance")
    assert fixed.level.value == "ok", fixed.detail


def test_invalid_index_fails(health_db: DbHandle, tmp_path: Path) -> None:
    health_db.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = '\"Billing\".invoices_profile_idx'::regclass")
    try:
        check = one(health_db, tmp_path, "index_performance")
        assert failing(check) == ['index "Billing".invoices_profile_idx on Invoices is invalid (a failed CREATE '
                                  'INDEX CONCURRENTLY?): REINDEX or drop it']
    finally:
        health_db.execute('REINDEX INDEX "Billing".invoices_profile_idx')
    assert one(health_db, tmp_path, "index_performance").ok


def test_function_referencing_a_dropped_table(health_db: DbHandle, tmp_path: Path) -> None:
    health_db.execute("DROP TABLE public.audit_trail")
    try:
        smoke = one(health_db, tmp_path, "function_execution", f'smoke_calls = ["{SMOKE}"]\n')
        assert not smoke.ok
        smoke_failures = [m for m in failing(smoke) if m.startswith("smoke call")]
        assert len(smoke_failures) == 1
        assert smoke_failures[0].startswith(f"smoke call '{SMOKE}' failed after ")
        assert smoke_failures[0].endswith('relation "public.audit_trail" does not exist')
        with health_db.connect() as conn:
            deep_available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'plpgsql_check'").fetchone() is not None
        if deep_available:
            deep = one(health_db, tmp_path, "function_execution")
            assert failing(deep) == ['public.recent_audit() line 4: relation "public.audit_trail" does not exist']
        with health_db.connect() as conn:
            assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'plpgsql_check'").fetchone() == (0,)
    finally:
        with health_db.connect() as conn:
            conn.execute(AUDIT_TRAIL)
    fixed = one(health_db, tmp_path, "function_execution", f'smoke_calls = ["{SMOKE}"]\n')
    assert fixed.level.value == "ok", fixed.detail
    assert "1 smoke call(s) ok: 'SELECT public.recent_audit()'" in fixed.detail


def test_orphan_rows_exhaustive_and_sampled(health_db: DbHandle, tmp_path: Path) -> None:
    with health_db.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE public.documents SET project_id = 99")
        conn.execute('INSERT INTO "Billing"."Invoices" VALUES (3, \'00000000-0000-0000-0000-0000000000ff\', 1)')
    try:
        full = one(health_db, tmp_path, "foreign_keys", full=True)
        assert [m.split(" (")[0] for m in failing(full)] == [
            '"Billing"."Invoices"."Invoices_profile_id_fkey": 1 orphan row(s) referencing public.profiles',
            "public.documents.documents_project_id_fkey: 3000 orphan row(s) referencing public.projects"]
        sampled = one(health_db, tmp_path, "foreign_keys", "fk_sample_rows = 2000\n")
        messages = failing(sampled)
        assert messages[0].startswith('"Billing"."Invoices"."Invoices_profile_id_fkey": 1 orphan row(s)')
        assert messages[1].startswith("public.documents.documents_project_id_fkey: at least ")
        assert "orphan row(s) in a 66.6667% sample of ~3000 rows" in messages[1]
    finally:
        with health_db.connect() as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("UPDATE public.documents SET project_id = 1 + id % 3")
            conn.execute('DELETE FROM "Billing"."Invoices" WHERE id = 3')
    fixed = one(health_db, tmp_path, "foreign_keys", "fk_sample_rows = 2000\n")
    assert fixed.level.value == "ok"
    assert "sampled 1 key(s) on tables above 2000 rows: public.documents.documents_project_id_fkey 66.6667% of ~3000 rows" \
        in fixed.detail


# ----------------------------------------------------------------------------- CLI end to end


@pytest.mark.slow
def test_cli_run_due_status_audit_and_schema_drift(cli: Any, health_db: DbHandle, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[health]\nsmoke_calls = ["{SMOKE}"]\n')
    common = ["--repo", repo, "--dsn", health_db.dsn, "--policy", str(policy)]
    health_db.execute("CREATE INDEX projects_owner_again ON public.projects (owner_id)")
    try:
        ran = cli.json("run-due", *common)
    finally:
        health_db.execute("DROP INDEX public.projects_owner_again")
    assert [t["kind"] for t in ran["taken"]] == ["full"]
    checks = {c["name"]: c for c in ran["health"]["ran"]["checks"]}
    assert [d["check"] for d in ran["health"]["due"]] == list(checks)
    assert checks["schema"]["level"] == "ok" and checks["schema"]["detail"].startswith(
        f"live schema matches backup {ran['taken'][0]['id']}")
    assert checks["index_performance"]["ok"] is False
    assert "duplicate indexes on public.projects" in checks["index_performance"]["detail"]
    assert [k.name for k in (Path(repo) / "health-log").iterdir()] == [Path(ran["health"]["record"]).name]
    again = cli.json("run-due", *common)["health"]
    assert (again["due"], again["ran"], again["record"]) == ([], None, None)

    metrics = tmp_path / "m.prom"
    status = cli("status", *common, "--prometheus", metrics)
    assert status.returncode == 1 and status.stdout.startswith(
        "BACKUP WARNING - health check index_performance failed at "), status.stdout
    prom = metrics.read_text()
    assert 'backup_tool_health_last_ok{repository="' in prom
    last_ok = {ln.split('check="')[1].split('"')[0]: ln.rsplit(" ", 1)[1]
               for ln in prom.splitlines() if ln.startswith("backup_tool_health_last_ok")}
    assert last_ok == {"schema": "1", "rls": "1", "foreign_keys": "1", "index_performance": "0",
                       "function_execution": "1"}
    assert 'check="health_index_performance"} 1' in prom

    audit = cli("audit", *common, "--format", "markdown")
    assert audit.returncode == 0
    text = audit.stdout
    assert "| check | frequency | last status | last run | next check |" in text
    assert "| Index performance | Weekly | FAILED |" in text and "| Schema validation | Daily | passed |" in text
    assert "index_performance: duplicate indexes on public.projects" in text
    assert "| WARNING | health | health check index_performance failed" in text

    # Since the backup the duplicate index was dropped; now a column is added: both are drift.
    health_db.execute("ALTER TABLE public.projects ADD COLUMN archived boolean")
    try:
        drifted = cli("health", *common, "--check", "schema", "--json")
        assert drifted.returncode == 3, drifted.stderr
        body = drifted.json()
        assert body["ok"] is False and [c["name"] for c in body["checks"]] == ["schema"]
        detail = body["checks"][0]["detail"]
        assert detail.startswith(f"live schema drifted from backup {ran['taken'][0]['id']}: ")
        assert "-CREATE INDEX projects_owner_again ON public.projects USING btree (owner_id)" in detail
        assert "+    archived boolean" in detail
    finally:
        health_db.execute("ALTER TABLE public.projects DROP COLUMN archived")
    health_db.execute("CREATE INDEX projects_owner_again ON public.projects (owner_id)")
    try:
        fixed = cli("health", *common, "--check", "schema", "--check", "rls", "--record")
    finally:
        health_db.execute("DROP INDEX public.projects_owner_again")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert fixed.stdout.splitlines()[0].startswith("ok    schema  live schema matches backup")
    assert fixed.stdout.splitlines()[-1] == "verdict: OK"
    assert len(list((Path(repo) / "health-log").iterdir())) == 2

    bad = cli("health", *common, "--check", "speed")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "backup-tool: error: unknown health check 'speed' — choose from: schema, rls, foreign_keys, "
        "index_performance, function_execution")
