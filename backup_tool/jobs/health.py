"""Health checks on the live database, as the seed's "Migration Monitoring → Health Checks"
table runs them: schema validation, RLS policy verification, foreign key integrity, index
performance and function execution, each on its own frequency.

Each check gives a *level*: ``ok``, ``warn`` (``ok`` stays true: something to look at, or the
check could not be compared, e.g. no backup yet) or ``fail`` (``ok`` false; ``health`` exits 3),
with a one-line detail and the findings behind it (object, level, message with the measured
figures). The checks only read: the RLS, foreign key and index checks are plain queries; the
function check validates bodies and runs the policy's smoke calls inside transactions that
are always rolled back (smoke calls in a READ ONLY one).

* ``schema`` — the live schema against the migrations folder when the policy names one (as
  ``schema diff`` does), else against the newest backup of this database (as ``validate
  --against latest`` does). Neither available: ``warn``, "not checked".
* ``rls`` — fail: a table of an exposed schema (``health.exposed_schemas``) without RLS, a
  table with policies while RLS is off, a policy naming a dropped role or function, a table
  ``anon`` / ``authenticated`` may SELECT with RLS off. Warn: RLS on with no policy (denies all).
* ``foreign_keys`` — fail: any orphan row of any foreign key, NOT VALID ones included. A
  referencing table estimated above ``health.fk_sample_rows`` rows is sampled
  (``TABLESAMPLE SYSTEM``, sized to about that many rows, stated in the detail); ``full``
  scans everything.
* ``index_performance`` — fail: invalid or not-ready indexes, duplicate indexes, foreign keys
  with no index whose leading columns are the key's. Warn: unused indexes (idx_scan 0 since
  the statistics reset, unique/primary/constraint indexes excluded), estimated bloat above
  ``health.bloat_ratio``, tables above ``health.seq_scan_min_bytes`` read mostly by
  sequential scans. Objects smaller than ``health.report_min_bytes`` are not reported as
  unused or bloated.
* ``function_execution`` — fail: a PL/pgSQL or SQL function its language's validator rejects
  (``check_function_bodies`` on), a PL/pgSQL error found by ``plpgsql_check`` when that
  extension is installed or installable (created inside the rolled-back transaction), a
  smoke call that errors or exceeds ``health.smoke_timeout_seconds``.

What is due is :func:`decide_health_due`, a pure function of (records, policy, now): a check
is due when the newest slot of its frequency at or before ``now`` has no run of it at or after
that slot (a missed slot is run once, late). Runs are recorded append-only under
``health-log/``; :func:`status_checks` (for ``status``) and :func:`audit_table` (for ``audit``)
read them, purely.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence

from backup_tool import __version__
from backup_tool.config.policy import CHECK_NAMES
from backup_tool.core.report import NullReporter
from backup_tool.core.timestamps import iso
from backup_tool.core.units import human_size
from backup_tool.errors import BackupToolError, RepositoryMissingError, UsageError
from backup_tool.governance.health import (
    SHOWN,
    Finding,
    HealthCheck,
    HealthPlan,
    HealthRecord,
    HealthReport,
    Level,
    decide_health_due,
    of_database,
    verdict,
)
from backup_tool.postgres import connection as postgres
from backup_tool.postgres.connection import SYSTEM_SCHEMA_FILTER, ConnInfo, scalar, server_info
from backup_tool.repository.catalog import Catalog, DatabaseHint, RefProblem, UnresolvedBackup
from backup_tool.repository.storage import open_repository
from backup_tool.schema import drift
from backup_tool.validation import validate

if TYPE_CHECKING:
    import psycopg

    from backup_tool.config.policy import HealthSettings
    from backup_tool.config.settings import Settings
    from backup_tool.core.report import Reporter
    from backup_tool.postgres.connection import ConnInfo
    from backup_tool.repository.storage import Storage

UTC = timezone.utc
LOG_PREFIX = "health-log/"
LOG_FORMAT = 1
SUPABASE_ROLES = ("anon", "authenticated")




@dataclass
class Context:
    conninfo: ConnInfo
    conn: psycopg.Connection[Any]
    settings: Settings
    full: bool
    reporter: Reporter
    major: int = 15
    notes: list[str] = field(default_factory=list)

    @property
    def h(self) -> HealthSettings:
        return self.settings.policy.health

    def rows(self, query: Any, params: Any = None) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        cur = self.conn.cursor(row_factory=dict_row)
        return list(cur.execute(query, params).fetchall())


def _ident(name: str) -> str:
    """An identifier as psql shows it: quoted only when it needs to be."""
    if name.isidentifier() and name == name.lower() and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


def _q(schema: str, name: str) -> str:
    return f"{_ident(schema)}.{_ident(name)}"


def check_schema(ctx: Context) -> HealthCheck:
    folder = drift.policy_migrations(ctx.settings.policy)
    if folder is not None:
        report = drift.diff(ctx.settings, folder, reporter=ctx.reporter)
        if report.ok:
            return HealthCheck("schema", Level.OK, f"the {report.files} migrations in {folder} reproduce the live schema")
        findings = [Finding(Level.FAIL, f"{d.kind} {d.name}", f"{d.kind} {d.name} {d.change}"
                            + (f" ({d.describe()})" if d.fields else "")) for d in report.drift]
        kinds = ", ".join(f"{n} {k}" for k, n in report.by_kind().items())
        return HealthCheck("schema", Level.FAIL,
                           f"{len(report.drift)} difference(s) between the migrations in {folder} and the live "
                           f"database ({kinds}): " + "; ".join(f.message for f in findings[:SHOWN]), tuple(findings))
    dbname = ctx.conninfo.dbname or ""
    try:
        storage = open_repository(ctx.settings.repo_url)
        manifest = Catalog(storage).resolve("latest", database=DatabaseHint(option=dbname))
    except UnresolvedBackup as exc:
        if exc.reason not in (RefProblem.NO_BACKUPS, RefProblem.NO_BACKUP_OF_DATABASE):
            raise
        return HealthCheck("schema", Level.WARN, f"not checked: no backup of database {dbname!r} in the repository "
                                                 "and no [schema] migrations in the policy")
    except RepositoryMissingError as exc:
        return HealthCheck("schema", Level.WARN, f"not checked: {exc.message} and no [schema] migrations in the policy")
    check = validate.check_schema(ctx.conninfo, ctx.major, manifest, storage)
    where = f"backup {manifest.id}"
    if check.ok:
        return HealthCheck("schema", Level.OK, f"live schema matches {where}: {check.detail}")
    return HealthCheck("schema", Level.FAIL, f"live schema drifted from {where}: {check.detail}",
                       (Finding(Level.FAIL, where, check.detail),))


def check_rls(ctx: Context) -> HealthCheck:
    exposed = list(ctx.h.exposed_schemas)
    not_extension = ("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
                     "AND d.objid = c.oid AND d.deptype = 'e')")
    findings: list[Finding] = []
    tables = ctx.rows(f"""
        SELECT n.nspname AS schema, c.relname AS name, c.relrowsecurity AS rls,
               (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND {SYSTEM_SCHEMA_FILTER} AND {not_extension}
         ORDER BY 1, 2""")
    for t in tables:
        name = _q(t["schema"], t["name"])
        if t["policies"] and not t["rls"]:
            findings.append(Finding(Level.FAIL, name, f"{name} has {t['policies']} policies but RLS is disabled "
                                                      "(they are not applied)"))
        elif t["schema"] in exposed and not t["rls"]:
            findings.append(Finding(Level.FAIL, name, f"{name} in exposed schema {t['schema']} has RLS disabled"))
        elif t["schema"] in exposed and t["rls"] and not t["policies"]:
            findings.append(Finding(Level.WARN, name, f"{name} has RLS enabled but no policy (every non-owner "
                                                      "is denied)"))
    for p in ctx.rows("""
            SELECT n.nspname AS schema, c.relname AS name, p.polname AS policy, r.oid::bigint AS role
              FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN LATERAL unnest(p.polroles) AS r(oid)
             WHERE r.oid <> 0 AND NOT EXISTS (SELECT 1 FROM pg_roles x WHERE x.oid = r.oid)
             ORDER BY 1, 2, 3"""):
        name = _q(p["schema"], p["name"])
        findings.append(Finding(Level.FAIL, f"{name}.{p['policy']}",
                                f"policy {p['policy']!r} on {name} names a dropped role (oid {p['role']})"))
    for p in ctx.rows("""
            SELECT n.nspname AS schema, c.relname AS name, p.polname AS policy, d.refobjid::bigint AS fn
              FROM pg_depend d JOIN pg_policy p ON p.oid = d.objid
              JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE d.classid = 'pg_policy'::regclass AND d.refclassid = 'pg_proc'::regclass
               AND NOT EXISTS (SELECT 1 FROM pg_proc x WHERE x.oid = d.refobjid)"""):
        name = _q(p["schema"], p["name"])
        findings.append(Finding(Level.FAIL, f"{name}.{p['policy']}",
                                f"policy {p['policy']!r} on {name} calls a dropped function (oid {p['fn']})"))
    for t in ctx.rows(f"""
            SELECT n.nspname AS schema, c.relname AS name, string_agg(r.rolname, ', ' ORDER BY r.rolname) AS roles
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_roles r ON r.rolname = ANY(%s)
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND NOT c.relrowsecurity
               AND {SYSTEM_SCHEMA_FILTER.replace("%", "%%")} AND {not_extension}
               AND has_schema_privilege(r.oid, n.oid, 'USAGE') AND has_table_privilege(r.oid, c.oid, 'SELECT')
             GROUP BY 1, 2 ORDER BY 1, 2""", (list(SUPABASE_ROLES),)):
        name = _q(t["schema"], t["name"])
        findings.append(Finding(Level.FAIL, name, f"{name} is readable by {t['roles']} with RLS disabled "
                                                  "(every row exposed)"))
    secured = sum(1 for t in tables if t["rls"])
    policies = sum(int(t["policies"]) for t in tables)
    return verdict("rls", findings, f"RLS enabled on {secured} of {len(tables)} tables ({policies} policies); "
                                    f"exposed schemas: {', '.join(exposed)}")


def check_foreign_keys(ctx: Context) -> HealthCheck:
    fks = postgres.foreign_keys(ctx.conn)
    estimates = {(r["schema"], r["name"]): float(r["rows"]) for r in ctx.rows("""
        SELECT n.nspname AS schema, c.relname AS name,
               CASE WHEN c.relkind = 'p' THEN coalesce((SELECT sum(greatest(p.reltuples, 0))
                      FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid WHERE i.inhparent = c.oid), 0)
                    ELSE greatest(c.reltuples, 0) END AS rows
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')""")}
    findings: list[Finding] = []
    sampled: list[str] = []
    limit = ctx.h.fk_sample_rows
    for fk in fks:
        qual = f"{_q(fk['schema'], fk['table'])}.{_ident(fk['name'])}"
        rows = estimates.get((fk["schema"], fk["table"]), 0.0)
        percent = None if ctx.full or rows <= limit else max(0.0001, round(100.0 * limit / rows, 4))
        started = time.monotonic()
        count = int(scalar(ctx.conn, validate.orphan_count_query(ctx.conn, fk, percent)))
        took = time.monotonic() - started
        state = "" if fk.get("validated", True) else " (NOT VALID)"
        if percent is not None:
            sampled.append(f"{qual} {percent:g}% of ~{rows:.0f} rows")
        if count:
            what = (f"at least {count} orphan row(s) in a {percent:g}% sample of ~{rows:.0f} rows"
                    if percent is not None else f"{count} orphan row(s)")
            findings.append(Finding(Level.FAIL, qual, f"{qual}{state}: {what} referencing "
                                                      f"{_q(fk['ref_schema'], fk['ref_table'])} ({took:.1f}s)"))
    mode = ("exhaustive (--full)" if ctx.full else
            f"sampled {len(sampled)} key(s) on tables above {limit} rows: {', '.join(sampled[:SHOWN])}"
            if sampled else f"exhaustive (every referencing table at most {limit} rows)")
    not_valid = sum(1 for fk in fks if fk.get("validated") is False)
    return verdict("foreign_keys", findings, f"{len(fks)} foreign keys hold ({not_valid} NOT VALID), no orphan rows; "
                                             f"{mode}")


BLOAT_SQL = """
    SELECT n.nspname AS schema, t.relname AS table, ci.relname AS name, ci.relpages AS pages,
           ci.reltuples AS tuples, current_setting('block_size')::int AS block,
           (SELECT sum(coalesce(s.avg_width, 8)) FROM unnest(string_to_array(i.indkey::text, ' ')::int2[]) k(attnum)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = t.relname
                                  AND s.attname = a.attname) AS width,
           EXISTS (SELECT 1 FROM unnest(string_to_array(i.indkey::text, ' ')::int2[]) k(attnum)
                    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                    LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = t.relname
                                        AND s.attname = a.attname
                   WHERE s.avg_width IS NULL) AS unanalyzed
      FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
      JOIN pg_namespace n ON n.oid = t.relnamespace JOIN pg_am am ON am.oid = ci.relam
     WHERE am.amname = 'btree' AND i.indexprs IS NULL AND ci.relpages > 0 AND ci.reltuples >= 0
       AND ci.relkind = 'i' AND pg_relation_size(ci.oid) >= %(min)s AND {system}"""


def index_bloat(row: dict[str, Any]) -> float | None:
    """Estimated share of a btree index's pages that are bloat: its tuples (8-byte header plus
    the key columns' average widths, 8-aligned, plus a 4-byte line pointer) packed at the
    default fillfactor 90 into pages of ``block`` bytes less 40 bytes of header, plus a
    metapage, compared with its real page count. None without statistics."""
    if row["width"] is None or row["unanalyzed"]:
        return None
    per_tuple = 8 + 8 * math.ceil(float(row["width"]) / 8) + 4
    usable = (row["block"] - 24 - 16) * 0.9
    expected = math.ceil(float(row["tuples"]) * per_tuple / usable) + 1
    pages = int(row["pages"])
    return max(0.0, 1.0 - expected / pages) if pages else None


def check_index_performance(ctx: Context) -> HealthCheck:
    h = ctx.h
    findings: list[Finding] = []
    for r in ctx.rows(f"""
            SELECT n.nspname AS schema, t.relname AS table, c.relname AS name, i.indisvalid AS valid,
                   i.indisready AS ready
              FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE NOT (i.indisvalid AND i.indisready) AND {SYSTEM_SCHEMA_FILTER} ORDER BY 1, 2, 3"""):
        name = _q(r["schema"], r["name"])
        state = "not ready" if not r["ready"] else "invalid"
        findings.append(Finding(Level.FAIL, name, f"index {name} on {r['table']} is {state} (a failed CREATE INDEX "
                                                  "CONCURRENTLY?): REINDEX or drop it"))
    for r in ctx.rows(f"""
            SELECT n.nspname AS schema, t.relname AS table, array_agg(c.relname ORDER BY c.relname) AS names,
                   sum(pg_relation_size(c.oid)) AS bytes
              FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE {SYSTEM_SCHEMA_FILTER}
             GROUP BY n.nspname, t.relname, i.indrelid, c.relam, i.indkey::text, i.indclass::text,
                      i.indcollation::text, i.indoption::text, coalesce(pg_get_expr(i.indexprs, i.indrelid), ''),
                      coalesce(pg_get_expr(i.indpred, i.indrelid), '')
            HAVING count(*) > 1 ORDER BY 1, 2"""):
        table = _q(r["schema"], r["table"])
        findings.append(Finding(Level.FAIL, table, f"duplicate indexes on {table}: {', '.join(r['names'])} "
                                                   f"(same columns, operator classes and predicate; "
                                                   f"{human_size(float(r['bytes']))} together): keep one"))
    for r in ctx.rows(f"""
            SELECT n.nspname AS schema, c.relname AS table, con.conname AS name,
                   ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(num, ord)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num
                          ORDER BY k.ord)::text[] AS columns,
                   pg_relation_size(c.oid) AS bytes
              FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE con.contype = 'f' AND con.conparentid = 0 AND {SYSTEM_SCHEMA_FILTER}
               AND NOT EXISTS (
                   SELECT 1 FROM pg_index i
                    WHERE i.indrelid = con.conrelid AND i.indpred IS NULL
                      AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(con.conkey)] @> con.conkey
                      AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(con.conkey)] <@ con.conkey)
             ORDER BY 1, 2, 3"""):
        table = _q(r["schema"], r["table"])
        findings.append(Finding(Level.FAIL, f"{table}.{r['name']}",
                                f"foreign key {r['name']} on {table} ({', '.join(r['columns'])}) has no index "
                                f"leading with its columns (table {human_size(float(r['bytes']))}): deletes and updates "
                                "of the referenced rows scan it"))
    reset = ctx.conn.execute("SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()").fetchone()
    since = f"since the statistics reset at {iso(reset[0])}" if reset and reset[0] else \
        "since statistics began (never reset)"
    for r in ctx.rows("""
            SELECT s.schemaname AS schema, s.relname AS table, s.indexrelname AS name,
                   pg_relation_size(s.indexrelid) AS bytes
              FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
             WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary
               AND NOT EXISTS (SELECT 1 FROM pg_constraint x WHERE x.conindid = s.indexrelid)
               AND pg_relation_size(s.indexrelid) >= %s ORDER BY 4 DESC, 1, 2, 3""", (h.report_min_bytes,)):
        name = _q(r["schema"], r["name"])
        findings.append(Finding(Level.WARN, name, f"index {name} on {r['table']} unused (0 scans {since}; "
                                                  f"{human_size(float(r['bytes']))})"))
    for r in ctx.rows(BLOAT_SQL.format(system=SYSTEM_SCHEMA_FILTER.replace("%", "%%")), {"min": h.report_min_bytes}):
        ratio = index_bloat(r)
        if ratio is not None and ratio > h.bloat_ratio:
            name = _q(r["schema"], r["name"])
            findings.append(Finding(Level.WARN, name, f"index {name} ~{ratio:.0%} bloat (estimate: {r['pages']} "
                                                      f"pages for ~{float(r['tuples']):.0f} tuples): REINDEX "
                                                      "CONCURRENTLY"))
    for r in ctx.rows("""
            SELECT schemaname AS schema, relname AS table, n_live_tup AS live, n_dead_tup AS dead,
                   pg_table_size(relid) AS bytes
              FROM pg_stat_user_tables
             WHERE n_dead_tup > 0 AND pg_table_size(relid) >= %s
               AND n_dead_tup::float / (n_live_tup + n_dead_tup) > %s ORDER BY 1, 2""",
                      (h.report_min_bytes, h.bloat_ratio)):
        table = _q(r["schema"], r["table"])
        ratio = r["dead"] / (r["live"] + r["dead"])
        findings.append(Finding(Level.WARN, table, f"table {table} ~{ratio:.0%} dead tuples ({r['dead']} dead, "
                                                   f"{r['live']} live, {human_size(float(r['bytes']))}): check autovacuum"))
    for r in ctx.rows("""
            SELECT schemaname AS schema, relname AS table, seq_scan, coalesce(idx_scan, 0) AS idx_scan,
                   seq_tup_read, pg_relation_size(relid) AS bytes
              FROM pg_stat_user_tables
             WHERE pg_relation_size(relid) >= %s AND seq_scan >= 10 AND seq_scan > coalesce(idx_scan, 0)
             ORDER BY seq_tup_read DESC""", (h.seq_scan_min_bytes,)):
        table = _q(r["schema"], r["table"])
        findings.append(Finding(Level.WARN, table, f"table {table} ({human_size(float(r['bytes']))}) read mostly by "
                                                   f"sequential scans: {r['seq_scan']} seq scans ({r['seq_tup_read']} "
                                                   f"rows read) vs {r['idx_scan']} index scans {since}"))
    count = scalar(ctx.conn, f"""SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {SYSTEM_SCHEMA_FILTER}""")
    return verdict("index_performance", findings,
                   f"{count} indexes valid, no duplicates, every foreign key indexed (statistics {since})")


def _functions(ctx: Context) -> list[dict[str, Any]]:
    return ctx.rows(f"""
        SELECT p.oid, n.nspname AS schema, p.proname AS name,
               pg_get_function_identity_arguments(p.oid) AS args, l.lanname AS language,
               p.prorettype = 'trigger'::regtype AS is_trigger, p.prorettype = 'event_trigger'::regtype AS is_event,
               (SELECT t.tgrelid FROM pg_trigger t WHERE t.tgfoid = p.oid ORDER BY t.oid LIMIT 1) AS trigger_rel
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
         WHERE l.lanname IN ('plpgsql', 'sql') AND {SYSTEM_SCHEMA_FILTER}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                             AND d.objid = p.oid AND d.deptype = 'e')
         ORDER BY 2, 3, 4""")


def _deep_check(ctx: Context, functions: list[dict[str, Any]]) -> tuple[list[Finding], str]:
    """plpgsql_check's errors per PL/pgSQL function (inside the caller's rolled-back
    transaction), and a note saying whether the deep check ran."""
    import psycopg
    from psycopg import sql

    row = ctx.conn.execute("SELECT extnamespace::regnamespace::text FROM pg_extension "
                           "WHERE extname = 'plpgsql_check'").fetchone()
    if row is None:
        if ctx.conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plpgsql_check'").fetchone() is None:
            return [], ("plpgsql_check not installed on the server: references to dropped tables or columns inside "
                        "PL/pgSQL bodies are found only by smoke calls")
        try:
            with ctx.conn.transaction():
                ctx.conn.execute("CREATE EXTENSION plpgsql_check")
        except psycopg.Error as exc:
            return [], (f"plpgsql_check available but not usable by this role ({str(exc).splitlines()[0]}): "
                        "dropped-object references found only by smoke calls")
        row = ctx.conn.execute("SELECT extnamespace::regnamespace::text FROM pg_extension "
                               "WHERE extname = 'plpgsql_check'").fetchone()
    assert row is not None
    check_fn = sql.SQL("{}.plpgsql_check_function_tb").format(sql.Identifier(row[0]))
    findings: list[Finding] = []
    checked = skipped = 0
    for f in functions:
        if f["language"] != "plpgsql" or f["is_event"] or (f["is_trigger"] and f["trigger_rel"] is None):
            skipped += f["language"] == "plpgsql"
            continue
        label = f"{_q(f['schema'], f['name'])}({f['args']})"
        try:
            with ctx.conn.transaction():
                found = ctx.rows(sql.SQL("SELECT lineno, message, level FROM {}(%s, %s)").format(check_fn),
                                 (f["oid"], f["trigger_rel"] or 0))
        except psycopg.Error as exc:
            findings.append(Finding(Level.FAIL, label, f"{label}: plpgsql_check could not check it: "
                                                       f"{str(exc).splitlines()[0]}"))
            continue
        checked += 1
        for e in found:
            if e["level"] == "error":
                where = f" line {e['lineno']}" if e["lineno"] else ""
                findings.append(Finding(Level.FAIL, label, f"{label}{where}: {e['message']}"))
    note = f"plpgsql_check: {checked} PL/pgSQL function(s) checked"
    if skipped:
        note += f", {skipped} trigger function(s) on no table or event trigger function(s) not checkable"
    return findings, note


def check_function_execution(ctx: Context) -> HealthCheck:
    import psycopg
    from psycopg import sql

    findings: list[Finding] = []
    functions = _functions(ctx)
    with ctx.conn.transaction(force_rollback=True):
        ctx.conn.execute("SET LOCAL check_function_bodies = on")
        for f in functions:
            validator = "plpgsql_validator" if f["language"] == "plpgsql" else "fmgr_sql_validator"
            label = f"{_q(f['schema'], f['name'])}({f['args']})"
            try:
                with ctx.conn.transaction():
                    ctx.conn.execute(sql.SQL("SELECT {}(%s)").format(sql.Identifier(validator)), (f["oid"],))
            except psycopg.Error as exc:
                findings.append(Finding(Level.FAIL, label, f"{label} ({f['language']}) does not validate: "
                                                           f"{str(exc).splitlines()[0]}"))
        deep, note = _deep_check(ctx, functions)
        findings += deep
    timings: list[str] = []
    timeout_ms = ctx.h.smoke_timeout_seconds * 1000
    for call in ctx.h.smoke_calls:
        started = time.monotonic()
        try:
            with ctx.conn.transaction(force_rollback=True):
                ctx.conn.execute("SET TRANSACTION READ ONLY")
                ctx.conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
                ctx.conn.execute(sql.SQL(call))
        except psycopg.Error as exc:
            took = time.monotonic() - started
            findings.append(Finding(Level.FAIL, call, f"smoke call {call!r} failed after {took * 1000:.0f} ms: "
                                                      f"{str(exc).splitlines()[0]}"))
            continue
        timings.append(f"{call!r} {(time.monotonic() - started) * 1000:.0f} ms")
    plpgsql = sum(1 for f in functions if f["language"] == "plpgsql")
    smoke = (f"; {len(timings)} smoke call(s) ok: {', '.join(timings[:SHOWN])}" if timings
             else "; no smoke calls in the policy" if not ctx.h.smoke_calls else "")
    return verdict("function_execution", findings,
                   f"{len(functions)} functions ({plpgsql} PL/pgSQL) validate; {note}{smoke}")


CHECKS: dict[str, Callable[[Context], HealthCheck]] = {
    "schema": check_schema,
    "rls": check_rls,
    "foreign_keys": check_foreign_keys,
    "index_performance": check_index_performance,
    "function_execution": check_function_execution,
}


def resolve_names(names: Sequence[str] | None) -> list[str]:
    """The checks to run, in the document's order; an unknown name is a usage error."""
    if not names:
        return list(CHECK_NAMES)
    wanted = {n.strip() for item in names for n in item.split(",") if n.strip()}
    unknown = sorted(wanted - set(CHECK_NAMES))
    if unknown:
        raise UsageError(f"unknown health check {', '.join(map(repr, unknown))}",
                         f"choose from: {', '.join(CHECK_NAMES)}")
    return [n for n in CHECK_NAMES if n in wanted]


def run_health(settings: Settings, names: Sequence[str] | None = None, full: bool = False,
               reporter: Reporter | None = None) -> HealthReport:
    """Run the named checks (all by default) on ``settings.dsn``. A check that cannot run
    (a query error, an unreadable backup) fails, saying why; a connection failure raises."""
    import psycopg


    reporter = reporter or NullReporter()
    chosen = resolve_names(names)
    conninfo = ConnInfo(settings.dsn)
    started = datetime.now(UTC)
    results: list[HealthCheck] = []
    with conninfo.connect(application="backup-tool health") as conn:
        major = server_info(conn)["server_version_num"] // 10000
        ctx = Context(conninfo, conn, settings, full, reporter, major)
        for name in chosen:
            reporter.event("health check", check=name)
            t0 = time.monotonic()
            try:
                result = CHECKS[name](ctx)
            except psycopg.Error as exc:
                if conn.closed or conn.broken:
                    raise
                conn.rollback()
                result = HealthCheck(name, Level.FAIL, f"could not run: {str(exc).splitlines()[0]}")
            except BackupToolError as exc:
                result = HealthCheck(name, Level.FAIL, f"could not run: {exc.message}")
            results.append(replace(result, seconds=time.monotonic() - t0))
            reporter.event("health check done", check=name, level=result.level.value)
    return HealthReport(conninfo.redacted(), conninfo.dbname or "", started, datetime.now(UTC), tuple(results))


# ----------------------------------------------------------------------------- the log


def write_record(storage: Storage, report: HealthReport, trigger: str) -> str:
    """Append one run to ``health-log/`` (a new object per run, never rewritten)."""
    run_id = f"{report.started_at.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(3)}"
    key = f"{LOG_PREFIX}{run_id}.json"
    body = {"format": LOG_FORMAT, "run": run_id, "trigger": trigger, "tool_version": __version__,
            **report.to_dict()}
    storage.put_bytes(key, json.dumps(body, indent=1).encode())
    return key


def _parse(text: str) -> datetime:
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def read_records(storage: Storage) -> tuple[list[HealthRecord], list[str]]:
    """Every recorded check run, oldest first, and the log objects that could not be read."""
    found: list[HealthRecord] = []
    problems: list[str] = []
    for info in storage.list(LOG_PREFIX):
        try:
            body = json.loads(storage.get_bytes(info.key))
            at = _parse(body["at"])
            for c in body["checks"]:
                found.append(HealthRecord(str(c["name"]), at, bool(c["ok"]), str(c.get("level", "ok" if c["ok"] else "fail")),
                                          str(c.get("detail", "")), str(body.get("database", "")),
                                          str(body.get("run", info.key))))
        except (BackupToolError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{info.key}: unreadable ({exc})")
    return sorted(found, key=lambda r: (r.at, r.check)), problems


def records_for(settings: Settings, records: Sequence[HealthRecord]) -> list[HealthRecord]:
    """For ``status`` and ``audit``: the runs on the database ``--dsn`` names, else every run
    (a repository of one database; with several and none named, the newest run per check wins)."""
    try:
        named = ConnInfo(settings.dsn).dbname
    except BackupToolError:
        named = None
    if named in {r.database for r in records}:
        return of_database(records, named)
    return list(records)


@dataclass(frozen=True)
class DueRun:
    plan: HealthPlan
    report: HealthReport | None
    record: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "ran": self.report.to_dict() if self.report else None,
                "record": self.record}


def plan_health(settings: Settings, storage: Storage, now: datetime) -> HealthPlan:
    records, _ = read_records(storage)
    return decide_health_due(of_database(records, ConnInfo(settings.dsn).dbname or ""), settings.policy, now)


def run_due_checks(settings: Settings, storage: Storage, reporter: Reporter | None = None,
                   now: datetime | None = None) -> DueRun:
    """Run the checks due at ``now`` (default: the real clock) and record the run."""
    reporter = reporter or NullReporter()
    plan = plan_health(settings, storage, now or datetime.now(UTC))
    if not plan.due:
        return DueRun(plan, None, None)
    reporter.event("health checks due", checks=plan.checks)
    report = run_health(settings, plan.checks, reporter=reporter)
    key = write_record(storage, report, "run-due")
    for c in report.checks:
        if not c.ok:
            reporter.warning(f"health check {c.name} failed: {c.detail}")
    return DueRun(plan, report, key)
