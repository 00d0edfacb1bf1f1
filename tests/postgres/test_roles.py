"""Roles in ``restore full --with-roles`` and privilege order in schema validation.

- Into a server without the backup's roles, every role is created with exactly the source's
  attributes, settings, comment and memberships (compared as pg_dumpall writes them), and the
  target's own ``postgres`` keeps its settings.
- Into a server where some roles exist with other attributes, those are left exactly as they
  were, each differing one is named in one warning, and validation passes.
- Identical privileges listed in another order (ACL history) are not a schema difference;
  a real privilege difference still is, and old manifests (fingerprint of the older
  normalisation) keep validating.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

import dbcompare
import pytest
from support.cli import Cli
from support.clusters import PgServer
from support.paths import SEED_FILES

APP_OWNER = '"App ""Owner"""'

SOURCE_ROLES = f"""
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
ALTER ROLE authenticated SET statement_timeout = '8s';
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
ALTER ROLE service_role SET statement_timeout = '5s';
ALTER ROLE service_role SET lock_timeout = '2s';
CREATE ROLE {APP_OWNER} LOGIN CREATEDB CONNECTION LIMIT 7 VALID UNTIL '2031-02-03 04:05:06+02';
ALTER ROLE {APP_OWNER} SET search_path TO "$user", 'my schema', public;
ALTER ROLE {APP_OWNER} SET application_name = 'it''s; two
lines';
COMMENT ON ROLE {APP_OWNER} IS 'owns the reports; ''quoted''';
CREATE ROLE reporting NOLOGIN;
GRANT authenticated TO reporting WITH ADMIN OPTION;
GRANT reporting TO {APP_OWNER};
GRANT anon TO service_role;
"""

SOURCE_OBJECTS = f"""
CREATE SCHEMA reports AUTHORIZATION {APP_OWNER};
CREATE TABLE reports.daily (day date PRIMARY KEY, hits integer NOT NULL);
ALTER TABLE reports.daily OWNER TO {APP_OWNER};
GRANT SELECT ON reports.daily TO reporting;
ALTER DEFAULT PRIVILEGES IN SCHEMA analytics GRANT INSERT ON TABLES TO service_role;
INSERT INTO reports.daily SELECT d::date, (extract(doy FROM d))::int
  FROM generate_series('2024-01-01'::date, '2024-03-01', '1 day') d;
"""


def run_sql(server: PgServer, dbname: str, script: str) -> None:
    with server.admin_conn(dbname) as conn:
        conn.execute(script)


def globals_statements(server: PgServer) -> list[str]:
    """pg_dumpall --globals-only as its statements (comments, meta-commands and blank lines
    dropped); a setting value may span lines, so statements end at ';' + newline."""
    out = subprocess.run([str(server.bin_dir / "pg_dumpall"), "--globals-only", "--no-role-passwords",
                          "--no-tablespaces"], env={**os.environ, **server.libpq_env()},
                         capture_output=True, text=True, check=True).stdout
    text = "\n".join(ln for ln in out.splitlines() if not ln.startswith(("--", "\\")))
    return [s.strip() for s in text.split(";\n") if s.strip()]


def role_statements(statements: list[str], ident: str) -> list[str]:
    """The statements defining role ``ident`` (as pg_dumpall quotes it) and its memberships."""
    q = re.escape(ident)
    pat = re.compile(rf"^(CREATE ROLE {q}$|ALTER ROLE {q} |COMMENT ON ROLE {q} |GRANT {q} TO |GRANT \S+ TO {q}( |$))")
    return [s for s in statements if pat.match(s)]


def warnings_of(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(ln) for ln in stderr.splitlines() if ln.startswith("{")]
    return [ln for ln in lines if ln.get("level") == "warning"]


@pytest.fixture
def source(pg_cluster_factory: Callable[..., PgServer]) -> PgServer:
    """A cluster holding the seed database ``app`` plus awkward roles (quoted names, connection
    limit, expiry, list-valued and multi-line settings, comment, nested memberships)."""
    server = pg_cluster_factory()
    run_sql(server, "postgres", SOURCE_ROLES)
    server.create_db("app")
    server.load_sql("app", SEED_FILES)
    run_sql(server, "app", SOURCE_OBJECTS)
    run_sql(server, "postgres", """ALTER ROLE postgres SET search_path TO "$user", public, extensions""")
    return server


BACKED_UP = ["anon", "authenticated", "service_role", APP_OWNER, "reporting"]


@pytest.mark.slow
def test_with_roles_into_a_bare_server_creates_exact_roles(cli: Cli, local_repo: str, source: PgServer,
                                                           pg_cluster_factory: Callable[..., PgServer]) -> None:
    cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn("app"))
    target = pg_cluster_factory()
    postgres_before = role_statements(globals_statements(target), "postgres")
    result = cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn("app"),
                      "--create", "--with-roles")
    assert result["ok"] is True
    src, dst = globals_statements(source), globals_statements(target)
    for ident in BACKED_UP:
        assert role_statements(dst, ident) == role_statements(src, ident), ident
    assert role_statements(src, APP_OWNER) and any("VALID UNTIL" in s for s in role_statements(dst, APP_OWNER))
    assert "GRANT authenticated TO reporting WITH ADMIN OPTION GRANTED BY postgres" in dst
    assert role_statements(dst, "postgres") == postgres_before, "the target's postgres must not change"
    checks = {c["name"]: c for c in result["validation"]["checks"]}
    assert checks["roles_created_match"]["ok"] is True
    assert checks["roles_created_match"]["detail"].startswith("5 created roles match")
    dbcompare.assert_same(dbcompare.fingerprint(source.dsn("app")), dbcompare.fingerprint(target.dsn("app")))
    again = cli.json("validate", "--repo", local_repo, "--dsn", target.dsn("app"), "--against", "latest")
    assert again["ok"] is True


TARGET_EXISTING = """
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE service_role LOGIN NOINHERIT;
ALTER ROLE service_role SET lock_timeout = '9s';
"""


@pytest.mark.slow
def test_with_roles_leaves_existing_roles_alone_and_names_each_difference(
        cli: Cli, local_repo: str, source: PgServer, pg_cluster_factory: Callable[..., PgServer]) -> None:
    cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn("app"))
    target = pg_cluster_factory()
    run_sql(target, "postgres", TARGET_EXISTING)
    before = globals_statements(target)
    proc = cli("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn("app"), "--create",
               "--with-roles", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = proc.json()
    assert result["ok"] is True
    checks = {c["name"]: c for c in result["validation"]["checks"]}
    assert checks["schema_matches"]["ok"] and checks["roles_created_match"]["ok"]
    assert "2 pre-existing roles differ" in checks["roles_created_match"]["detail"]
    src_default, src_policy = listed_orders(source)
    dst_default, dst_policy = listed_orders(target)
    assert dst_default != src_default and sorted(dst_default) == sorted(src_default)
    assert dst_policy != src_policy and sorted(dst_policy) == sorted(src_policy)

    after = globals_statements(target)
    for ident in ("anon", "service_role", "postgres"):
        defined = [s for s in role_statements(before, ident) if not s.startswith("GRANT")]
        assert [s for s in role_statements(after, ident) if not s.startswith("GRANT")] == defined, ident
    assert "GRANT anon TO service_role GRANTED BY postgres" not in after, "membership between existing roles"
    src = globals_statements(source)
    for ident in ("authenticated", APP_OWNER, "reporting"):
        assert role_statements(after, ident) == role_statements(src, ident), ident

    warned = warnings_of(proc.stderr)
    roles_warned = sorted(w["role"] for w in warned if "differs from the backup" in w["event"])
    assert roles_warned == ["postgres", "service_role"], warned
    service = next(w for w in warned if w.get("role") == "service_role")
    text = " ".join(service["differences"])
    assert "LOGIN" in text and "lock_timeout" in text and "statement_timeout" in text
    assert "membership service_role in anon missing here" in text

    again = cli.json("validate", "--repo", local_repo, "--dsn", target.dsn("app"), "--against", "latest")
    assert again["ok"] is True


@pytest.mark.slow
def test_created_role_that_drifts_fails_validation_but_existing_one_does_not(
        cli: Cli, local_repo: str, source: PgServer, pg_cluster_factory: Callable[..., PgServer]) -> None:
    """The verdict fails for a role the restore created that differs from the backup; roles
    it found (and must not alter) are listed without failing."""
    cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn("app"))
    target = pg_cluster_factory()
    cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn("app"), "--create",
             "--with-roles")
    run_sql(target, "postgres", "ALTER ROLE reporting SET work_mem = '64MB'")
    proc = cli("validate", "--repo", local_repo, "--dsn", target.dsn("app"), "--against", "latest", "--json")
    # validate alone cannot know which roles a restore created: the difference is listed, not failed
    assert proc.returncode == 0
    detail = {c["name"]: c["detail"] for c in proc.json()["checks"]}["roles_created_match"]
    assert "reporting" in detail
    run_sql(target, "postgres", "ALTER ROLE reporting RESET work_mem")
    assert cli.json("validate", "--repo", local_repo, "--dsn", target.dsn("app"),
                    "--against", "latest")["ok"] is True


def reorder_grants(server: PgServer, dbname: str) -> None:
    """Same privileges, other ACL order: revoking and re-granting the first grantee of a
    table moves it to the end of the list."""
    run_sql(server, dbname, """
        REVOKE SELECT ON public.achievements FROM anon;
        GRANT SELECT ON public.achievements TO anon;
    """)


def table_acl(server: PgServer, dbname: str) -> list[str]:
    with server.admin_conn(dbname) as conn:
        row = conn.execute("SELECT relacl::text[] FROM pg_class WHERE oid = 'public.achievements'::regclass").fetchone()
    assert row
    return list(row[0])


def listed_orders(server: PgServer) -> tuple[list[str], list[str]]:
    """The analytics default privileges (kept sorted by grantee OID) and the role list of a
    policy (written by pg_dump in role OID order): both follow the order roles were created."""
    with server.admin_conn("app") as conn:
        default = conn.execute("""SELECT defaclacl::text[] FROM pg_default_acl
                                   WHERE defaclnamespace = 'analytics'::regnamespace""").fetchone()
        policy = conn.execute("""SELECT ARRAY(SELECT rolname FROM pg_roles WHERE oid = ANY(polroles))::text[]
                                   FROM pg_policy WHERE polname = 'Owners manage own clients'""").fetchone()
    assert default and policy
    return list(default[0]), list(policy[0])


@pytest.mark.slow
def test_privileges_in_another_order_match_and_real_differences_fail(
        cli: Cli, local_repo: str, pg_server: PgServer, seed_copy: Callable[..., Any]) -> None:
    db = seed_copy("acl")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    before = table_acl(pg_server, db.name)
    reorder_grants(pg_server, db.name)
    after = table_acl(pg_server, db.name)
    assert after != before and sorted(after) == sorted(before)

    result = cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", "latest")
    assert result["ok"] is True, result

    run_sql(pg_server, db.name, "GRANT UPDATE ON public.achievements TO anon")
    proc = cli("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", "latest", "--json")
    assert proc.returncode == 3
    failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
    assert "achievements" in failed["schema_matches"] and "UPDATE" in failed["schema_matches"]


def old_fingerprint(archive: bytes, server: PgServer) -> str:
    """The fingerprint backups stored before privilege order was ignored: pg_restore's text
    without comments, blank lines and \\restrict keys, lines right-stripped."""
    text = subprocess.run([str(server.bin_dir / "pg_restore"), "--schema-only", "--file=-"], input=archive,
                          capture_output=True, check=True).stdout.decode()
    kept = [ln.rstrip() for ln in text.splitlines()
            if ln.strip() and not ln.startswith(("--", "\\restrict", "\\unrestrict"))]
    return hashlib.sha256(("\n".join(kept) + "\n").encode()).hexdigest()


@pytest.mark.slow
def test_old_manifest_fingerprint_still_validates(cli: Cli, local_repo: str, pg_server: PgServer,
                                                   seed_copy: Callable[..., Any]) -> None:
    import zstandard

    from backup_tool.repository.manifest import _digest

    db = seed_copy("oldfp")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    path = Path(local_repo) / "manifests" / f"{entry['id']}.json"
    body = json.loads(path.read_bytes())
    archive = zstandard.ZstdDecompressor().decompressobj().decompress(
        (Path(local_repo) / body["schema"]["key"]).read_bytes())
    body["schema_fingerprint"] = old_fingerprint(archive, pg_server)
    body["manifest_sha256"] = _digest(body)
    path.chmod(0o644)
    path.write_text(json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False))

    assert cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", "latest")["ok"] is True
    reorder_grants(pg_server, db.name)
    result = cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", "latest")
    assert result["ok"] is True, result
    run_sql(pg_server, db.name, "REVOKE SELECT ON public.achievements FROM anon")
    proc = cli("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", "latest", "--json")
    assert proc.returncode == 3
    failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
    assert "achievements" in failed["schema_matches"]


GLOBALS = f"""
SET default_transaction_read_only = off;
\\restrict abc
CREATE ROLE grp;
ALTER ROLE grp WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE {APP_OWNER};
ALTER ROLE {APP_OWNER} WITH NOSUPERUSER INHERIT NOCREATEROLE CREATEDB LOGIN NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 3 VALID UNTIL '2031-02-03 04:05:06+02';
COMMENT ON ROLE {APP_OWNER} IS 'a ''comment''; -- not a comment';
ALTER ROLE {APP_OWNER} SET application_name TO 'it''s;
two lines';
ALTER ROLE {APP_OWNER} IN DATABASE app SET work_mem TO '8MB';
GRANT grp TO {APP_OWNER} WITH ADMIN OPTION GRANTED BY postgres;
"""


def test_globals_script_is_read_per_role() -> None:
    from backup_tool.postgres import roles

    found = roles.parse_globals(GLOBALS)
    owner = found.roles['App "Owner"']
    assert owner.settings == (("application_name", "'it''s;\ntwo lines'"),)
    assert owner.comment == "'a ''comment''; -- not a comment'"
    assert "CONNECTION LIMIT 3" in owner.attributes and "VALID UNTIL 2031-02-03T02:05:06+00:00" in owner.attributes
    assert not any("IN DATABASE" in s for s in owner.statements)
    assert len(owner.statements) == 4 and owner.statements[0] == f"CREATE ROLE {APP_OWNER}"
    assert [(m.role, m.member, m.admin) for m in found.memberships] == [("grp", 'App "Owner"', True)]


def test_plan_and_verdict_decisions() -> None:
    from backup_tool.postgres import roles

    backup = roles.parse_globals(GLOBALS)
    live = roles.parse_globals(GLOBALS.replace("NOLOGIN NOREPLICATION", "LOGIN NOREPLICATION")
                               .split(f"CREATE ROLE {APP_OWNER};")[0])
    plan = roles.plan(backup, live)
    assert [r.name for r in plan.create] == ['App "Owner"']
    assert [m.member for m in plan.grants] == ['App "Owner"']
    assert [(d.role, d.details) for d in plan.differences] == [
        ("grp", ("attributes LOGIN here, NOLOGIN in the backup",))]
    assert roles.verdict(backup, live, ["grp"], None).ok
    assert not roles.verdict(backup, live, ["grp"], frozenset({"grp"})).ok
    missing = roles.verdict(backup, live, ['App "Owner"'], None)
    assert not missing.ok and 'App "Owner"' in missing.detail


def test_an_attribute_only_one_side_has_is_named_against_none() -> None:
    """`ALTER ROLE r VALID UNTIL 'infinity'` on a role the backup has without an expiry: the
    difference says what the backup has ("none"), not a blank."""
    from backup_tool.postgres import roles

    backup = roles.parse_globals("CREATE ROLE r;\nALTER ROLE r WITH NOSUPERUSER LOGIN;\n")
    live = roles.parse_globals("CREATE ROLE r;\nALTER ROLE r WITH NOSUPERUSER LOGIN VALID UNTIL 'infinity';\n")
    diff = roles.compare_role(backup, live, "r")
    assert diff is not None and diff.details == ("attributes VALID UNTIL infinity here, none in the backup",)
    back = roles.compare_role(live, backup, "r")
    assert back is not None and back.details == ("attributes none here, VALID UNTIL infinity in the backup",)


def test_normalize_orders_privileges_per_object_and_keeps_every_statement() -> None:
    from backup_tool.postgres import schema

    one = "\n".join([
        "CREATE TABLE public.t (id integer);",
        "REVOKE ALL ON TABLE public.t FROM PUBLIC;",
        "GRANT SELECT ON TABLE public.t TO b;",
        "SET SESSION AUTHORIZATION owner2;",
        "GRANT INSERT ON TABLE public.t TO c;",
        "RESET SESSION AUTHORIZATION;",
        "GRANT SELECT ON TABLE public.t TO a;",
        "GRANT SELECT ON TABLE public.u TO z;",
        "GRANT SELECT ON TABLE public.u TO y;",
        'CREATE POLICY p ON public.t TO a, "b b" USING (true);',
    ])
    swapped = "\n".join([
        "CREATE TABLE public.t (id integer);",
        "GRANT SELECT ON TABLE public.t TO a;",
        "REVOKE ALL ON TABLE public.t FROM PUBLIC;",
        "SET SESSION AUTHORIZATION owner2;",
        "GRANT INSERT ON TABLE public.t TO c;",
        "RESET SESSION AUTHORIZATION;",
        "GRANT SELECT ON TABLE public.t TO b;",
        "GRANT SELECT ON TABLE public.u TO y;",
        "GRANT SELECT ON TABLE public.u TO z;",
        'CREATE POLICY p ON public.t TO "b b", a USING (true);',
    ])
    assert schema.normalize(one) == schema.normalize(swapped)
    assert schema.normalize_v1(one) != schema.normalize_v1(swapped)
    normalized = schema.normalize(one)
    assert sorted(normalized.splitlines()) != sorted(one.splitlines())  # policy roles reordered
    assert len(normalized.splitlines()) == len(one.splitlines())
    other_grantor = swapped.replace("SET SESSION AUTHORIZATION owner2;", "SET SESSION AUTHORIZATION owner3;")
    assert schema.normalize(other_grantor) != schema.normalize(one)
    lines = normalized.splitlines()
    block = lines.index("SET SESSION AUTHORIZATION owner2;")
    assert lines[block + 1:block + 3] == ["GRANT INSERT ON TABLE public.t TO c;", "RESET SESSION AUTHORIZATION;"]
    assert schema.normalize(one.replace("TO z;", "TO x;")) != normalized


OWNERS_ELSEWHERE = """
CREATE ROLE fdw_owner SUPERUSER; CREATE ROLE server_owner; CREATE ROLE mapped_user; CREATE ROLE collation_owner;
CREATE ROLE search_owner; CREATE ROLE stats_owner;
CREATE FOREIGN DATA WRAPPER plain_wrapper; ALTER FOREIGN DATA WRAPPER plain_wrapper OWNER TO fdw_owner;
CREATE SERVER far_away FOREIGN DATA WRAPPER plain_wrapper OPTIONS (host 'h');
ALTER SERVER far_away OWNER TO server_owner;
CREATE USER MAPPING FOR mapped_user SERVER far_away OPTIONS (password 'not-shown-anywhere');
CREATE COLLATION case_blind (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
ALTER COLLATION case_blind OWNER TO collation_owner;
CREATE TEXT SEARCH CONFIGURATION plain_search (COPY = simple);
ALTER TEXT SEARCH CONFIGURATION plain_search OWNER TO search_owner;
CREATE TABLE measured (a int, b int); INSERT INTO measured VALUES (1, 2);
CREATE STATISTICS measured_ab ON a, b FROM measured; ALTER STATISTICS measured_ab OWNER TO stats_owner;
"""
OWNERS = ["collation_owner", "fdw_owner", "mapped_user", "search_owner", "server_owner", "stats_owner"]


@pytest.mark.slow
def test_owners_of_servers_mappings_collations_and_search_configs_are_roles_the_restore_needs(
        cli: Cli, local_repo: str, pg_cluster_factory: Callable[..., PgServer]) -> None:
    """These roles were not among those a backup needs: without them on the target, the
    restore failed half-way in pg_restore (leaving an unfinished database), and
    ``--with-roles`` did not create them. A changed user mapping fails validation without
    its password (old or new) in the output: the schema difference quoted the options."""
    source = pg_cluster_factory()
    source.create_db("elsewhere")
    run_sql(source, "elsewhere", OWNERS_ELSEWHERE)
    run_sql(source, "elsewhere", "CREATE SUBSCRIPTION far_feed CONNECTION 'host=10.255.0.1 dbname=x"
                                 " password=sub-secret-77' PUBLICATION p WITH (connect = false)")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn("elsewhere"))
    target = pg_cluster_factory()
    refused = cli("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn("elsewhere"), "--create")
    assert refused.returncode == 1
    assert f"roles missing on the target server: {', '.join(OWNERS)}" in refused.stderr
    assert "--with-roles" in refused.stderr and "not-shown-anywhere" not in refused.stderr + refused.stdout
    with target.admin_conn() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'elsewhere'").fetchone() == (0,)
    result = cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn("elsewhere"),
                      "--create", "--with-roles")
    assert result["ok"] is True
    dbcompare.assert_same(dbcompare.fingerprint(source.dsn("elsewhere")),
                          dbcompare.fingerprint(target.dsn("elsewhere")))
    with target.admin_conn("elsewhere") as conn:
        conn.execute("ALTER USER MAPPING FOR mapped_user SERVER far_away OPTIONS (SET password 'changed-secret')")
        conn.execute("ALTER SUBSCRIPTION far_feed CONNECTION 'host=10.255.0.1 dbname=x password=changed-sub-77'")
    changed = cli("validate", "--repo", local_repo, "--dsn", target.dsn("elsewhere"), "--against", "latest")
    assert changed.returncode == 3
    assert "schema_matches" in changed.stdout and "password '***'" in changed.stdout
    assert "not-shown-anywhere" not in changed.stdout + changed.stderr
    assert "changed-secret" not in changed.stdout + changed.stderr
    detail = next(c["detail"] for c in cli.json("validate", "--repo", local_repo, "--dsn", target.dsn("elsewhere"),
                                                 "--against", "latest", expect_rc=3)["checks"]
                  if c["name"] == "schema_matches")
    assert "(4 lines)" in detail and "password=***" in detail
    assert "sub-secret-77" not in detail and "changed-sub-77" not in detail
