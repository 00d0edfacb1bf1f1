"""Independent proof that two PostgreSQL databases hold the same thing.

Uses only psycopg and pg_dump (never backup_tool), so a test can check the tool's restores
against something the tool did not compute. All catalog reads and the pg_dump run share one
REPEATABLE READ snapshot. Object names in keys are `quote_ident`-qualified
(`public.payments`, `analytics."UserJourneys"`, `analytics."feature usage"`).
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

Fingerprint = dict[str, Any]

# The order in which assert_same reports sections; the first differing one is named.
SECTIONS = (
    "extensions",
    "schema",
    "tables",
    "rls",
    "policies",
    "indexes",
    "constraints",
    "functions",
    "triggers",
    "sequences",
)

_SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "search_path": "pg_catalog",
}

_USER_NAMESPACES = """
    n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""

_NOT_EXTENSION_MEMBER = """
    NOT EXISTS (SELECT 1 FROM pg_depend d
                WHERE d.classid = '{catalog}'::regclass AND d.objid = {oid} AND d.deptype = 'e')
"""


def _split_dsn(dsn: str) -> tuple[str, str | None]:
    """(conninfo without password, password)."""
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    return make_conninfo(**{k: str(v) for k, v in params.items()}), (str(password) if password is not None else None)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    for name, value in _SESSION_SETTINGS.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    return conn


def find_pg_dump() -> str:
    """pg_dump from DBCOMPARE_PG_BINDIR, the Debian PostgreSQL 15 dir, `pg_config --bindir`
    or PATH, in that order."""
    dirs = [os.environ.get("DBCOMPARE_PG_BINDIR"), "/usr/lib/postgresql/15/bin"]
    if pg_config := shutil.which("pg_config"):
        res = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        dirs.append(res.stdout.strip() if res.returncode == 0 else None)
    for d in dirs:
        if d and (Path(d) / "pg_dump").is_file():
            return str(Path(d) / "pg_dump")
    if found := shutil.which("pg_dump"):
        return found
    raise RuntimeError("pg_dump not found; set DBCOMPARE_PG_BINDIR")


def normalize_schema_dump(text: str) -> str:
    """pg_dump plain output without comment lines, blank lines and the per-run random
    `\\restrict KEY` / `\\unrestrict KEY` lines (pg_dump >= 15.14)."""
    keep = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("--"):
            continue
        if line.startswith(("\\restrict", "\\unrestrict")):
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


def schema_dump(dsn: str, snapshot: str | None = None) -> str:
    """Normalised `pg_dump --schema-only` of the database (owners and grants kept); the
    password goes through PGPASSWORD only."""
    conninfo, password = _split_dsn(dsn)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    argv = [find_pg_dump(), "--schema-only", "--no-password", f"--dbname={conninfo}"]
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    res = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"pg_dump --schema-only failed (exit {res.returncode}): {res.stderr.strip()}")
    return normalize_schema_dump(res.stdout)


def _rows(conn: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return conn.execute(query).fetchall()  # type: ignore[arg-type]


def _tables(conn: psycopg.Connection[Any], tables: Iterable[str] | None) -> list[tuple[str, str, str]]:
    """(key, schema, name) of ordinary tables and partitions in user schemas."""
    rows = _rows(
        conn,
        f"""
        SELECT format('%I.%I', n.nspname, c.relname), n.nspname, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND {_USER_NAMESPACES}
        ORDER BY 1
        """,
    )
    if tables is None:
        return [(r[0], r[1], r[2]) for r in rows]
    wanted = set(tables)
    found = [(r[0], r[1], r[2]) for r in rows if r[0] in wanted]
    missing = wanted - {r[0] for r in found}
    if missing:
        raise KeyError(f"tables not found: {sorted(missing)}")
    return found


def _table_hashes(conn: psycopg.Connection[Any], tables: Iterable[str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, schema, name in _tables(conn, tables):
        query = sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg(r, E'\\n' ORDER BY r COLLATE \"C\"), '')) "
            "FROM (SELECT {alias}::text AS r FROM ONLY {table} AS {alias}) s"
        ).format(alias=sql.Identifier("__dbcompare_row"), table=sql.Identifier(schema, name))
        count, digest = conn.execute(query).fetchone()  # type: ignore[misc]
        out[key] = {"rows": int(count), "md5": digest}
    return out


def table_hashes(dsn: str, tables: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{"schema.table": {"rows": n, "md5": hex}} for every ordinary table and partition in
    user schemas (or only `tables`, given as quote_ident-qualified keys). The hash is over
    the rows' text forms sorted bytewise, so it does not depend on physical order."""
    with _connect(dsn) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return _table_hashes(conn, tables)


def _catalog(conn: psycopg.Connection[Any]) -> Fingerprint:
    ext = {
        r[0]: {"version": r[1], "schema": r[2]}
        for r in _rows(
            conn,
            "SELECT e.extname, e.extversion, n.nspname FROM pg_extension e "
            "JOIN pg_namespace n ON n.oid = e.extnamespace",
        )
    }
    rls = {
        r[0]: {"enabled": r[1], "forced": r[2]}
        for r in _rows(
            conn,
            f"""SELECT format('%I.%I', n.nspname, c.relname), c.relrowsecurity, c.relforcerowsecurity
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p') AND {_USER_NAMESPACES}""",
        )
    }
    policies = {
        r[0]: {"permissive": r[1], "roles": sorted(r[2]), "cmd": r[3], "qual": r[4], "with_check": r[5]}
        for r in _rows(
            conn,
            "SELECT format('%I.%I.%I', schemaname, tablename, policyname), permissive, roles::text[], "
            "cmd, qual, with_check FROM pg_policies",
        )
    }
    sequences: dict[str, dict[str, Any]] = {}
    for key, schema, name in _rows(
        conn,
        f"""SELECT format('%I.%I', n.nspname, c.relname), n.nspname, c.relname
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'S' AND {_USER_NAMESPACES}""",
    ):
        last_value, is_called = conn.execute(
            sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(schema, name))
        ).fetchone()  # type: ignore[misc]
        sequences[key] = {"last_value": int(last_value), "is_called": bool(is_called)}
    indexes = {
        r[0]: {"table": r[1], "def": r[2], "valid": r[3]}
        for r in _rows(
            conn,
            f"""SELECT format('%I.%I', n.nspname, ic.relname), format('%I.%I', n.nspname, tc.relname),
                       pg_get_indexdef(i.indexrelid), i.indisvalid
                FROM pg_index i
                JOIN pg_class ic ON ic.oid = i.indexrelid
                JOIN pg_class tc ON tc.oid = i.indrelid
                JOIN pg_namespace n ON n.oid = ic.relnamespace
                WHERE {_USER_NAMESPACES}""",
        )
    }
    constraints = {
        r[0]: {"type": r[1], "def": r[2], "validated": r[3], "deferrable": r[4], "deferred": r[5]}
        for r in _rows(
            conn,
            f"""SELECT format('%I.%I.%I', n.nspname, coalesce(c.relname, t.typname), con.conname),
                       con.contype, pg_get_constraintdef(con.oid), con.convalidated,
                       con.condeferrable, con.condeferred
                FROM pg_constraint con
                JOIN pg_namespace n ON n.oid = con.connamespace
                LEFT JOIN pg_class c ON c.oid = con.conrelid
                LEFT JOIN pg_type t ON t.oid = con.contypid
                WHERE {_USER_NAMESPACES}""",
        )
    }
    functions = {
        r[0]: {
            "kind": r[1],
            "language": r[2],
            "result": r[3],
            "src_md5": r[4],
            "security_definer": r[5],
            "volatility": r[6],
            "config": r[7],
        }
        for r in _rows(
            conn,
            f"""SELECT format('%I.%I(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)),
                       p.prokind, l.lanname, pg_get_function_result(p.oid), md5(p.prosrc),
                       p.prosecdef, p.provolatile, p.proconfig
                FROM pg_proc p
                JOIN pg_namespace n ON n.oid = p.pronamespace
                JOIN pg_language l ON l.oid = p.prolang
                WHERE {_USER_NAMESPACES}
                  AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_proc", oid="p.oid")}""",
        )
    }
    triggers = {
        r[0]: {"def": r[1], "enabled": r[2]}
        for r in _rows(
            conn,
            f"""SELECT format('%I.%I.%I', n.nspname, c.relname, t.tgname), pg_get_triggerdef(t.oid), t.tgenabled
                FROM pg_trigger t
                JOIN pg_class c ON c.oid = t.tgrelid
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE NOT t.tgisinternal AND {_USER_NAMESPACES}""",
        )
    }
    return {
        "extensions": ext,
        "rls": rls,
        "policies": policies,
        "sequences": sequences,
        "indexes": indexes,
        "constraints": constraints,
        "functions": functions,
        "triggers": triggers,
    }


def fingerprint(dsn: str, *, include_schema_dump: bool = True) -> Fingerprint:
    """Everything assert_same compares, read in one snapshot:

    - tables: {"schema.table": {"rows", "md5"}} (see table_hashes)
    - schema: normalised `pg_dump --schema-only` text
    - extensions, rls, policies, sequences (last_value, is_called), indexes (def, valid),
      constraints (def, validated), functions (md5 of prosrc; extension members excluded),
      triggers: dicts keyed by qualified name
    """
    with _connect(dsn) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        result = _catalog(conn)
        result["tables"] = _table_hashes(conn, None)
        if include_schema_dump:
            result["schema"] = schema_dump(dsn, snapshot=snapshot)
    return result


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "..."


def _section_differences(name: str, a: Any, b: Any) -> list[str]:
    if name == "schema":
        diff = list(difflib.unified_diff(a.splitlines(), b.splitlines(), "a", "b", n=1, lineterm=""))
        return ["schema dumps differ:\n" + "\n".join(diff[:40])] if diff else []
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in b:
                out.append(f"{name}: {key} only in a ({_describe(a[key])})")
            elif key not in a:
                out.append(f"{name}: {key} only in b ({_describe(b[key])})")
            elif a[key] != b[key]:
                out.append(f"{name}: {key}: {_describe(a[key])} != {_describe(b[key])}")
        return out
    return [] if a == b else [f"{name}: {_describe(a)} != {_describe(b)}"]


def differences(a: Fingerprint, b: Fingerprint, *, ignore: Iterable[str] = ()) -> list[str]:
    """Every difference between two fingerprints, sections in SECTIONS order, skipping the
    sections named in `ignore`; sections present in only one fingerprint are skipped."""
    skipped = set(ignore)
    out: list[str] = []
    for name in SECTIONS:
        if name in skipped or name not in a or name not in b:
            continue
        out.extend(_section_differences(name, a[name], b[name]))
    return out


def assert_same(a: Fingerprint, b: Fingerprint, *, ignore: Iterable[str] = ()) -> None:
    """Raise AssertionError naming the first differing section and object (and how many
    differences there are in total)."""
    diffs = differences(a, b, ignore=ignore)
    if diffs:
        more = f"\n(+{len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
        raise AssertionError(f"databases differ: {diffs[0]}{more}")


def assert_sequences_not_behind(a: Fingerprint, b: Fingerprint) -> None:
    """Every sequence of `a` exists in `b` with a value >= a's (the post-PITR rule: WAL replay
    may leave sequences up to 32 values ahead)."""
    for key, seq_a in a["sequences"].items():
        seq_b = b["sequences"].get(key)
        if seq_b is None:
            raise AssertionError(f"sequences: {key} missing in b")
        a_next = seq_a["last_value"] + (1 if seq_a["is_called"] else 0)
        b_next = seq_b["last_value"] + (1 if seq_b["is_called"] else 0)
        if b_next < a_next:
            raise AssertionError(f"sequences: {key} is behind: {seq_b} < {seq_a}")
