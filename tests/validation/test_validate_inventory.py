"""End to end: what a schema archive carries besides tables (publications, event triggers,
comments, object, column and default privileges, extension versions, FORCE ROW LEVEL
SECURITY) is compared by named checks after a restore, each failing with the object named;
and a source in an unusual but legal state (invalid partitioned index, NOT VALID foreign key
with an orphan, identity sequence behind its column) restores and validates OK."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from backup_tool.postgres.connection import ConnInfo
from backup_tool.validation.validate import validate

pytestmark = pytest.mark.slow

SCHEMA = 'Sch "q" é'
S = '"Sch ""q"" é"'
T = f'{S}."Tab le ü"'
C = '"Col ""x"""'
PUB = 'pub "ü"'
EVT = 'evt "ü"'


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture
def role(pg_server: Any) -> Iterator[str]:
    """A role with an awkward name, dropped (with its grants in every database) afterwards."""
    name = f'reader "{uuid.uuid4().hex[:6]}" ß'
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE ROLE {ident(name)}")
    yield name
    with pg_server.admin_conn() as conn:
        dbs = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datallowconn")]
    for db in dbs:
        with pg_server.admin_conn(db) as conn:
            conn.execute(f"DROP OWNED BY {ident(name)}")
    with pg_server.admin_conn() as conn:
        conn.execute(f"DROP ROLE {ident(name)}")


def source_sql(r: str) -> str:
    return f"""
        CREATE EXTENSION pg_trgm;
        CREATE SCHEMA {S};
        CREATE TABLE {T} (id int PRIMARY KEY, {C} text, secret text, flag bool);
        INSERT INTO {T} SELECT g, 'v ' || g, 's', g % 2 = 0 FROM generate_series(1, 50) g;
        CREATE TABLE public.plain (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text);
        INSERT INTO public.plain (note) VALUES ('a'), ('b');
        CREATE VIEW {S}."v ü" AS SELECT id FROM {T};
        CREATE TYPE {S}."mood ü" AS ENUM ('happy', 'sad');
        CREATE FUNCTION {S}."fn ü"(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
        CREATE FUNCTION public.on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$BEGIN END$$;
        CREATE EVENT TRIGGER {ident(EVT)} ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
            EXECUTE FUNCTION public.on_ddl();
        CREATE EVENT TRIGGER evt_plain ON sql_drop EXECUTE FUNCTION public.on_ddl();
        ALTER EVENT TRIGGER evt_plain ENABLE ALWAYS;
        CREATE PUBLICATION {ident(PUB)} FOR TABLE {T} (id, {C}) WHERE (id > 0), public.plain
            WITH (publish = 'insert, update', publish_via_partition_root = true);
        CREATE PUBLICATION pub_schema FOR TABLES IN SCHEMA {S};
        ALTER TABLE {T} ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {T} FORCE ROW LEVEL SECURITY;
        CREATE POLICY "own ü" ON {T} USING (flag);
        COMMENT ON SCHEMA {S} IS 'schema ü';
        COMMENT ON TABLE {T} IS 'table with ''quotes''';
        COMMENT ON COLUMN {T}.{C} IS 'column comment';
        COMMENT ON VIEW {S}."v ü" IS 'a view';
        COMMENT ON TYPE {S}."mood ü" IS 'a type';
        COMMENT ON FUNCTION {S}."fn ü"(int) IS 'a function';
        COMMENT ON POLICY "own ü" ON {T} IS 'a policy';
        COMMENT ON PUBLICATION {ident(PUB)} IS 'a publication';
        COMMENT ON EVENT TRIGGER {ident(EVT)} IS 'an event trigger';
        COMMENT ON CONSTRAINT "Tab le ü_pkey" ON {T} IS 'a constraint';
        GRANT USAGE ON SCHEMA {S} TO {ident(r)};
        GRANT SELECT ({C}), UPDATE (flag, {C}) ON {T} TO {ident(r)};
        GRANT SELECT, INSERT ON public.plain TO {ident(r)} WITH GRANT OPTION;
        GRANT SELECT ON {S}."v ü" TO {ident(r)};
        REVOKE EXECUTE ON FUNCTION {S}."fn ü"(int) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION {S}."fn ü"(int) TO {ident(r)};
        REVOKE USAGE ON TYPE {S}."mood ü" FROM PUBLIC;
        GRANT USAGE ON TYPE {S}."mood ü" TO {ident(r)};
        ALTER DEFAULT PRIVILEGES IN SCHEMA {S} GRANT SELECT, UPDATE ON TABLES TO {ident(r)};
        ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
        ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO {ident(r)};
    """


def failed_checks(cli: Any, repo: str, dsn: str, backup_id: str) -> dict[str, str]:
    proc = cli("validate", "--repo", repo, "--dsn", dsn, "--against", backup_id, "--json")
    report = proc.json()
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    assert (proc.returncode == 3) == bool(failed), (proc.returncode, failed)
    return failed


def test_every_inventory_check_catches_its_object(cli: Any, local_repo: str, fresh_db: Callable[..., Any],
                                                  pg_server: Any, role: str) -> None:
    source = fresh_db("invsrc")
    with source.connect() as conn:
        conn.execute(source_sql(role))
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    target_name = f"invdst_{uuid.uuid4().hex[:8]}"
    target = pg_server.dsn(target_name)
    try:
        result = cli.json("restore", "full", "--repo", local_repo, "--backup", entry["id"],
                          "--target-dsn", target, "--create")
        checks = {c["name"]: c for c in result["validation"]["checks"]}
        assert {"publications", "event_triggers", "column_privileges", "default_privileges", "comments",
                "object_privileges", "extensions_present", "rls_policies"} <= checks.keys()
        assert all(c["ok"] for c in checks.values()), checks
        assert checks["comments"]["detail"] == "12 comments match"
        assert checks["publications"]["detail"] == "2 publications match"
        assert checks["event_triggers"]["detail"] == "2 event triggers match"
        assert checks["default_privileges"]["detail"] == "2 default privileges match"
        assert failed_checks(cli, local_repo, target, entry["id"]) == {}

        with pg_server.admin_conn(target_name) as conn:
            conn.execute(f"""
                COMMENT ON COLUMN {T}.{C} IS NULL;
                REVOKE UPDATE ({C}) ON {T} FROM {ident(role)};
                ALTER DEFAULT PRIVILEGES IN SCHEMA {S} REVOKE UPDATE ON TABLES FROM {ident(role)};
                ALTER PUBLICATION {ident(PUB)} SET (publish_via_partition_root = false);
                ALTER EVENT TRIGGER {ident(EVT)} DISABLE;
                ALTER TABLE {T} NO FORCE ROW LEVEL SECURITY;
                REVOKE INSERT ON public.plain FROM {ident(role)};
                DROP EXTENSION pg_trgm;
                CREATE EXTENSION pg_trgm VERSION '1.5';""")
        failed = failed_checks(cli, local_repo, target, entry["id"])
        version = source.scalar("SELECT extversion FROM pg_extension WHERE extname = 'pg_trgm'")
        expected = {
            "comments": f'missing table column {T}.{C}',
            "column_privileges": f"changed {T}.{C} (lost {role} UPDATE by postgres)",
            "default_privileges": f"changed for role postgres in schema {S} on tables (lost {role} UPDATE by postgres)",
            "publications": f"changed {ident(PUB)} (via_root)",
            "event_triggers": f"changed {ident(EVT)} (enabled)",
            "rls_policies": f"changed {SCHEMA}.Tab le ü.rls",
            "object_privileges": f"changed table public.plain (lost {role} INSERT by postgres with grant option)",
            "extensions_present": f"changed pg_trgm (backup {version}, database 1.5)",
        }
        for name, words in expected.items():
            assert name in failed and words in failed[name], (name, failed.get(name))
        assert set(failed) == set(expected) | {"schema_matches"}, failed
    finally:
        pg_server.drop_db(target_name)


def strip_manifest(repo: str, backup_id: str, keys: tuple[str, ...]) -> None:
    """Rewrite a local repository's manifest as a version that did not record ``keys`` would
    have written it (unencrypted manifests carry only a sha256 of their canonical form)."""
    path = Path(repo) / "manifests" / f"{backup_id}.json"
    body = json.loads(path.read_text())
    body["inventory"] = {k: v for k, v in body["inventory"].items() if k not in keys}
    canonical = json.dumps({k: v for k, v in body.items() if k != "manifest_sha256"},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    body["manifest_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.chmod(0o644)
    path.write_text(json.dumps(body))


def test_manifest_without_the_new_inventories_skips_their_checks(cli: Any, local_repo: str,
                                                                  fresh_db: Callable[..., Any],
                                                                  role: str) -> None:
    db = fresh_db("invold")
    with db.connect() as conn:
        conn.execute(source_sql(role))
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    new = ("publications", "event_triggers", "comments", "object_privileges", "column_privileges",
           "default_privileges", "extension_config")
    strip_manifest(local_repo, entry["id"], new)
    report = cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", entry["id"])
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("publications", "event_triggers", "comments", "object_privileges", "column_privileges",
                 "default_privileges", "extension_config"):
        assert checks[name]["ok"] and "not recorded by this backup" in checks[name]["detail"], checks[name]
    assert cli.json("validate", "--dsn", db.dsn)["ok"] is True


UNUSUAL = """
    CREATE TABLE parted (id int, k int) PARTITION BY RANGE (id);
    CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
    CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (100) TO (200);
    INSERT INTO parted SELECT g, g FROM generate_series(0, 199) g;
    CREATE INDEX parted_k ON ONLY parted (k);
    CREATE INDEX parted_1_k ON parted_1 (k);
    ALTER INDEX parted_k ATTACH PARTITION parted_1_k;
    CREATE TABLE parent (id int PRIMARY KEY);
    INSERT INTO parent VALUES (1);
    CREATE TABLE child (id int, pid int, vpid int REFERENCES parent);
    INSERT INTO child VALUES (1, 999, 1), (2, 1, NULL);
    ALTER TABLE child ADD CONSTRAINT "child pid ü" FOREIGN KEY (pid) REFERENCES parent NOT VALID;
    CREATE TABLE ident (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY);
    INSERT INTO ident (id) VALUES (1), (2), (50);
"""


def test_unusual_source_states_restore_and_validate(cli: Any, local_repo: str, fresh_db: Callable[..., Any],
                                                    pg_server: Any) -> None:
    source = fresh_db("unusual")
    with source.connect() as conn:
        conn.execute(UNUSUAL)
    live = {c["name"]: c for c in cli.json("validate", "--dsn", source.dsn, expect_rc=3)["checks"]}
    assert not live["indexes_valid"]["ok"] and "public.parted.parted_k" in live["indexes_valid"]["detail"]
    assert not live["foreign_keys_hold"]["ok"] and "child pid ü (1)" in live["foreign_keys_hold"]["detail"]
    assert not live["sequences_not_behind"]["ok"] and "ident_id_seq" in live["sequences_not_behind"]["detail"]

    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    assert cli.json("validate", "--repo", local_repo, "--dsn", source.dsn, "--against", entry["id"])["ok"]
    target_name = f"unusual_dst_{uuid.uuid4().hex[:8]}"
    target = pg_server.dsn(target_name)
    try:
        result = cli.json("restore", "full", "--repo", local_repo, "--backup", entry["id"],
                          "--target-dsn", target, "--create")
        assert result["ok"] is True
        checks = {c["name"]: c["detail"] for c in result["validation"]["checks"]}
        assert "invalid as in the backup: public.parted.parted_k" in checks["indexes_valid"]
        assert "1 NOT VALID in the backup not counted" in checks["foreign_keys_hold"]
        assert "1 validated by PostgreSQL as this restore created them, after the data" in checks["foreign_keys_hold"]
        assert "behind their column as in the backup: public.ident_id_seq" in checks["sequences_not_behind"]

        with pg_server.admin_conn(target_name) as conn:
            assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'parted_k'::regclass"
                                ).fetchone() == (False,)
            conn.execute("SET session_replication_role = replica")
            conn.execute("INSERT INTO child VALUES (3, 1, 777)")
            conn.execute("SELECT setval('ident_id_seq', 2)")
            conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'parted_1_k'::regclass")
        failed = failed_checks(cli, local_repo, target, entry["id"])
        assert "child_vpid_fkey (1)" in failed["foreign_keys_hold"]  # validate counts a validated key's orphans
        assert "public.parted_1.parted_1_k" in failed["indexes_valid"]
        assert "child pid" not in failed["foreign_keys_hold"]
        assert "public.ident_id_seq at 2, column max 50" in failed["sequences_not_behind"]
    finally:
        pg_server.drop_db(target_name)


def test_acls_compare_as_sets_and_changes_name_the_entries() -> None:
    from backup_tool.postgres.inventory import normalise_acl
    from backup_tool.validation.validate import INVENTORY_CHECKS

    acl = [["bob", "alice", "SELECT", False], ["PUBLIC", "alice", "USAGE", False]]
    assert normalise_acl(acl) == normalise_acl([acl[1], acl[0], acl[0]])
    check = {c.name: c for c in INVENTORY_CHECKS}["object_privileges"]
    backup = {"object_privileges": [{"object": "table public.t", "acl": normalise_acl(acl)}]}
    same = {"object_privileges": [{"object": "table public.t", "acl": normalise_acl(acl[::-1])}]}
    assert check.run(backup, same).ok
    changed = {"object_privileges": [{"object": "table public.t",
                                      "acl": normalise_acl([acl[0], ["bob", "alice", "INSERT", True]])}]}
    result = check.run(backup, changed)
    assert not result.ok
    assert result.detail == ("object privileges: changed table public.t (lost PUBLIC USAGE by alice; "
                             "gained bob INSERT by alice with grant option)")
    old = check.run({"functions": []}, changed)
    assert old.ok and "not recorded by this backup" in old.detail


def test_sequence_reset_to_not_called_at_the_backed_up_value_is_behind(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """`setval(s, v, false)` keeps last_value but makes nextval hand out v again, a value the
    backup's source already gave out: one step behind, for a free-standing sequence as for an
    identity column's."""
    db = fresh_db("seqcalled")
    seq = "'" + ident('Free "seq"') + "'"
    with db.connect() as conn:
        conn.execute(f"""
            CREATE SEQUENCE {seq[1:-1]} START 100 INCREMENT 5;
            SELECT nextval({seq}), nextval({seq});
            CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY, v text);
            INSERT INTO ident (v) VALUES ('a'), ('b');
        """)
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    assert failed_checks(cli, local_repo, db.dsn, entry["id"]) == {}
    with db.connect() as conn:
        conn.execute(f"SELECT setval({seq}, 105, false), setval('ident_id_seq', 2, false)")
    failed = failed_checks(cli, local_repo, db.dsn, entry["id"])
    assert set(failed) == {"sequences_not_behind"}
    assert 'public.Free "seq" at 105 (not yet called), backup had 105' in failed["sequences_not_behind"]
    assert "public.ident_id_seq at 2 (not yet called), backup had 2" in failed["sequences_not_behind"]
    with db.connect() as conn:
        conn.execute(f"SELECT setval({seq}, 105), setval('ident_id_seq', 2)")
    assert failed_checks(cli, local_repo, db.dsn, entry["id"]) == {}


def test_physical_copy_lists_source_states_but_fails_an_unlogged_sequence_reset(fresh_db: Callable[..., Any]) -> None:
    """After WAL replay (restore pitr) an invalid index and a logged sequence behind its column
    are the source's own states; an unlogged sequence behind its column was reset by recovery."""
    db = fresh_db("physical")
    with db.connect() as conn:
        conn.execute("""
            CREATE TABLE parted (k int) PARTITION BY RANGE (k);
            CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
            CREATE INDEX parted_k ON ONLY parted (k);
            CREATE TABLE ident (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY);
            INSERT INTO ident VALUES (1), (2), (50);
            CREATE TABLE reset (id serial PRIMARY KEY);
            INSERT INTO reset SELECT FROM generate_series(1, 5);
            ALTER SEQUENCE reset_id_seq SET UNLOGGED;
            SELECT setval('reset_id_seq', 1, false);
        """)
    checks = {c.name: c for c in validate(ConnInfo(db.dsn), physical_copy=True).checks}
    assert checks["indexes_valid"].ok
    assert "invalid as in the source (recovered from its WAL): public.parted.parted_k" in checks["indexes_valid"].detail
    seqs = checks["sequences_not_behind"]
    assert not seqs.ok and seqs.detail == "behind: public.reset_id_seq at 1, column max 5"
    live = {c.name: c for c in validate(ConnInfo(db.dsn)).checks}
    assert not live["indexes_valid"].ok and "ident_id_seq at 1" in live["sequences_not_behind"].detail


def test_a_wrapped_cycle_sequence_passes_and_a_descending_one_behind_fails(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """A CYCLE identity that has wrapped sits below the values of its earlier lap: healthy, not
    behind (it failed `validate`). A descending sequence is behind when above its column's
    minimum (its column's maximum was read, so one behind passed)."""
    db = fresh_db("seqdirs")
    with db.connect() as conn:
        conn.execute("""
            CREATE TABLE lap (id int GENERATED ALWAYS AS IDENTITY (MAXVALUE 5 CYCLE), v text);
            INSERT INTO lap (v) SELECT 'x' FROM generate_series(1, 5);
            DELETE FROM lap WHERE id <= 2;
            INSERT INTO lap (v) VALUES ('wrapped'), ('again');
            CREATE TABLE down (id int GENERATED BY DEFAULT AS IDENTITY (INCREMENT -1 START -1 MAXVALUE -1), v text);
            INSERT INTO down (v) SELECT 'y' FROM generate_series(1, 10);
        """)
    live = cli.json("validate", "--dsn", db.dsn)
    seqs = next(c for c in live["checks"] if c["name"] == "sequences_not_behind")
    assert seqs["ok"] and "cycling, not compared with their column: public.lap_id_seq" in seqs["detail"]
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    assert failed_checks(cli, local_repo, db.dsn, entry["id"]) == {}
    with db.connect() as conn:
        conn.execute("SELECT setval('down_id_seq', -4)")
    behind = cli("validate", "--dsn", db.dsn, "--json")
    assert behind.returncode == 3
    detail = next(c["detail"] for c in behind.json()["checks"] if c["name"] == "sequences_not_behind")
    assert "public.down_id_seq at -4, column min -10" in detail


def test_names_are_written_the_same_whatever_search_path_the_sessions_have(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    """A role or database may set search_path (`ALTER ROLE app SET search_path = app, public`;
    here the DSN's options stand for it). A backup taken under it wrote regclass/regtype values
    and the names in foreign keys and function arguments unqualified: the untouched source then
    failed validation by a role without that path (foreign_keys_match, functions_present,
    content_checksums), a restore by one failed loading ('relation "t" does not exist'), and a
    restore by a role with the path read a public table's unqualified name as app's."""
    db = fresh_db("searchpath")
    with db.connect() as conn:
        conn.execute("""
            CREATE SCHEMA app;
            CREATE TABLE app.t (id int PRIMARY KEY, r regclass, ty regtype);
            CREATE TABLE app.u (id int PRIMARY KEY, t_id int REFERENCES app.t);
            CREATE FUNCTION app.f(x app.t) RETURNS int LANGUAGE sql AS 'SELECT 1';
            CREATE TABLE public.pt (); CREATE TABLE app.pt ();
            INSERT INTO app.t VALUES (1, 'app.t', 'app.t'), (2, 'app.u', 'app.u[]'), (3, 'public.pt', 'int4');
            INSERT INTO app.u VALUES (1, 1);
        """)
    with_path = db.dsn + "?options=-c%20search_path%3Dapp%2Cpublic"
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", with_path)
    assert failed_checks(cli, local_repo, db.dsn, entry["id"]) == {}
    assert failed_checks(cli, local_repo, with_path, entry["id"]) == {}
    target_name = f"searchpath_dst_{uuid.uuid4().hex[:8]}"
    try:
        result = cli.json("restore", "full", "--repo", local_repo, "--backup", entry["id"],
                          "--target-dsn", pg_server.dsn(target_name), "--create")
        assert result["ok"] is True
        with pg_server.admin_conn(target_name) as conn:
            assert conn.execute("SELECT r::text, ty::text FROM app.t ORDER BY id").fetchall() == [
                ("app.t", "app.t"), ("app.u", "app.u[]"), ("pt", "integer")]
    finally:
        pg_server.drop_db(target_name)
    with db.connect() as conn:
        conn.execute("DELETE FROM app.u; DELETE FROM app.t")
    cli.json("restore", "tables", "--repo", local_repo, "--backup", entry["id"], "--tables", "app.t,app.u",
             "--target-dsn", with_path, "--replace")
    with db.connect() as conn:
        assert conn.execute("SELECT r = 'public.pt'::regclass FROM app.t WHERE id = 3").fetchone() == (True,), \
            "read back as app.pt under the restoring role's path"


def test_extract_fields_pg_dump_cannot_keep_in_upper_case_match_and_other_changes_still_fail(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    """`EXTRACT('YEAR' FROM x)` (LedgerSMB writes it so) deparses, on PostgreSQL 15.18 and
    earlier, as `EXTRACT(YEAR FROM x)`, which pg_dump writes and PostgreSQL reads back as
    `EXTRACT(year FROM x)`: every restore of
    such a view, index, trigger, policy, default, check, publication filter or SQL-standard
    function body differed from its backup, and validation failed a faithful restore. Those
    compare without the field's letter case, saying so; any other change still fails."""
    db = fresh_db("extractcase")
    with db.connect() as conn:
        conn.execute("""
            CREATE TABLE t (id int PRIMARY KEY, ts timestamptz NOT NULL, d date,
                y numeric DEFAULT extract('YEAR' FROM now()),
                m numeric GENERATED ALWAYS AS (extract('Month' FROM d)) STORED,
                CHECK (extract('DOW' FROM ts) BETWEEN 0 AND 6));
            CREATE INDEX t_year ON t ((extract('YEAR' FROM d)));
            CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
            CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW WHEN (extract('Hour' FROM NEW.ts) >= 0)
                EXECUTE FUNCTION f();
            ALTER TABLE t ENABLE ROW LEVEL SECURITY;
            CREATE POLICY p ON t USING (extract('YEAR' FROM ts) > 2000);
            CREATE PUBLICATION pub FOR TABLE t WHERE (extract('YEAR' FROM d) > 2000);
            CREATE VIEW v AS SELECT extract('EPOCH' FROM ts) AS e FROM t;
            CREATE FUNCTION year_of(timestamptz) RETURNS numeric LANGUAGE sql
                BEGIN ATOMIC SELECT extract('YEAR' FROM $1); END;
            INSERT INTO t (id, ts, d) SELECT g, '2024-01-01'::timestamptz + g * interval '1 hour',
                date '2024-01-01' + g FROM generate_series(1, 20) g;
        """)
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    target_name = f"extractcase_dst_{uuid.uuid4().hex[:8]}"
    try:
        result = cli.json("restore", "full", "--repo", local_repo, "--backup", entry["id"],
                          "--target-dsn", pg_server.dsn(target_name), "--create")
        checks = {c["name"]: c["detail"] for c in result["validation"]["checks"]}
        assert result["ok"] is True
        quoted = 'EXTRACT("EPOCH" FROM' in db.scalar("SELECT pg_get_viewdef('v')")
        for name in ("schema_matches", "indexes_valid", "triggers_present", "rls_policies", "publications"):
            # 15.20 writes the field quoted, EXTRACT("YEAR" FROM x), which reads back exactly
            assert ("letter case of EXTRACT fields" in checks[name]) is not quoted, (name, checks[name])
        with pg_server.admin_conn(target_name) as conn:
            assert ('EXTRACT("YEAR" FROM d)' if quoted else "EXTRACT(year FROM d)") in conn.execute(
                "SELECT pg_get_indexdef('t_year'::regclass)").fetchone()[0]
            conn.execute("""
                DROP INDEX t_year; CREATE INDEX t_year ON t ((extract('MONTH' FROM d)));
                ALTER POLICY p ON t USING (extract('YEAR' FROM ts) > 2001);""")
        failed = failed_checks(cli, local_repo, pg_server.dsn(target_name), entry["id"])
        assert set(failed) == {"schema_matches", "indexes_valid", "rls_policies"}, failed
        assert "changed public.t.t_year" in failed["indexes_valid"]
        assert ('EXTRACT("MONTH" FROM d)' if quoted else "EXTRACT(month FROM d)") in failed["schema_matches"]
    finally:
        pg_server.drop_db(target_name)


def test_in_lists_on_varchar_columns_that_pg_dump_cannot_keep_as_written_match_and_changes_still_fail(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    """Django writes ``status IN ('in_progress', 'needs_changes')`` on a varchar column (Wagtail's
    ``unique_in_progress_workflow`` partial index); PostgreSQL deparses it with a cast of the whole
    array to ``text[]`` and reads that back with a cast of each element, so every restore of
    Wagtail failed ``schema_matches`` and ``indexes_valid``. Both forms now match, saying so; a
    changed literal still fails."""
    db = fresh_db("inlist")
    with db.connect() as conn:
        conn.execute("""
            CREATE TABLE w (id int PRIMARY KEY, ct int, status varchar(50) NOT NULL,
                CONSTRAINT w_status_check CHECK (status IN ('in_progress', 'approved', 'needs_changes')));
            CREATE UNIQUE INDEX unique_in_progress ON w (ct) WHERE status IN ('in_progress', 'needs_changes');
            ALTER TABLE w ENABLE ROW LEVEL SECURITY;
            CREATE POLICY p ON w USING (status IN ('approved', 'in_progress'));
            CREATE VIEW open_w AS SELECT id FROM w WHERE status IN ('in_progress', 'needs_changes');
            INSERT INTO w SELECT g, g, 'approved' FROM generate_series(1, 10) g;
        """)
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    target_name = f"inlist_dst_{uuid.uuid4().hex[:8]}"
    try:
        result = cli.json("restore", "full", "--repo", local_repo, "--backup", entry["id"],
                          "--target-dsn", pg_server.dsn(target_name), "--create")
        checks = {c["name"]: c["detail"] for c in result["validation"]["checks"]}
        assert result["ok"] is True, checks
        for name in ("schema_matches", "indexes_valid", "rls_policies"):
            assert "casts of whole ARRAY[...] constructors" in checks[name], (name, checks[name])
        with pg_server.admin_conn(target_name) as conn:
            assert "('in_progress'::character varying)::text" in conn.execute(
                "SELECT pg_get_indexdef('unique_in_progress'::regclass)").fetchone()[0]
            conn.execute("""
                DROP INDEX unique_in_progress;
                CREATE UNIQUE INDEX unique_in_progress ON w (ct) WHERE status IN ('in_progress', 'rejected');""")
        failed = failed_checks(cli, local_repo, pg_server.dsn(target_name), entry["id"])
        assert set(failed) == {"schema_matches", "indexes_valid"}, failed
        assert "changed public.w.unique_in_progress" in failed["indexes_valid"]
    finally:
        pg_server.drop_db(target_name)


def test_a_dropped_schema_fails_the_checks_naming_its_tables(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """A backed-up table whose schema is gone is missing, as one whose table alone is gone:
    `validate` exited 1 with `schema "..." does not exist` instead of a verdict (found
    validating Mailman 3's database, all in `public`, after `DROP SCHEMA public CASCADE`)."""
    db = fresh_db("goneschema")
    with db.connect() as conn:
        conn.execute(f"""
            CREATE SCHEMA {S};
            CREATE TABLE {T} (id int PRIMARY KEY, v text);
            INSERT INTO {T} SELECT g, 'v' FROM generate_series(1, 5) g;
            CREATE TABLE public.kept (id int PRIMARY KEY);
            INSERT INTO public.kept VALUES (1);
        """)
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    with db.connect() as conn:
        conn.execute(f"DROP SCHEMA {S} CASCADE")
    failed = failed_checks(cli, local_repo, db.dsn, entry["id"])
    assert failed["row_counts"] == f"missing tables: {SCHEMA}.Tab le ü"
    assert f"{SCHEMA}.Tab le ü" in failed["column_order"]


def test_a_changed_column_is_named_with_its_table(cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """MLflow's ``experiments``, ``runs`` and ``logged_models`` each have a ``lifecycle_stage``
    column: a default set on one of them failed ``schema_matches`` with the column's line alone,
    not saying which table. Each changed line inside a statement now comes with its first line."""
    db = fresh_db("coltable")
    with db.connect() as conn:
        conn.execute("""
            CREATE TABLE experiments (id int PRIMARY KEY, lifecycle_stage varchar(20));
            CREATE TABLE runs (id int PRIMARY KEY, lifecycle_stage varchar(20), status varchar(9) NOT NULL);
        """)
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    with db.connect() as conn:
        conn.execute("ALTER TABLE runs ALTER COLUMN lifecycle_stage SET DEFAULT 'active'")
    failed = failed_checks(cli, local_repo, db.dsn, entry["id"])
    assert set(failed) == {"schema_matches"}, failed
    assert ("CREATE TABLE public.runs: +    lifecycle_stage character varying(20) DEFAULT 'active'"
            in failed["schema_matches"]), failed
    assert "public.experiments" not in failed["schema_matches"]
