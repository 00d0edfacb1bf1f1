"""Selective table restores: only the chosen tables come back, nothing else is touched,
refusals change nothing, and each mode ends validated."""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable, Iterator

import clioutput
import dbcompare
import psycopg
import pytest
from sessions import holding
from support.clusters import DbHandle, free_port
from support.manifests import make_manifest
from support.objects import read_object, write_object

from backup_tool.cli.common import one_line
from backup_tool.config.settings import resolve_settings
from backup_tool.core.report import NullReporter
from backup_tool.errors import NotFoundError, UsageError
from backup_tool.logical.restore_tables import restore_tables, validate_tables
from backup_tool.logical.selection import as_typed, resolve_tables, split_name, split_names
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.catalog import Catalog
from backup_tool.repository.manifest import TableEntry
from backup_tool.repository.storage import open_storage

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("text, expected", [
    ("public.users", ("public", "users")),
    ("users", (None, "users")),
    ('analytics."UserJourneys"', ("analytics", "UserJourneys")),
    ('analytics."daily.stats"', ("analytics", "daily.stats")),
    ('"we""ird"."a.b"', ('we"ird', "a.b")),
])
def test_split_name(text: str, expected: tuple[str | None, str]) -> None:
    assert split_name(text) == expected


@pytest.mark.parametrize("bad", ['"open', "a.", ".b", ""])
def test_split_name_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        split_name(bad)


def test_unknown_table_lists_closest_names() -> None:
    with pytest.raises(NotFoundError) as err:
        resolve_tables(make_manifest(), ["public.user"])
    assert "public.users" in str(err.value)


def test_a_suggested_name_reads_back_as_the_table_it_names() -> None:
    """The closest names an unknown one gets are written as --tables reads them: pasted
    back, each selects its table (a backslash is not doubled, a dot or quote is quoted)."""
    odd = ("we\\ird.sch", 'say "hi", ok', "Mixed Case")
    tables = tuple(TableEntry(s, n, "r", None, ("id",), 0, "0" * 16, None) for s in ("public", odd[0])
                   for n in odd[1:])
    manifest = make_manifest(tables=tables)
    for t in tables:
        typed = as_typed(t.schema, t.name)
        assert split_names(typed) == [typed] and resolve_tables(manifest, [typed]) == [t]
    with pytest.raises(NotFoundError) as err:
        resolve_tables(manifest, ['"we\\ird.sch"."say hi"'])
    hint = err.value.hint or ""
    assert "\\\\" not in str(err.value) + hint
    suggested = split_names(hint.removeprefix("closest: "))[0]
    assert resolve_tables(manifest, [suggested])[0].schema == odd[0]


@pytest.fixture
def live(seed_copy: Callable[..., Any], cli: Any, local_repo: str) -> tuple[Any, dict[str, Any]]:
    db = seed_copy("live")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    return db, entry


def hashes(db: Any) -> dict[str, Any]:
    return dbcompare.table_hashes(db.dsn)


def assert_only_changed(before: dict[str, Any], after: dict[str, Any], changed: set[str]) -> None:
    differing = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert differing <= changed, differing - changed


def damage_table_object(cli: Any, repo: str, backup_id: str, table: str) -> tuple[str, bytes]:
    """Flip a byte in the middle of ``table``'s data object in backup ``backup_id``; return
    its key and its whole bytes (to put back)."""
    show = cli.json("show", "--repo", repo, backup_id)
    key = next(t["object"] for t in show["tables"] if t["table"] == table)
    whole = read_object(repo, key)
    damaged = bytearray(whole)
    damaged[len(damaged) // 2] ^= 0xFF
    write_object(repo, key, bytes(damaged))
    return key, whole


def test_emptied_table_comes_back_alone(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]],
                                        seed_db: Any) -> None:
    db, entry = live
    expected = hashes(seed_db)
    db.execute("DELETE FROM public.crm_projects")
    before = hashes(db)
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.crm_projects",
                      "--target-dsn", db.dsn)
    assert result["ok"] is True and result["tables"] == ["public.crm_projects"]
    after = hashes(db)
    assert after["public.crm_projects"] == expected["public.crm_projects"]
    assert_only_changed(before, after, {"public.crm_projects"})
    show = cli.json("show", "--repo", local_repo, entry["id"])
    table_bytes = next(t["size_bytes"] for t in show["tables"] if t["table"] == "public.crm_projects")
    schema_bytes = next(o["size"] for o in show["objects"] if o["key"].endswith("schema.pgdump.zst"))
    assert result["bytes_read"] == table_bytes, "only the chosen table's object is downloaded (schema not needed)"
    assert result["bytes_read"] < entry["size_bytes"] - schema_bytes


TRIGGERS = """
CREATE TABLE public.project_audit (what text, at_row text);
CREATE FUNCTION public.mark_project() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN NEW.name := NEW.name || ' (changed)'; RETURN NEW; END $$;
CREATE FUNCTION public.audit_project() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN INSERT INTO public.project_audit VALUES (TG_NAME, CASE WHEN TG_LEVEL = 'ROW' THEN NEW.name END);
        RETURN NULL; END $$;
CREATE TRIGGER always_mark BEFORE INSERT ON public.crm_projects FOR EACH ROW EXECUTE FUNCTION public.mark_project();
ALTER TABLE public.crm_projects ENABLE ALWAYS TRIGGER always_mark;
CREATE TRIGGER replica_mark BEFORE INSERT ON public.crm_projects FOR EACH ROW EXECUTE FUNCTION public.mark_project();
ALTER TABLE public.crm_projects ENABLE REPLICA TRIGGER replica_mark;
CREATE TRIGGER origin_audit AFTER INSERT ON public.crm_projects FOR EACH ROW EXECUTE FUNCTION public.audit_project();
CREATE TRIGGER always_truncate AFTER TRUNCATE ON public.crm_projects EXECUTE FUNCTION public.audit_project();
ALTER TABLE public.crm_projects ENABLE ALWAYS TRIGGER always_truncate;
CREATE TRIGGER disabled_audit AFTER INSERT ON public.crm_projects FOR EACH ROW EXECUTE FUNCTION public.audit_project();
ALTER TABLE public.crm_projects DISABLE TRIGGER disabled_audit;
"""
TRIGGER_STATES = [("always_mark", "A"), ("always_truncate", "A"), ("disabled_audit", "D"), ("origin_audit", "O"),
                  ("replica_mark", "R")]


@pytest.mark.parametrize("as_owner", [False, True], ids=["superuser", "table-owner"])
def test_target_triggers_fire_on_no_restored_row_and_keep_their_states(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]], seed_db: Any, as_owner: bool) -> None:
    """The target's triggers on a table being refilled (origin, replica, always; row and
    TRUNCATE) fire on nothing: the rows are the backup's and nothing is written elsewhere.
    Before, a superuser's restore fired REPLICA and ALWAYS triggers (rows rewritten, verdict
    failed), and a table owner's turned every trigger, a disabled one included, into an origin
    trigger."""
    db, _ = live
    expected = hashes(seed_db)["public.crm_projects"]
    db.execute(TRIGGERS)
    dsn = db.dsn
    if as_owner:
        role = f"owner_{db.name[-8:]}"
        db.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'trg-pw-51' NOSUPERUSER BYPASSRLS")
        db.execute(f"GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};"
                   f" GRANT ALL ON public.project_audit TO {role};"
                   f" ALTER TABLE public.crm_projects OWNER TO {role}")
        server = db.server
        dsn = f"postgresql://{role}:trg-pw-51@{server.host}:{server.port}/{db.name}"
    db.execute("UPDATE public.crm_projects SET name = 'vandalised'")
    try:
        result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.crm_projects",
                          "--replace", "--target-dsn", dsn)
        assert result["ok"] is True
        assert hashes(db)["public.crm_projects"] == expected
        assert db.scalar("SELECT count(*) FROM public.project_audit") == 0
        assert db.execute("SELECT tgname, tgenabled::text FROM pg_trigger WHERE tgrelid = 'public.crm_projects'::regclass"
                          " AND NOT tgisinternal ORDER BY 1") == TRIGGER_STATES
    finally:
        if as_owner:
            db.execute(f"ALTER TABLE public.crm_projects OWNER TO postgres; DROP OWNED BY {role}; DROP ROLE {role}")


def test_non_empty_table_is_refused_untouched(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    db, _ = live
    db.execute("DELETE FROM public.coupons WHERE ctid = (SELECT min(ctid) FROM public.coupons)")
    before = dbcompare.fingerprint(db.dsn)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.coupons", "--target-dsn", db.dsn)
    assert proc.returncode == 1
    assert "not empty" in proc.stderr and "--replace" in proc.stderr
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))


def test_dropped_table_is_recreated_with_everything(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]],
                                                   seed_db: Any) -> None:
    db, _ = live
    db.execute('DROP TABLE analytics."feature usage"')
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", 'analytics."feature usage"',
                      "--target-dsn", db.dsn)
    assert result["ok"] is True
    dbcompare.assert_same(dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(db.dsn))


def test_foreign_keys_gone_with_a_dropped_table_are_named_with_the_statement_that_adds_them_back(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]], seed_db: Any) -> None:
    """``DROP TABLE crm_clients CASCADE`` also drops crm_projects' key to it. The restore
    brings the table back with its own definition and writes no other table, so that key stays
    missing: the restore's verdict said "OK — complete and consistent" all the same (GNUmed's
    clin_narrative, which two tables reference, came back so). It now fails naming the key
    and the statement that adds it back; once that is run the database validates against the
    backup."""
    db, _ = live
    db.execute("DROP TABLE public.crm_clients CASCADE")
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.crm_clients",
                      "--target-dsn", db.dsn, expect_rc=3)
    failed = {c["name"]: c["detail"] for c in _checks(result) if not c["ok"]}
    assert set(failed) == {"foreign_keys_match"}, failed
    detail = failed["foreign_keys_match"]
    assert "missing public.crm_projects.crm_projects_client_id_fkey" in detail, detail
    statement = detail.split("add a missing key back with ", 1)[1].removesuffix(")")
    assert statement.startswith("ALTER TABLE public.crm_projects ADD CONSTRAINT crm_projects_client_id_fkey"
                                " FOREIGN KEY (client_id) REFERENCES public.crm_clients(id)"), statement
    assert db.scalar("SELECT count(*) FROM public.crm_clients") == seed_db.scalar("SELECT count(*) FROM public.crm_clients")
    db.execute(statement)
    assert cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", "latest")["ok"] is True
    again = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.crm_clients",
                     "--target-dsn", db.dsn, "--replace")
    assert again["ok"] is True


def test_tables_a_delete_cascaded_into_are_named(cli: Any, local_repo: str, seed_copy: Callable[..., Any]) -> None:
    """Prefect's shape: ``flow_run`` references ``flow`` and ``task_run`` references ``flow_run``
    ``ON DELETE CASCADE``, ``log`` references ``flow_run`` ``ON DELETE SET NULL``. ``DELETE FROM
    flow`` takes every run and task run along and empties every log line's reference. Restoring
    ``flow`` alone gives its rows back, and its verdict is right about them, but said nothing of
    the runs that stayed gone nor of the references. It now warns naming the tables the cascade
    reaches and the one whose references it reset, and restoring them with it gives every row
    back without the warning."""
    db = seed_copy("cascade")
    db.execute("CREATE SCHEMA app;"
               " CREATE TABLE app.flow (id int PRIMARY KEY);"
               " CREATE TABLE app.flow_run (id int PRIMARY KEY, flow_id int REFERENCES app.flow ON DELETE CASCADE);"
               " CREATE TABLE app.task_run (id int PRIMARY KEY,"
               "   flow_run_id int REFERENCES app.flow_run ON DELETE CASCADE);"
               " CREATE TABLE app.log (id int PRIMARY KEY, flow_run_id int REFERENCES app.flow_run ON DELETE SET NULL);"
               " INSERT INTO app.flow SELECT g FROM generate_series(1, 3) g;"
               " INSERT INTO app.flow_run SELECT g, g % 3 + 1 FROM generate_series(1, 12) g;"
               " INSERT INTO app.task_run SELECT g, g % 12 + 1 FROM generate_series(1, 60) g;"
               " INSERT INTO app.log SELECT g, g % 12 + 1 FROM generate_series(1, 20) g")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute("DELETE FROM app.flow")
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "app.flow", "--target-dsn", db.dsn)
    assert proc.returncode == 0, proc.stderr
    assert "app.flow_run, app.log, app.task_run reference the restored tables ON DELETE CASCADE, SET NULL or" \
        " SET DEFAULT" in proc.stderr, proc.stderr
    assert db.scalar("SELECT count(*) FROM app.flow") == 3 and db.scalar("SELECT count(*) FROM app.task_run") == 0
    assert db.scalar("SELECT count(*) FROM app.log WHERE flow_run_id IS NOT NULL") == 0
    again = cli("restore", "tables", "--repo", local_repo, "--tables", "app.flow,app.flow_run,app.task_run,app.log",
                "--target-dsn", db.dsn, "--replace")
    assert again.returncode == 0, again.stderr
    assert "ON DELETE CASCADE" not in again.stderr, again.stderr
    counts = [db.scalar(f"SELECT count(*) FROM app.{t}") for t in ("flow", "flow_run", "task_run", "log")]
    assert counts == [3, 12, 60, 20]
    assert db.scalar("SELECT count(*) FROM app.log WHERE flow_run_id IS NULL") == 0


def _checks(result: Any) -> list[dict[str, Any]]:
    """Every check dict anywhere in a command's JSON."""
    if isinstance(result, dict):
        own = [result] if {"name", "ok", "detail"} <= result.keys() else []
        return own + [c for v in result.values() for c in _checks(v)]
    if isinstance(result, list):
        return [c for v in result for c in _checks(v)]
    return []


def test_a_table_whose_schema_the_target_lacks_is_refused_untouched(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    """As ``pg_restore --table``, a table goes back into its own schema and the schema is not
    created: without it the restore is refused before anything is written, naming the schema
    and the ways on (it failed inside pg_restore's pre-data with no hint)."""
    db, _ = live
    db.execute("DROP SCHEMA analytics CASCADE")
    before = dbcompare.fingerprint(db.dsn)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", 'analytics."feature usage"',
               "--target-dsn", db.dsn)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "schema analytics does not exist" in proc.stderr
    assert "--into-schema" in proc.stderr and "Traceback" not in proc.stderr
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))


def test_a_dropped_table_whose_rows_fail_to_load_is_not_left_behind(cli: Any, local_repo: str,
                                                                   live: tuple[Any, dict[str, Any]]) -> None:
    """The table's data object is damaged: the restore fails, and the table it created for
    those rows is gone with them (created and loaded in one transaction): the database is as
    it was before the command."""
    db, entry = live
    db.execute("DROP TABLE public.crm_projects")
    before = dbcompare.fingerprint(db.dsn)
    key, _ = damage_table_object(cli, local_repo, entry["id"], "public.crm_projects")
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.crm_projects", "--target-dsn", db.dsn)
    assert proc.returncode != 0 and key in proc.stderr
    assert db.scalar("SELECT to_regclass('public.crm_projects')") is None
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))


def test_a_parallel_restore_that_fails_leaves_the_database_as_it_found_it(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    """Three absent tables loaded by three sessions, one of whose objects is damaged: in
    place, into a new schema and into an existing empty one, the restore fails and takes back
    every table, sequence, index and schema it created, and only those (the whole database
    dumps as before). Then, the objects
    whole again, the created tables' foreign key cannot be built (its referenced rows are
    gone live): the created tables go, and the existing table it filled is empty again, or
    with --replace holds its own rows again."""
    db, entry = live
    db.execute("DROP TABLE public.crm_projects, public.email_logs, analytics.\"feature usage\"")
    db.execute("CREATE SCHEMA inspection")
    tables = 'public.crm_projects,public.email_logs,analytics."feature usage"'
    before = dbcompare.fingerprint(db.dsn)
    key, whole = damage_table_object(cli, local_repo, entry["id"], "public.crm_projects")
    for extra in ([], ["--into-schema", "recovered"], ["--into-schema", "inspection"]):
        proc = cli("restore", "tables", "--repo", local_repo, "--tables", tables, "--target-dsn", db.dsn,
                   "--jobs", "3", *extra)
        assert proc.returncode != 0 and key in proc.stderr, proc.stderr
        dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))

    write_object(local_repo, key, whole)
    db.execute("DELETE FROM public.crm_clients")
    db.execute("DELETE FROM public.n8n_chat_histories")
    before = dbcompare.fingerprint(db.dsn)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", tables + ",public.n8n_chat_histories",
               "--target-dsn", db.dsn, "--jobs", "3")
    assert proc.returncode == 1 and "crm_projects_client_id_fkey" in proc.stderr, proc.stderr
    assert "nothing was kept" in proc.stderr and proc.stderr.count("\n") == 1
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))

    db.execute("INSERT INTO public.n8n_chat_histories (session_id, message) VALUES ('live', '{}')")
    before = dbcompare.fingerprint(db.dsn)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", tables + ",public.n8n_chat_histories",
               "--target-dsn", db.dsn, "--jobs", "3", "--replace")
    assert proc.returncode == 1 and "crm_projects_client_id_fkey" in proc.stderr, proc.stderr
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))


def test_roles_created_by_a_failed_restore_are_dropped_again(cli: Any, local_repo: str,
                                                            live: tuple[Any, dict[str, Any]]) -> None:
    """--with-roles creates the role that owns a dropped table; the table's object is
    damaged, so the restore fails: the role goes with the table. With the object whole the
    same command keeps both (the role is really the run's)."""
    db, _ = live
    role = f"tb_owner_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role} NOLOGIN")
    db.execute("CREATE TABLE public.owned_notes (id int PRIMARY KEY, note text)")
    db.execute("INSERT INTO public.owned_notes SELECT g, repeat('n', g % 50) FROM generate_series(1, 500) g")
    db.execute(f"ALTER TABLE public.owned_notes OWNER TO {role}")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute("DROP TABLE public.owned_notes")
    db.execute(f"DROP ROLE {role}")
    before = dbcompare.fingerprint(db.dsn)
    key, whole = damage_table_object(cli, local_repo, entry["id"], "public.owned_notes")
    command = ("restore", "tables", "--repo", local_repo, "--backup", entry["id"], "--tables", "public.owned_notes",
               "--target-dsn", db.dsn, "--with-roles")
    proc = cli(*command)
    assert proc.returncode != 0 and key in proc.stderr, proc.stderr
    assert db.scalar(f"SELECT count(*) FROM pg_roles WHERE rolname = '{role}'") == 0
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))

    write_object(local_repo, key, whole)
    assert cli.json(*command)["ok"] is True
    assert db.scalar("SELECT tableowner FROM pg_tables WHERE tablename = 'owned_notes'") == role
    db.execute("DROP TABLE public.owned_notes")
    db.execute(f"DROP ROLE {role}")


def test_into_schema_leaves_live_data_alone(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]],
                                           seed_db: Any) -> None:
    db, _ = live
    expected = hashes(seed_db)
    db.execute("UPDATE public.user_profiles SET full_name = 'oops' WHERE true")
    before = dbcompare.fingerprint(db.dsn)
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.user_profiles,public.projects",
                      "--into-schema", "recovered", "--target-dsn", db.dsn)
    assert result["ok"] is True and result["into_schema"] == "recovered"
    after = hashes(db)
    assert after['recovered.user_profiles'] == expected["public.user_profiles"]
    assert after['recovered.projects'] == expected["public.projects"]
    live_after = dbcompare.fingerprint(db.dsn)
    for key, value in before["tables"].items():
        assert live_after["tables"][key] == value, key
    indexes = db.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = 'recovered'")
    assert indexes[0][0] >= 4


def test_replace_restores_one_table_and_touches_nothing_else(cli: Any, local_repo: str,
                                                             live: tuple[Any, dict[str, Any]], seed_db: Any) -> None:
    db, _ = live
    expected = hashes(seed_db)
    db.execute("UPDATE public.user_profiles SET full_name = 'vandalised', credits = credits + 1 WHERE true")
    before = hashes(db)
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.user_profiles",
                      "--replace", "--target-dsn", db.dsn)
    assert result["ok"] is True and result["mode"] == "replace"
    after = hashes(db)
    assert after["public.user_profiles"] == expected["public.user_profiles"]
    assert_only_changed(before, after, {"public.user_profiles"})


def test_replace_that_would_orphan_rows_rolls_back(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    db, _ = live
    db.execute("INSERT INTO public.user_profiles (id, email) VALUES ('11111111-2222-3333-4444-555555555555', 'new@x')")
    db.execute("INSERT INTO public.projects (user_id, name) VALUES ('11111111-2222-3333-4444-555555555555', 'p')")
    before = dbcompare.fingerprint(db.dsn)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.user_profiles", "--replace",
               "--target-dsn", db.dsn)
    assert proc.returncode == 1
    assert "rolled back" in proc.stderr and "projects" in proc.stderr
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))


def test_partitioned_parent_brings_its_partitions(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]],
                                                 seed_db: Any) -> None:
    db, _ = live
    expected = hashes(seed_db)
    db.execute("DELETE FROM public.observability_logs")
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "observability_logs",
                      "--target-dsn", db.dsn)
    assert result["ok"] is True
    parts = [t for t in result["tables"] if t.startswith("public.observability_logs_")]
    assert len(parts) == 4
    after = hashes(db)
    for name in parts:
        assert after[name] == expected[name]


def test_a_dropped_partitioned_table_comes_back_whole_from_one_session(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]], seed_db: Any) -> None:
    """With ``--jobs 1`` the parent and its partitions are created and loaded in one
    transaction: the tree comes back as it was, rows, indexes and all (the schema dump the
    same up to the order of each table's GRANT lines, which recreating a table changes)."""
    db, _ = live
    db.execute("DROP TABLE public.observability_logs")
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "observability_logs", "--jobs", "1",
                      "--target-dsn", db.dsn)
    assert result["ok"] is True and len(result["tables"]) == 5
    expected, restored = dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(db.dsn)
    dbcompare.assert_same(expected, restored, ignore=("schema",))
    assert sorted(str(expected["schema"]).splitlines()) == sorted(str(restored["schema"]).splitlines())


def test_unknown_table_is_a_clear_error(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    db, _ = live
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.user_profile", "--target-dsn", db.dsn)
    assert proc.returncode == 1
    assert "public.user_profiles" in proc.stderr and "Traceback" not in proc.stderr


LOG_PARTS = ("public.observability_logs_2025_01", "public.observability_logs_2025_02",
             "public.observability_logs_2025_03", "public.observability_logs_default")


def partition_tree(db: Any, schema_name: str, table: str) -> list[tuple[str, str, str | None]]:
    """(partition, relkind, bound) of the tree under schema.table, the parent first."""
    rows = db.execute(
        "SELECT c.relname, c.relkind::text, pg_get_expr(c.relpartbound, c.oid)"
        " FROM pg_partition_tree(format('%%I.%%I', %s::text, %s::text)::regclass) t"
        " JOIN pg_class c ON c.oid = t.relid ORDER BY t.level, c.relname", (schema_name, table))
    return [(r[0], r[1], r[2]) for r in rows]


def test_replace_partitioned_table_replaces_every_partition(cli: Any, local_repo: str,
                                                            live: tuple[Any, dict[str, Any]], seed_db: Any) -> None:
    db, _ = live
    expected = hashes(seed_db)
    db.execute("UPDATE public.observability_logs SET message = 'vandalised' WHERE level = 'error'")
    db.execute("DELETE FROM public.observability_logs_2025_02 WHERE ctid = (SELECT min(ctid) FROM public.observability_logs_2025_02)")
    db.execute("INSERT INTO public.observability_logs (level, message, created_at) VALUES ('info', 'new', '2031-01-01')")
    before = dbcompare.fingerprint(db.dsn)
    assert any(before["tables"][p] != expected[p] for p in LOG_PARTS)
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.observability_logs",
                      "--replace", "--target-dsn", db.dsn)
    assert result["ok"] is True and result["mode"] == "replace"
    after = dbcompare.fingerprint(db.dsn)
    for part in LOG_PARTS:
        assert after["tables"][part] == expected[part], part
    assert_only_changed(before["tables"], after["tables"], set(LOG_PARTS))
    dbcompare.assert_same(before, after, ignore=("tables",))


def test_replace_partitioned_table_that_would_orphan_rows_rolls_back_every_partition(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    db, _ = live
    db.execute("UPDATE public.observability_logs SET message = 'vandalised' WHERE level = 'error'")
    db.execute("INSERT INTO public.observability_logs (id, level, message, created_at)"
               " VALUES ('aaaaaaaa-0000-0000-0000-000000000001', 'info', 'kept', '2031-01-01')")
    db.execute("CREATE TABLE public.log_notes (log_id uuid, created_at timestamptz, note text,"
               " FOREIGN KEY (log_id, created_at) REFERENCES public.observability_logs (id, created_at))")
    db.execute("INSERT INTO public.log_notes VALUES ('aaaaaaaa-0000-0000-0000-000000000001', '2031-01-01', 'n')")
    before = dbcompare.fingerprint(db.dsn)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.observability_logs", "--replace",
               "--target-dsn", db.dsn)
    assert proc.returncode == 1, proc.stderr
    line = clioutput.one_line(proc)
    assert "rolled back" in line and "log_notes" in line, line
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))


def test_into_schema_recreates_the_partition_tree(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]],
                                                  seed_db: Any) -> None:
    db, _ = live
    expected = hashes(seed_db)
    db.execute("DELETE FROM public.observability_logs WHERE level = 'error'")
    before = dbcompare.fingerprint(db.dsn)
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.observability_logs",
                      "--into-schema", "recovered", "--target-dsn", db.dsn)
    assert result["ok"] is True
    live_tree = partition_tree(db, "public", "observability_logs")
    assert partition_tree(db, "recovered", "observability_logs") == live_tree and len(live_tree) == 5
    assert live_tree[0][1] == "p"
    after = dbcompare.fingerprint(db.dsn)
    for part in LOG_PARTS:
        assert after["tables"][part.replace("public.", "recovered.")] == expected[part], part
    for key, value in before["tables"].items():
        assert after["tables"][key] == value, key
    copied_indexes = {k for k in after["indexes"] if k.startswith("recovered.")}
    assert len(copied_indexes) == len({k for k in before["indexes"] if k.startswith("public.observability_logs")})
    db.execute("INSERT INTO recovered.observability_logs (level, message, created_at) VALUES ('info', 'x', '2025-02-03')")
    assert db.execute("SELECT count(*) FROM recovered.observability_logs_2025_02 WHERE message = 'x'")[0][0] == 1
    assert dbcompare.schema_dump(db.dsn) == after["schema"], "inserting into the copy changes no definition"


def column_sequences(db: Any, schema_name: str, table: str) -> dict[str, tuple[str, str, bool]]:
    """{column: (sequence schema, sequence name, owned by that column)} for every column whose
    default calls nextval() or that is an identity column."""
    rows = db.execute("""
        WITH t AS (SELECT format('%%I.%%I', %s::text, %s::text)::regclass AS oid),
        used AS (
            SELECT ad.adnum AS attnum, d.refobjid AS seq
              FROM pg_attrdef ad JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
              JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
             WHERE ad.adrelid = (SELECT oid FROM t)
            UNION
            SELECT d.refobjsubid, d.objid FROM pg_depend d
             WHERE d.classid = 'pg_class'::regclass AND d.refobjid = (SELECT oid FROM t) AND d.deptype = 'i')
        SELECT a.attname, n.nspname, s.relname,
               EXISTS (SELECT 1 FROM pg_depend o WHERE o.classid = 'pg_class'::regclass AND o.objid = s.oid
                          AND o.refobjid = (SELECT oid FROM t) AND o.refobjsubid = a.attnum
                          AND o.deptype IN ('a', 'i'))
          FROM used JOIN pg_class s ON s.oid = used.seq JOIN pg_namespace n ON n.oid = s.relnamespace
          JOIN pg_attribute a ON a.attrelid = (SELECT oid FROM t) AND a.attnum = used.attnum""",
                      (schema_name, table))
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def sequence_value(db: Any, schema_name: str, name: str) -> tuple[int, bool]:
    row = db.execute(f'SELECT last_value, is_called FROM "{schema_name}"."{name}"')[0]
    return int(row[0]), bool(row[1])


def test_into_schema_copy_has_its_own_sequences(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]],
                                                seed_db: Any) -> None:
    db, _ = live
    copied = ("payments", "gamification_logs", "projects")
    before = dbcompare.fingerprint(db.dsn)
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables",
                      ",".join(f"public.{t}" for t in copied), "--into-schema", "recovered", "--target-dsn", db.dsn)
    assert result["ok"] is True
    assert {"name": "table_sequences", "ok": True}.items() <= next(
        c for c in result["validation"]["checks"] if c["name"] == "table_sequences").items()
    assert {"source": "public.invoice_number_seq", "copy": "recovered.invoice_number_seq",
            "column": "recovered.payments.invoice_number"} in result["sequence_copies"]
    for table in copied:
        original = column_sequences(seed_db, "public", table)
        copy = column_sequences(db, "recovered", table)
        assert original and set(copy) == set(original), table
        for column, (seq_schema, seq_name, owned) in copy.items():
            assert seq_schema == "recovered" and owned, (table, column, copy[column])
            source = original[column]
            assert sequence_value(db, seq_schema, seq_name) == sequence_value(seed_db, source[0], source[1]), column
    assert column_sequences(seed_db, "public", "payments")["invoice_number"][2] is False, "fixture: a shared sequence"
    live_sequences = {k: v for k, v in dbcompare.fingerprint(db.dsn)["sequences"].items()
                      if not k.startswith("recovered.")}
    assert live_sequences == before["sequences"]
    invoice_seq = sequence_value(seed_db, "public", "invoice_number_seq")
    row = db.execute("INSERT INTO recovered.payments (user_id, amount) VALUES (gen_random_uuid(), 1)"
                     " RETURNING invoice_number")[0]
    assert row[0] == invoice_seq[0] + (1 if invoice_seq[1] else 0), "the copy's sequence continues the backup's"
    db.execute("INSERT INTO recovered.gamification_logs (user_id, points) VALUES (gen_random_uuid(), 1)")
    db.execute("INSERT INTO recovered.projects (user_id, name) VALUES (gen_random_uuid(), 'copy')")
    after = dbcompare.fingerprint(db.dsn)
    assert {k: v for k, v in after["sequences"].items() if not k.startswith("recovered.")} == before["sequences"]
    dbcompare.assert_same(before, after, ignore=("tables", "schema", "sequences", "indexes", "constraints",
                                                 "rls", "policies", "triggers"))


def test_error_text_is_one_line() -> None:
    text = 'cannot truncate a table referenced in a foreign key constraint\nDETAIL:  Table "a" references "b".\n'
    assert one_line(text) == 'cannot truncate a table referenced in a foreign key constraint; DETAIL:  Table "a" references "b".'


def failures(report: Any) -> str:
    return " | ".join(f"{c.name}: {c.detail}" for c in report.failed)


def test_validation_after_restore_tables_fails_when_the_result_differs(
        local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    db, _ = live
    settings = resolve_settings(local_repo, db.dsn, None)
    names = ["public.payments", "public.observability_logs"]
    manifest = Catalog(open_storage(local_repo)).resolve_logical("latest")
    entries = resolve_tables(manifest, names)
    target = ConnInfo(db.dsn)

    copy = restore_tables(settings, db.dsn, names, into_schema="recovered", run_validation=False)
    assert copy.validation is None and copy.sequences
    assert {".".join(c.copy) for c in copy.sequences} >= {"recovered.invoice_number_seq"}
    location = {(t.schema, t.name): ("recovered", t.name) for t in entries}

    def check_copy() -> Any:
        return validate_tables(target, manifest, entries, location, 2, NullReporter(), copy.sequences)

    assert check_copy().ok, failures(check_copy())
    db.execute("UPDATE recovered.observability_logs_2025_01 SET message = message || '!'"
               " WHERE ctid = (SELECT min(ctid) FROM recovered.observability_logs_2025_01)")
    assert "observability_logs_2025_01" in failures(check_copy())
    db.execute("SELECT setval('recovered.invoice_number_seq', 5)")
    assert "recovered.invoice_number_seq at 5" in failures(check_copy())
    db.execute("ALTER TABLE recovered.payments ALTER COLUMN invoice_number SET DEFAULT nextval('public.invoice_number_seq')")
    assert "recovered.payments.invoice_number uses public.invoice_number_seq" in failures(check_copy())

    replaced = restore_tables(settings, db.dsn, names, replace=True, run_validation=False)
    assert replaced.validation is None
    in_place = {(t.schema, t.name): (t.schema, t.name) for t in entries}

    def check_in_place() -> Any:
        return validate_tables(target, manifest, entries, in_place, 2, NullReporter())

    assert check_in_place().ok, failures(check_in_place())
    db.execute("DELETE FROM public.observability_logs_default WHERE ctid = (SELECT min(ctid) FROM public.observability_logs_default)")
    assert "observability_logs_default" in failures(check_in_place())
    db.execute("SELECT setval(pg_get_serial_sequence('public.payments', 'id'), 1)")
    assert "payments_id_seq" in failures(check_in_place())


def test_validation_looks_only_at_the_restored_tables(local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    """validate_tables reads the restored tables' own sequences, indexes and foreign keys,
    never the whole database's: run by a role that cannot read an unrelated sequence it
    passes (it failed: every sequence's value was read), an invalid index, a sequence behind
    its column and an orphan row elsewhere leave the verdict alone, and the same damage on
    the restored tables fails it, naming each object."""
    db, _ = live
    names = ["public.payments", "public.crm_projects"]
    manifest = Catalog(open_storage(local_repo)).resolve_logical("latest")
    entries = resolve_tables(manifest, names)
    in_place = {(t.schema, t.name): (t.schema, t.name) for t in entries}
    role = f"validator_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role} BYPASSRLS")
    db.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    db.execute(f"GRANT SELECT ON public.payments, public.crm_projects, public.crm_clients, public.user_profiles,"
               f" public.payments_id_seq, public.invoice_number_seq TO {role}")
    try:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(f"SET ROLE {role}")

            def verdict() -> Any:
                return validate_tables(ConnInfo(db.dsn), manifest, entries, in_place, 2, NullReporter(), conn=conn)

            assert verdict().ok, failures(verdict())
            with psycopg.connect(db.dsn, autocommit=True) as admin:
                with pytest.raises(psycopg.errors.UniqueViolation):
                    admin.execute("CREATE UNIQUE INDEX CONCURRENTLY email_logs_status_bad ON public.email_logs (status)")
                admin.execute("SELECT setval('public.email_logs_id_seq', 1)")
                admin.execute("SET session_replication_role = replica")
                admin.execute("UPDATE public.email_logs SET template_id = 999999 WHERE ctid = (SELECT min(ctid) FROM public.email_logs)")
                assert verdict().ok, failures(verdict())

                with pytest.raises(psycopg.errors.UniqueViolation):
                    admin.execute("CREATE UNIQUE INDEX CONCURRENTLY payments_currency_bad ON public.payments (currency)")
                assert "indexes_valid: invalid: public.payments_currency_bad" in failures(verdict())
                admin.execute("SELECT setval(pg_get_serial_sequence('public.payments', 'id'), 1)")
                assert "public.payments_id_seq at 1" in failures(verdict())
                admin.execute("DELETE FROM public.crm_clients WHERE id = (SELECT client_id FROM public.crm_projects LIMIT 1)")
                failed = failures(verdict())
                assert "foreign_keys_hold" in failed and "crm_projects_client_id_fkey" in failed, failed
                assert {c.name for c in verdict().failed} == {"indexes_valid", "table_sequences", "foreign_keys_hold"}
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


@pytest.fixture
def latin1_db(pg_server: Any) -> Iterator[DbHandle]:
    """A new database in LATIN1 on the shared server, dropped afterwards."""
    name = f"latin_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        yield DbHandle(pg_server, name)
    finally:
        pg_server.drop_db(name)


def test_a_latin1_database_gets_its_table_back_byte_for_byte(cli: Any, local_repo: str, latin1_db: DbHandle) -> None:
    """The target session opened while the repository is read has UTF8 as its client
    encoding; a backup in another encoding is loaded through a session in its own."""
    db = latin1_db
    db.execute("CREATE TABLE public.words (id int PRIMARY KEY, w text NOT NULL)")
    db.execute("INSERT INTO public.words VALUES (1, 'café'), (2, 'Straße'), (3, 'naïve ½ ÿ'), (4, 'plain')")
    stored = "SELECT id, convert_to(w, 'LATIN1') FROM public.words ORDER BY id"
    expected = db.execute(stored)
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute("DROP TABLE public.words")
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.words", "--target-dsn", db.dsn)
    assert result["ok"] is True and result["rows"] == 4
    assert db.execute(stored) == expected and expected[1][1] == "Straße".encode("latin-1")


def test_a_latin1_database_with_non_ascii_names_backs_up_and_restores(cli: Any, local_repo: str,
                                                                       latin1_db: DbHandle) -> None:
    """Names outside ASCII in a LATIN1 database (a table café, a column naïve, an index,
    a comment): the catalog reads that come back as JSON are decoded in the session's
    encoding (the backup failed: unexpected UnicodeDecodeError), and the table comes back."""
    db = latin1_db
    db.execute('CREATE TABLE public."café" (id int PRIMARY KEY, "naïve" text NOT NULL)')
    db.execute('CREATE INDEX "café_naïve" ON public."café" ("naïve")')
    db.execute('COMMENT ON COLUMN public."café"."naïve" IS \'à la carte\'')
    db.execute('INSERT INTO public."café" VALUES (1, \'crème brûlée\'), (2, \'ÿ ½\')')
    state = ("SELECT (SELECT array_agg(convert_to(attname, 'LATIN1') ORDER BY attnum) FROM pg_attribute"
             "         WHERE attrelid = 'public.\"café\"'::regclass AND attnum > 0),"
             " (SELECT array_agg(convert_to(indexrelid::regclass::text, 'LATIN1') ORDER BY 1) FROM pg_index"
             "   WHERE indrelid = 'public.\"café\"'::regclass),"
             " convert_to(col_description('public.\"café\"'::regclass, 2), 'LATIN1'),"
             " (SELECT array_agg(convert_to(\"naïve\", 'LATIN1') ORDER BY id) FROM public.\"café\")")
    expected = db.execute(state)
    assert expected[0][2] == "à la carte".encode("latin-1")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute('DROP TABLE public."café"')
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", 'public."café"', "--target-dsn", db.dsn)
    assert result["ok"] is True and result["rows"] == 2
    assert db.execute(state) == expected


def test_a_latin1_replace_whose_new_foreign_key_fails_gives_the_replaced_rows_back(
        cli: Any, local_repo: str, latin1_db: DbHandle) -> None:
    """In a LATIN1 database the definitions come as SQL run in the restore's session, as in
    UTF8 ones, so the replacement and the created table's foreign key share one transaction:
    the key cannot be built (its referenced rows are gone live), the restore fails and the
    replaced table holds its live rows again, the created table is gone. They came from a
    separate pg_restore before, whose failure left the replaced rows replaced."""
    db = latin1_db
    db.execute("CREATE TABLE public.clients (id int PRIMARY KEY, name text NOT NULL)")
    db.execute("CREATE TABLE public.orders (id int PRIMARY KEY, client_id int REFERENCES public.clients,"
               " note text)")
    db.execute("CREATE TABLE public.notes (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO public.clients VALUES (1, 'Müller'), (2, 'Þórr')")
    db.execute("INSERT INTO public.orders VALUES (10, 1, 'crème'), (11, 2, '½ kg')")
    db.execute("INSERT INTO public.notes VALUES (1, 'garçon')")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute("DROP TABLE public.orders")
    db.execute("DELETE FROM public.clients")
    db.execute("INSERT INTO public.notes VALUES (2, 'live: déjà vu')")
    before = dbcompare.fingerprint(db.dsn)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.orders,public.notes",
               "--replace", "--target-dsn", db.dsn)
    assert proc.returncode == 1 and "orders_client_id_fkey" in proc.stderr, proc.stderr
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))
    assert db.scalar("SELECT count(*) FROM public.notes WHERE body LIKE 'live:%'") == 1


def test_a_missing_repository_is_reported_before_an_unreachable_target(cli: Any, tmp_path: Any) -> None:
    """The target is connected to while the repository is read, but its failure is reported
    where it always was: after the repository's."""
    proc = cli("restore", "tables", "--repo", str(tmp_path / "nowhere"), "--tables", "public.t",
               "--target-dsn", f"host=127.0.0.1 port={free_port()} dbname=x user=x connect_timeout=2")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "repository" in proc.stderr and "does not exist" in proc.stderr


def test_a_live_table_altered_since_the_backup_fails_with_a_hint_and_keeps_its_rows(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    db, _ = live
    db.execute("ALTER TABLE public.coupons DROP COLUMN " + db.scalar(
        "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = 'public.coupons'::regclass AND attnum > 0"
        " AND NOT attisdropped AND NOT attnotnull ORDER BY attnum DESC LIMIT 1"))
    before = hashes(db)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.coupons", "--replace",
               "--target-dsn", db.dsn)
    assert proc.returncode == 1 and "loading public.coupons failed: column" in proc.stderr
    assert "restore it with --into-schema NAME" in proc.stderr and "Traceback" not in proc.stderr
    assert hashes(db) == before


def test_a_replace_blocked_by_another_session_says_who_holds_the_table_and_then_finishes(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]], seed_db: Any) -> None:
    """It stood silent for as long as the other transaction lasted."""
    db, _ = live
    expected = hashes(seed_db)["public.crm_projects"]
    db.execute("UPDATE public.crm_projects SET name = name || ' (edited)'")
    with holding(db.dsn, "SELECT count(*) FROM public.crm_projects", "nightly-report", 3):
        proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.crm_projects", "--replace",
                   "--target-dsn", db.dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    waits = [line for line in proc.stderr.splitlines() if "waiting for a lock" in line]
    assert len(waits) == 1 and "public.crm_projects is held by pid" in waits[0] and "nightly-report" in waits[0]
    assert "idle in transaction" in waits[0]
    assert hashes(db)["public.crm_projects"] == expected


def test_replace_moves_cycle_and_descending_sequences_only_where_no_row_is_handed_out_again(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """--replace moves owned sequences forward past the data. A CYCLE identity that had wrapped
    was moved to its column's maximum, so the next insert wrapped again onto a restored row's
    id; a descending one was moved up to its column's maximum, below which it hands out
    values the rows hold. Both now keep where they were, and the next insert succeeds."""
    db = fresh_db("seqreplace")
    with db.connect() as conn:
        conn.execute("""
            CREATE TABLE lap (id int GENERATED ALWAYS AS IDENTITY (MAXVALUE 20 CYCLE) PRIMARY KEY, v text);
            INSERT INTO lap (v) SELECT 'x' FROM generate_series(1, 18);
            DELETE FROM lap WHERE id <= 5;
            INSERT INTO lap (v) SELECT 'wrapped' FROM generate_series(1, 5);
            CREATE TABLE down (id int GENERATED BY DEFAULT AS IDENTITY (INCREMENT -1 START -1 MAXVALUE -1)
                               PRIMARY KEY, v text);
            INSERT INTO down (v) SELECT 'y' FROM generate_series(1, 10);
        """)
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    with db.connect() as conn:
        conn.execute("DELETE FROM lap WHERE id > 10; DELETE FROM down WHERE id < -5")
    result = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.lap,public.down",
                      "--target-dsn", db.dsn, "--replace")
    assert result["ok"] is True
    assert sequence_value(db, "public", "lap_id_seq") == (3, True)
    assert sequence_value(db, "public", "down_id_seq") == (-10, True)
    with db.connect() as conn:
        assert conn.execute("INSERT INTO lap (v) VALUES ('next') RETURNING id").fetchone() == (4,)
        assert conn.execute("INSERT INTO down (v) VALUES ('next') RETURNING id").fetchone() == (-11,)


def test_a_replace_that_needs_more_locks_than_the_server_holds_is_refused_saying_what_fits(
        pg_cluster_factory: Callable[..., Any], cli: Any, local_repo: str) -> None:
    """``--replace`` holds every table it restores, with its TOAST table and indexes, until it
    commits. A tree of 150 partitions with two indexes each (about 750 locks) on a server whose
    lock table holds about 400 (10 for each of 20 connections and the other server processes)
    backs up (two locks a table); the replace ended with PostgreSQL's bare "out of shared memory". It is refused, the
    tree as it was, naming the locks needed, the table's size and a setting that fits, which
    then does (autovacuum off: its workers take slots at random)."""
    server = pg_cluster_factory(max_locks_per_transaction="10", max_connections="20", autovacuum="off")
    db = server.create_db("parts")
    db.execute("CREATE TABLE public.p (k int, v text, PRIMARY KEY (k, v)) PARTITION BY LIST (k);"
               "CREATE INDEX ON public.p (v)")
    for start in range(0, 150, 25):
        db.execute("".join(f"CREATE TABLE public.p_{i} PARTITION OF public.p FOR VALUES IN ({i});"
                           for i in range(start, start + 25)))
    for start in range(0, 150, 50):
        db.execute(f"INSERT INTO public.p SELECT {start} + g % 50, repeat('v', g % 5000) || g "
                   "FROM generate_series(1, 500) g")
    made = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute("DELETE FROM public.p WHERE k < 5")
    before, definitions = dbcompare.table_hashes(db.dsn), dbcompare.schema_dump(db.dsn)

    refused = cli("restore", "tables", "--repo", local_repo, "--target-dsn", db.dsn, "--tables", "public.p",
                  "--replace")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    line = clioutput.only_line(refused)
    assert "restoring 151 tables in one transaction needs about" in line
    held = re.search(r"lock table holds: (\d+) \(max_locks_per_transaction 10 for each of (\d+) server", line)
    assert held and int(held[1]) == 10 * int(held[2]) and int(held[2]) >= 20 + 3 + 1, line
    assert "nothing was changed" in line and "--into-schema NAME" in line
    assert dbcompare.table_hashes(db.dsn) == before and dbcompare.schema_dump(db.dsn) == definitions

    setting = line.split("set max_locks_per_transaction = ")[1].split()[0]
    server.set_config(restart=True, max_locks_per_transaction=setting)
    report = cli.json("restore", "tables", "--repo", local_repo, "--target-dsn", db.dsn, "--tables", "public.p",
                      "--replace", "--backup", made["id"])
    assert report["validation"]["ok"] is True
    assert db.scalar("SELECT count(*) FROM public.p") == 1500


def test_tables_loaded_by_several_sessions_reuse_them(cli: Any, local_repo: str,
                                                      fresh_db: Callable[..., Any]) -> None:
    """With ``--jobs``, each table was loaded and checksummed on a session opened for it alone:
    a server backend (and an authentication) per table, a third of the time of a tree of
    1,500 partitions restored ``--into-schema``. The loading sessions are now reused, so the
    target sees a few sessions, whatever the number of tables."""
    partitions = 40
    db = fresh_db("tree")
    db.execute("CREATE TABLE public.ev (id bigint, day int, note text, PRIMARY KEY (id, day)) PARTITION BY LIST (day);"
               + ";".join(f"CREATE TABLE public.ev_{d} PARTITION OF public.ev FOR VALUES IN ({d})"
                          for d in range(partitions))
               + f";INSERT INTO public.ev SELECT g, g % {partitions}, md5(g::text) FROM generate_series(1, 4000) g")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    before = db.scalar("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
    report = cli.json("restore", "tables", "--repo", local_repo, "--target-dsn", db.dsn, "--tables", "public.ev",
                      "--into-schema", "inspect", "--jobs", "2")
    assert report["validation"]["ok"] is True and len(report["tables"]) == partitions + 1
    hashes = dbcompare.table_hashes(db.dsn)
    assert {k.split(".")[1]: v for k, v in hashes.items() if k.startswith("public.ev")} == \
        {k.split(".")[1]: v for k, v in hashes.items() if k.startswith("inspect.")}
    db.wait_alone()  # the restore's sessions write their last counts as they exit
    sessions = db.scalar("SELECT sessions FROM pg_stat_database WHERE datname = current_database()") - before
    assert sessions < partitions // 2, sessions


def test_indexes_that_cannot_be_built_for_a_cause_other_than_a_foreign_key_say_what_is_in_the_way(
        cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    """A dropped table comes back while another table of its schema has taken its primary
    key's index name (index names are unique in a schema): building its key fails. The restore
    keeps nothing, and its hint speaks of what is in the way, not of a foreign key pointing at
    rows missing live (which it said for every failure of the tables' indexes and keys)."""
    db, _ = live
    db.execute("DROP TABLE public.crm_projects CASCADE")
    db.execute("CREATE TABLE public.squatter (id int)")
    db.execute("CREATE INDEX crm_projects_pkey ON public.squatter (id)")
    before = dbcompare.fingerprint(db.dsn)
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.crm_projects", "--target-dsn", db.dsn)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "crm_projects_pkey" in lines[0] and "already exists" in lines[0], lines[0]
    assert "foreign key" not in lines[0] and "in the way" in lines[0], lines[0]
    assert db.scalar("SELECT to_regclass('public.crm_projects')") is None
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))
