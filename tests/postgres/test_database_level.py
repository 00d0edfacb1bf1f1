"""Database-level properties round-trip: a template database (``IS_TEMPLATE``, which
``pg_dump --create`` carries) restores as a template, validation names the flag when it
differs, and the databases the tool drops (a restore-test's scratch copy) may be templates."""

from __future__ import annotations

import json
import subprocess
import uuid
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any, Iterator

import pytest

from backup_tool.postgres.connection import ConnInfo, find_tool

pytestmark = pytest.mark.slow


def _drop(pg_server: Any, name: str) -> None:
    with pg_server.admin_conn() as conn:
        conn.execute(f"UPDATE pg_database SET datistemplate = false WHERE datname = '{name}'")
    pg_server.drop_db(name)


def drop_all(pg_server: Any, databases: list[str], roles: list[str] | None = None) -> None:
    """Drop the ``databases`` (those that exist), then the ``roles``."""
    for name in databases:
        pg_server.drop_db(name)
    with pg_server.admin_conn() as conn:
        for role in roles or []:
            conn.execute(f"DROP ROLE IF EXISTS {role}")


@contextmanager
def database_pair(pg_server: Any, prefix: str, *settings: str) -> Iterator[tuple[str, str]]:
    """A new database named ``<prefix>_…`` with ``settings`` (each ``ALTER DATABASE … SET``
    one), and the name its copy is to be restored as; both dropped when the block ends."""
    source, copy = f"{prefix}_{uuid.uuid4().hex[:8]}", f"{prefix}_copy_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
        for setting in settings:
            conn.execute(f"ALTER DATABASE {source} SET {setting}")
    try:
        yield source, copy
    finally:
        drop_all(pg_server, [copy, source])


def back_up_and_restore(cli: Any, repo: str, pg_server: Any, source: str, copy: str) -> dict[str, Any]:
    """``backup full`` of ``source``, then ``restore full --create`` of it as ``copy`` (which
    must succeed); the backup's entry."""
    backup: dict[str, Any] = cli.json("backup", "full", "--repo", repo, "--dsn", pg_server.dsn(source))
    restored = cli.json("restore", "full", "--repo", repo, "--backup", backup["id"],
                        "--target-dsn", pg_server.dsn(copy), "--create")
    assert restored["ok"] is True
    return backup


def test_template_database_restores_as_a_template(cli: Any, local_repo: str, pg_server: Any) -> None:
    source, copy = f"tmpl_{uuid.uuid4().hex[:8]}", f"tmpl_copy_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE base_rows (id int PRIMARY KEY); INSERT INTO base_rows VALUES (1), (2)")
            conn.execute(f"ALTER DATABASE {source} IS_TEMPLATE true")
        backup = back_up_and_restore(cli, local_repo, pg_server, source, copy)
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT datistemplate FROM pg_database WHERE datname = %s",
                                (copy,)).fetchone() == (True,)
            conn.execute(f"ALTER DATABASE {copy} IS_TEMPLATE false")
        proc = cli("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"],
                   "--json")
        failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
        assert proc.returncode == 3 and failed == {"database_properties": "is template False, backup True"}

        drill = cli("verify", backup["id"], "--restore-test", "--repo", local_repo, "--dsn", pg_server.dsn(source),
                    "--json")
        assert drill.returncode == 0, drill.stdout
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'backup_tool_verify_%'"
                                ).fetchone()[0] == 0
    finally:
        _drop(pg_server, source)
        _drop(pg_server, copy)


@pytest.mark.parametrize(("stored", "items"), [
    ('"$user", public', ["$user", "public"]),
    ('"app, public"', ["app, public"]),
    ('app,  "we""ird" , x', ["app", 'we"ird', "x"]),
    ("", []),
    ('"unclosed', None),
    ("a b", None),
])
def test_list_settings_split_as_the_server_quotes_them(stored: str, items: list[str] | None) -> None:
    from backup_tool.postgres.database_level import split_guc_list

    assert split_guc_list(stored) == items


def test_list_settings_with_quoted_commas_restore_unchanged(cli: Any, local_repo: str, pg_server: Any) -> None:
    """A database's and a role-in-database's ``search_path`` naming one schema whose name holds
    a comma came back as two schemas (found on a trial database); validation named it."""
    source, copy = f"lists_{uuid.uuid4().hex[:8]}", f"lists_copy_{uuid.uuid4().hex[:8]}"
    role = f"lists_role_{uuid.uuid4().hex[:6]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
        conn.execute(f"CREATE ROLE {role}")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
            conn.execute(f"ALTER DATABASE {source} SET search_path = 'app, public', \"$user\", 'we\"ird'")
            conn.execute(f"ALTER ROLE {role} IN DATABASE {source} SET search_path = 'app, public'")
        settings_sql = ("SELECT coalesce(r.rolname, ''), s.setconfig FROM pg_db_role_setting s "
                        "JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole "
                        "WHERE d.datname = %s ORDER BY 1")
        with pg_server.admin_conn() as conn:
            before = conn.execute(settings_sql, (source,)).fetchall()
        assert before == [("", ['search_path="app, public", "$user", "we""ird"']),
                          (role, ['search_path="app, public"'])]
        back_up_and_restore(cli, local_repo, pg_server, source, copy)
        with pg_server.admin_conn() as conn:
            assert conn.execute(settings_sql, (copy,)).fetchall() == before
    finally:
        drop_all(pg_server, [copy, source], [role])


APPLICATION_LIMITS = {
    "statement_timeout": "5ms", "lock_timeout": "1ms", "idle_in_transaction_session_timeout": "100ms",
    "idle_session_timeout": "300ms", "default_transaction_read_only": "on",
}


def test_timeouts_a_database_sets_for_its_applications_bind_none_of_the_tool_sessions(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """Production databases set timeouts for their applications. Before, a database-level
    ``statement_timeout`` killed the backup's COPY and ``idle_in_transaction_session_timeout``
    the snapshot its sessions share; restored last, they and ``default_transaction_read_only``
    then stopped validation and ``restore tables`` in the restored database."""
    with database_pair(pg_server, "limits") as (source, copy):
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.events AS SELECT g AS id, md5(g::text) AS body"
                         " FROM generate_series(1, 300000) g; ALTER TABLE public.events ADD PRIMARY KEY (id)")
            for name, value in APPLICATION_LIMITS.items():
                conn.execute(f"ALTER DATABASE {source} SET {name} = '{value}'")
        backup = back_up_and_restore(cli, local_repo, pg_server, source, copy)
        with pg_server.admin_conn() as conn:
            settings = conn.execute("SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d"
                                    " ON d.oid = s.setdatabase WHERE d.datname = %s", (copy,)).fetchone()
        assert settings is not None and sorted(settings[0]) == sorted(f"{k}={v}" for k, v in APPLICATION_LIMITS.items())
        replaced = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.events", "--replace",
                            "--target-dsn", pg_server.dsn(copy))
        assert replaced["ok"] is True and replaced["rows"] == 300000
        again = cli.json("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"])
        assert again["ok"] is True


def test_a_dsn_with_its_own_options_keeps_the_session_settings_of_the_copy_processes(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """An ``options`` in the DSN went into the connection string of the psql that copies a large
    table out, where libpq lets it replace PGOPTIONS and with it every pinned setting: under a
    database's ``DateStyle = 'SQL, DMY'`` the rows were stored as 13/03/2020 and the restore
    failed loading them (dates up to the 12th would have come back with day and month swapped)."""
    with database_pair(pg_server, "dmy", "DateStyle = 'SQL, DMY'") as (source, copy):
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.days AS SELECT g AS id, date '2020-01-02' + g AS day,"
                         " timestamp '2020-03-04 05:06:07' + g * interval '1 hour' AS at, md5(g::text) AS pad"
                         " FROM generate_series(1, 40000) g")
        with_options = pg_server.dsn(source) + "?options=-c%20work_mem%3D8MB"
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", with_options)
        restored = cli.json("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                            "--target-dsn", pg_server.dsn(copy), "--create")
        assert restored["ok"] is True
        with pg_server.admin_conn(copy) as conn:
            assert conn.execute("SELECT day, at FROM public.days WHERE id = 1").fetchone() == (
                date(2020, 1, 3), datetime(2020, 3, 4, 6, 6, 7))


NON_UTF8 = """
CREATE TABLE public.notes (id int PRIMARY KEY, body text DEFAULT E'd\\xe9faut' CHECK (body <> E'\\xff'), raw text);
INSERT INTO public.notes VALUES (1, E'caf\\xe9', E'\\xfe\\xfd'), (2, 'plain', NULL);
COMMENT ON TABLE public.notes IS E'comment \\xe9';
CREATE FUNCTION public.greet() RETURNS text LANGUAGE sql AS $$ SELECT E'h\\xe9llo' $$;
"""


@pytest.mark.parametrize("encoding", ["SQL_ASCII", "LATIN1"])
def test_a_database_whose_bytes_are_not_utf8_round_trips_and_its_changes_are_named(
        cli: Any, local_repo: str, pg_server: Any, encoding: str) -> None:
    """Every backup of a SQL_ASCII database failed (psycopg returns such a database's text
    as bytes), and one of a LATIN1 database whose schema held a non-ASCII byte (a comment, a
    default) failed reading the schema text. Both now round-trip byte for byte; a changed
    byte fails validation, and the verdict prints under a strict UTF-8 output."""
    source, copy = f"bytes_{uuid.uuid4().hex[:8]}", f"bytes_copy_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source} TEMPLATE template0 ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute(f"SET client_encoding = '{encoding}'")
            conn.execute(NON_UTF8)
        backup = back_up_and_restore(cli, local_repo, pg_server, source, copy)

        def dump(db: str) -> bytes:
            out = subprocess.run([str(pg_server.bin_dir / "pg_dump"), "--create", "-d", pg_server.dsn(db)],
                                 capture_output=True, check=True).stdout
            return b"\n".join(ln for ln in out.replace(copy.encode(), source.encode()).splitlines()
                              if not ln.startswith((b"\\restrict", b"\\unrestrict")))
        assert dump(copy) == dump(source) and b"comment \xe9" in dump(source)
        with pg_server.admin_conn(copy) as conn:
            conn.execute(f"SET client_encoding = '{encoding}'")
            conn.execute("COMMENT ON TABLE public.notes IS E'comment \\xe8'")
        proc = cli("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"],
                   "--json", env={"PYTHONIOENCODING": "utf-8:strict"})
        assert proc.returncode == 3, proc.stderr
        failed = {c["name"] for c in proc.json()["checks"] if not c["ok"]}
        assert failed == {"schema_matches", "comments"}
    finally:
        drop_all(pg_server, [copy, source])


def test_a_sql_ascii_database_naming_a_table_with_other_bytes_is_refused_clearly(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    name = f"named_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        with pg_server.admin_conn(name) as conn:
            conn.execute('CREATE TABLE public."café" (id int)'.encode())
        proc = cli("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(name))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert 'names tables or columns with non-ASCII bytes (public."café")' in proc.stderr
        assert "convert the database to UTF8" in proc.stderr
    finally:
        pg_server.drop_db(name)


BACULA_LIKE = """
CREATE TABLE public.path (pathid serial PRIMARY KEY, path text NOT NULL);
CREATE UNIQUE INDEX path_name_idx ON public.path (path text_pattern_ops);
CREATE TABLE public.file (fileid bigserial PRIMARY KEY, pathid int NOT NULL REFERENCES public.path, name text);
INSERT INTO public.path (path) VALUES (E'/home/u\\xe9ser/\\x80\\x81/'), ('/plain/');
INSERT INTO public.file (pathid, name) VALUES (1, E'fi\\xe8le\\xc3\\x28.txt'), (2, 'ascii.txt');
"""


def test_a_sql_ascii_backup_is_restored_only_into_a_sql_ascii_database(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """Bacula's catalog is a SQL_ASCII database keeping file names as bytes of no encoding.
    Restored into an existing UTF8 database, COPY under client_encoding SQL_ASCII checked none
    of them: `restore full` left text invalid in UTF8 there (and only then failed validation),
    and `restore tables` failed half-way (psycopg read the target's names as bytes) after
    creating and loading the table. Both are now refused before anything is written; into a
    SQL_ASCII database the tables restore byte for byte."""
    source, utf8 = f"bacula_{uuid.uuid4().hex[:8]}", f"bacula_u8_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source} TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'")
        conn.execute(f"CREATE DATABASE {utf8} TEMPLATE template0 ENCODING 'UTF8'")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute(BACULA_LIKE)
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))

        def user_relations() -> int:
            with pg_server.admin_conn(utf8) as conn:
                return int(conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                                        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
                                        " OR c.relname = 'path'").fetchone()[0])

        attempts = [("restore", "full"), ("restore", "tables", "--tables", "public.path,public.file"),
                    ("restore", "tables", "--tables", "public.path", "--into-schema", "beside")]
        for argv in attempts:
            proc = cli(*argv, "--repo", local_repo, "--backup", backup["id"], "--target-dsn", pg_server.dsn(utf8))
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, (argv, proc.stderr)
            line = proc.stderr.strip()
            assert len(line.splitlines()) == 1, (argv, proc.stderr)
            assert f"backup {backup['id']} is of a SQL_ASCII database" in line and "a UTF8 database" in line
            assert "restore into a SQL_ASCII database" in line
            assert user_relations() == 0, argv

        proc = cli("restore", "tables", "--repo", local_repo, "--backup", backup["id"], "--tables",
                   "public.path,public.file", "--into-schema", "beside", "--target-dsn", pg_server.dsn(source))
        assert proc.returncode == 0, proc.stderr
        with pg_server.admin_conn(source) as conn:
            conn.execute("SET client_encoding = 'SQL_ASCII'")
            for table in ("path", "file"):
                differ = conn.execute(f"SELECT count(*) FROM ((TABLE public.{table} EXCEPT ALL TABLE beside.{table})"
                                      f" UNION ALL (TABLE beside.{table} EXCEPT ALL TABLE public.{table})) d").fetchone()
                assert differ == (0,), table
            raw = conn.execute("SELECT convert_to(path, 'SQL_ASCII') FROM beside.path WHERE pathid = 1").fetchone()
            assert bytes(raw[0]) == b"/home/u\xe9ser/\x80\x81/"
    finally:
        drop_all(pg_server, [utf8, source])


@pytest.mark.parametrize("scope", ["database", "role in database"])
def test_a_role_a_database_sets_for_its_applications_is_not_who_the_tool_acts_as(
        cli: Any, local_repo: str, pg_server: Any, scope: str) -> None:
    """``ALTER DATABASE app SET role = 'web'`` (or the same for the role backing up, in that
    database) made every session of the tool, and its pg_dump, act as ``web``: a superuser's
    backup was refused for a table ``web`` may not read (found on a trial database), and
    ``restore tables`` into the restored copy would create tables as ``web``. The tool acts
    as the role its DSN names."""
    source, copy = f"setrole_{uuid.uuid4().hex[:8]}", f"setrole_copy_{uuid.uuid4().hex[:8]}"
    web = f"web_{uuid.uuid4().hex[:6]}"
    target = f"ALTER DATABASE {source}" if scope == "database" else f"ALTER ROLE postgres IN DATABASE {source}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
        conn.execute(f"CREATE ROLE {web}")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.visible (id int PRIMARY KEY); INSERT INTO public.visible VALUES (1);"
                         "CREATE TABLE public.secret (id int PRIMARY KEY, s text); INSERT INTO public.secret VALUES (1, 'x');"
                         f"GRANT SELECT ON public.visible TO {web}; {target} SET role = '{web}'")
        backup = back_up_and_restore(cli, local_repo, pg_server, source, copy)
        replaced = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.secret", "--replace",
                            "--target-dsn", pg_server.dsn(copy))
        assert replaced["ok"] is True and replaced["rows"] == 1
        with pg_server.admin_conn(copy) as conn:
            conn.execute("SET ROLE NONE")
            assert conn.execute("SELECT relowner::regrole::text FROM pg_class WHERE relname = 'secret'"
                                ).fetchone() == ("postgres",)
            conn.execute(f"{target.replace(source, copy)} SET role = 'postgres'")
        proc = cli("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"], "--json")
        failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
        role = "" if scope == "database" else " for role postgres"
        assert proc.returncode == 3 and failed == {"database_properties": f"missing setting role={web}{role}; "
                                                   f"unexpected setting role=postgres{role}"}
    finally:
        drop_all(pg_server, [copy, source], [web])


def test_settings_that_change_how_rows_are_read_do_not_change_the_rows_a_restore_loads(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """A database's ``array_nulls = off`` read every NULL element of an array as the string
    ``'NULL'``, and its ``xmloption = document`` refused xml content fragments, when
    ``restore tables`` loaded into it (the restored copy carries both): rows changed (which
    validation named) or the load failed."""
    with database_pair(pg_server, "reading") as (source, copy):
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, tags text[], body xml);"
                         "INSERT INTO public.docs VALUES (1, '{a,NULL,\"NULL\"}', 'text <b>bold</b> tail'),"
                         " (2, ARRAY[NULL]::text[], '<doc/>'), (3, NULL, NULL)")
            conn.execute(f"ALTER DATABASE {source} SET array_nulls = off; ALTER DATABASE {source} SET xmloption = document")
        back_up_and_restore(cli, local_repo, pg_server, source, copy)
        replaced = cli.json("restore", "tables", "--repo", local_repo, "--tables", "public.docs", "--replace",
                            "--target-dsn", pg_server.dsn(copy))
        assert replaced["ok"] is True and replaced["rows"] == 3
        with pg_server.admin_conn(copy) as conn:
            rows = conn.execute("SELECT id, tags, body::text FROM public.docs ORDER BY id").fetchall()
        assert rows == [(1, ["a", None, "NULL"], "text <b>bold</b> tail"), (2, [None], "<doc/>"), (3, None, None)]


SEARCHED = """
CREATE SCHEMA app;
CREATE FUNCTION app.norm(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT lower($1) $$;
CREATE FUNCTION app.keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TABLE app.parent (id int PRIMARY KEY);
CREATE TABLE app.child (id int PRIMARY KEY, p int REFERENCES app.parent (id), name text DEFAULT E'back\\\\slash');
CREATE INDEX child_norm ON app.child (app.norm(name)) WHERE app.norm(name) <> '';
CREATE TRIGGER keep BEFORE INSERT ON app.child FOR EACH ROW EXECUTE FUNCTION app.keep();
ALTER TABLE app.child ENABLE ROW LEVEL SECURITY;
CREATE POLICY named ON app.child USING (app.norm(name) = 'b');
INSERT INTO app.parent VALUES (1); INSERT INTO app.child VALUES (1, 1, 'B');
"""


def test_the_search_path_and_quoting_of_the_role_backing_up_do_not_change_what_validation_compares(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """A ``search_path`` set for the role backing up, on the source only, made the backup record
    definitions naming ``app``'s objects without their schema (``pg_get_indexdef`` qualifies
    only what the search_path does not find): validation of the restore, by another role,
    then failed ``rls_policies``, ``foreign_keys_match``, ``indexes_valid`` and
    ``triggers_present`` (found on a trial database); its ``quote_all_identifiers`` failed
    ``schema_matches`` and ``column_order``, and its ``standard_conforming_strings = off``
    ``schema_matches`` (pg_dump writes string constants for that syntax). A change after the
    restore is still named."""
    source, copy = f"searched_{uuid.uuid4().hex[:8]}", f"searched_copy_{uuid.uuid4().hex[:8]}"
    backer, password = f"backer_{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
        conn.execute(f"CREATE ROLE {backer} SUPERUSER LOGIN PASSWORD '{password}'")
        conn.execute(f"ALTER ROLE {backer} SET search_path = app, public")
        conn.execute(f"ALTER ROLE {backer} SET quote_all_identifiers = on")
        conn.execute(f"ALTER ROLE {backer} SET standard_conforming_strings = off")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute(SEARCHED)
        as_backer = f"postgresql://{backer}:{password}@{pg_server.host}:{pg_server.port}/{source}"
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", as_backer)
        restored = cli.json("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                            "--target-dsn", pg_server.dsn(copy), "--create")
        assert restored["ok"] is True, [c for c in restored["validation"]["checks"] if not c["ok"]]
        with pg_server.admin_conn(copy) as conn:
            conn.execute("DROP INDEX app.child_norm; CREATE INDEX child_norm ON app.child (app.norm(name))")
        proc = cli("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"], "--json")
        failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
        assert proc.returncode == 3 and set(failed) == {"schema_matches", "indexes_valid"}
        assert failed["indexes_valid"] == "indexes: changed app.child.child_norm"
    finally:
        drop_all(pg_server, [copy, source], [backer])


def _has_locale(pg_server: Any, name: str) -> bool:
    with pg_server.admin_conn() as conn:
        try:
            conn.execute(f"SET lc_monetary = '{name}'")
        except Exception:  # noqa: BLE001 - the server says the locale is not installed
            return False
    return True


def test_money_written_under_a_database_lc_monetary_restores_and_validates(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """A database's ``lc_monetary = 'de_DE.UTF-8'`` made the backup store money as ``1.234,56 €``
    (rows, and pg_dump's defaults and constraints), which the restore's sessions, under the
    target's own lc_monetary, refused: ``restore full`` failed loading the table (found on a
    trial database). Every session now reads and writes money under ``C``; the restored
    database keeps its setting, and a changed amount is named."""
    if not _has_locale(pg_server, "de_DE.UTF-8"):
        pytest.skip("locale de_DE.UTF-8 not installed (localedef -i de_DE -f UTF-8 de_DE.UTF-8)")
    with database_pair(pg_server, "money", "lc_monetary = 'de_DE.UTF-8'") as (source, copy):
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.prices (id int PRIMARY KEY, amount money DEFAULT 1234.5"
                         " CHECK (amount > 0.25::money));"
                         "INSERT INTO public.prices VALUES (1, 1234.56), (2, 1000000), (3, DEFAULT), (4, NULL)")
            assert conn.execute("SELECT amount::text FROM public.prices WHERE id = 1").fetchone() == ("1.234,56 €",)
        backup = back_up_and_restore(cli, local_repo, pg_server, source, copy)
        with pg_server.admin_conn(copy) as conn:
            assert conn.execute("SELECT id, amount::text FROM public.prices ORDER BY id").fetchall() == [
                (1, "1.234,56 €"), (2, "1.000.000,00 €"), (3, "1.234,50 €"), (4, None)]
            conn.execute("UPDATE public.prices SET amount = amount + 0.01::money WHERE id = 2")
        proc = cli("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"], "--json")
        failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
        assert proc.returncode == 3 and failed == {"content_checksums": "content differs: public.prices"}


def test_a_backup_that_recorded_no_pins_is_read_under_the_servers_settings_as_it_was_taken() -> None:
    """Backups taken before ``lc_monetary`` and ``quote_all_identifiers`` were pinned wrote money
    and the schema under the database's own: restoring and validating them leaves both to the
    database again, and an incremental on them does too (a chain keeps one text form)."""
    from backup_tool.postgres.connection import RECORDED_PINS, ConnInfo

    new = ConnInfo("host=h dbname=d").pinned_as(RECORDED_PINS)
    old = ConnInfo("host=h dbname=d").pinned_as(None)
    assert "-c lc_monetary=C" in new.tool_env()["PGOPTIONS"] and "-c quote_all_identifiers=off" in new.tool_env()["PGOPTIONS"]
    assert "lc_monetary" not in old.tool_env()["PGOPTIONS"] and "quote_all_identifiers" not in old.tool_env()["PGOPTIONS"]
    assert "-c role=none" in old.tool_env()["PGOPTIONS"]
    assert old.with_database("other").unpinned == old.unpinned == frozenset(RECORDED_PINS)


def test_a_database_preloading_a_library_the_target_lacks_is_refused_before_anything_is_created(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """A database's ``session_preload_libraries`` naming a library the target server lacks was
    applied last, after which every connection to the restored database failed: the restore
    ended with "cannot connect ... check --dsn" (found on a trial database). It is refused up
    front, naming the setting and the library, and the database it created is dropped."""
    source, copy = f"preload_{uuid.uuid4().hex[:8]}", f"preload_copy_{uuid.uuid4().hex[:8]}"
    library = pg_server.make_user_dir() / "only_on_the_source.so"
    library.write_bytes((pg_server.bin_dir.parent / "lib" / "auto_explain.so").read_bytes())
    library.parent.chmod(0o755)
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.t (id int PRIMARY KEY); INSERT INTO public.t VALUES (1)")
            conn.execute(f"ALTER DATABASE {source} SET session_preload_libraries = '{library.with_suffix('')}'")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        library.unlink()
        proc = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                   "--target-dsn", pg_server.dsn(copy), "--create")
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert (f"preload a library the target server cannot load: session_preload_libraries of the database "
                f"names '{library.with_suffix('')}' (could not access file") in proc.stderr
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (copy,)).fetchone() == (0,)
    finally:
        pg_server.drop_db(copy)
        with pg_server.admin_conn() as conn:
            conn.execute(f"ALTER DATABASE {source} RESET ALL")
        pg_server.drop_db(source)


@pytest.mark.parametrize(("settings", "loaded"), [
    ([["", "session_preload_libraries=auto_explain, \"/opt/x y\""]],
     [("the database", "session_preload_libraries", "auto_explain"),
      ("the database", "session_preload_libraries", "/opt/x y")]),
    ([["app", "local_preload_libraries=plug"]],
     [("the database for role app", "local_preload_libraries", "$libdir/plugins/plug")]),
    ([["", "work_mem=64kB"]], []),
])
def test_preloaded_libraries_are_named_as_the_server_loads_them(
        settings: list[list[str]], loaded: list[tuple[str, str, str]]) -> None:
    from backup_tool.postgres.database_level import preloaded_libraries

    assert preloaded_libraries({"settings": settings}) == loaded


def test_libraries_a_roles_own_settings_preload_are_read_from_the_roles_script() -> None:
    from backup_tool.postgres import roles

    backup = roles.parse_globals("CREATE ROLE app;\nALTER ROLE app WITH NOLOGIN;\n"
                                 "ALTER ROLE app SET session_preload_libraries TO 'auto_explain', '/opt/it''s';\n"
                                 "ALTER ROLE app SET local_preload_libraries TO 'plug';\n"
                                 "ALTER ROLE app SET work_mem TO '1MB';\n")
    assert roles.preloaded_libraries(backup.roles.values()) == [
        ("role app", "local_preload_libraries", "$libdir/plugins/plug"),
        ("role app", "session_preload_libraries", "auto_explain"),
        ("role app", "session_preload_libraries", "/opt/it's")]


def test_settings_longer_than_a_name_restore_whole_and_a_cut_one_is_named(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """Database settings were read as ``name`` (63 bytes): a Supabase-style ``app.jwt_secret``
    came back cut, a long ``search_path`` without its last schemas, and validation, reading
    both sides the same way, passed (found on a trial database)."""
    source, copy = f"long_{uuid.uuid4().hex[:8]}", f"long_copy_{uuid.uuid4().hex[:8]}"
    secret = "super-secret-jwt-token-with-at-least-32-characters-long-" + "x" * 40
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.t (id int PRIMARY KEY)")
            conn.execute(f"ALTER DATABASE {source} SET app.jwt_secret = '{secret}'")
            conn.execute(f"ALTER ROLE postgres IN DATABASE {source} SET search_path = "
                         "app_schema_one, app_schema_two, extensions, \"$user\", public")
        settings_sql = ("SELECT coalesce(r.rolname, ''), s.setconfig FROM pg_db_role_setting s "
                        "JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole "
                        "WHERE d.datname = %s ORDER BY 1")
        with pg_server.admin_conn() as conn:
            before = conn.execute(settings_sql, (source,)).fetchall()
        backup = back_up_and_restore(cli, local_repo, pg_server, source, copy)
        with pg_server.admin_conn() as conn:
            assert conn.execute(settings_sql, (copy,)).fetchall() == before
            conn.execute(f"ALTER DATABASE {copy} SET app.jwt_secret = '{secret[:50]}'")
        proc = cli("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"], "--json")
        failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
        assert proc.returncode == 3 and failed == {
            "database_properties": f"missing setting app.jwt_secret={secret}; unexpected setting app.jwt_secret={secret[:50]}"}
    finally:
        drop_all(pg_server, [copy, source])


def test_a_search_path_of_the_role_restoring_does_not_refuse_the_backups_extensions(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """The restore tries each backed-up extension in a rolled-back transaction first; under a
    search_path the restoring role sets (``app``, a schema the new database does not have
    yet) every extension was refused, "no schema has been selected to create in" (found on a
    trial database)."""
    source, copy = f"extpath_{uuid.uuid4().hex[:8]}", f"extpath_copy_{uuid.uuid4().hex[:8]}"
    restorer, password = f"restorer_{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
        conn.execute(f"CREATE ROLE {restorer} SUPERUSER LOGIN PASSWORD '{password}'")
        conn.execute(f"ALTER ROLE {restorer} SET search_path = app")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE SCHEMA app; CREATE EXTENSION pg_trgm WITH SCHEMA public;"
                         "CREATE TABLE app.words (id int PRIMARY KEY, w text); INSERT INTO app.words VALUES (1, 'abc');"
                         "CREATE INDEX words_trgm ON app.words USING gin (w public.gin_trgm_ops)")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        as_restorer = f"postgresql://{restorer}:{password}@{pg_server.host}:{pg_server.port}/{copy}"
        restored = cli.json("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                            "--target-dsn", as_restorer, "--create")
        assert restored["ok"] is True
    finally:
        drop_all(pg_server, [copy, source], [restorer])


def test_a_database_owner_restoring_gets_every_setting_it_may_set_and_is_told_which_it_may_not(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """A restore by the database's owner (not a superuser) of a database setting
    ``log_min_messages`` (superuser-only) dropped every property with it, ``work_mem`` and the
    comment included, under one warning. Now only that setting is missing: the warning names
    it and why, and validation fails naming it alone."""
    source, copy = f"owned_{uuid.uuid4().hex[:8]}", f"owned_copy_{uuid.uuid4().hex[:8]}"
    owner, password = f"owner_{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE ROLE {owner} CREATEDB LOGIN PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {source} OWNER {owner}")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute(f"CREATE TABLE public.t (id int PRIMARY KEY); ALTER TABLE public.t OWNER TO {owner};"
                         f"COMMENT ON DATABASE {source} IS 'kept';"
                         f"ALTER DATABASE {source} SET log_min_messages = panic;"
                         f"ALTER DATABASE {source} SET work_mem = '1MB'")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        as_owner = f"postgresql://{owner}:{password}@{pg_server.host}:{pg_server.port}/{copy}"
        proc = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"], "--target-dsn", as_owner,
                   "--create", "--json")
        failed = {c["name"]: c["detail"] for c in proc.json()["validation"]["checks"] if not c["ok"]}
        assert proc.returncode == 3 and failed == {"database_properties": "missing setting log_min_messages=panic"}
        warnings = [json.loads(line)["event"] for line in proc.stderr.splitlines() if '"warning"' in line]
        assert warnings == ['not restored: setting log_min_messages=panic (permission denied to set parameter '
                            '"log_min_messages": only a superuser, or a role granted SET on it, may set it)']
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT s.setconfig, shobj_description(d.oid, 'pg_database') FROM pg_db_role_setting s"
                                " JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = %s",
                                (copy,)).fetchone() == (["work_mem=1MB"], "kept")
    finally:
        drop_all(pg_server, [copy, source], [owner])


SHADOWING = """
CREATE SCHEMA shadow;
CREATE FUNCTION shadow.two(bigint) RETURNS bigint LANGUAGE sql IMMUTABLE AS 'SELECT 2::bigint';
CREATE AGGREGATE shadow.count(*) (sfunc = shadow.two, stype = bigint, initcond = '2');
CREATE FUNCTION shadow.hashtextextended(text, bigint) RETURNS bigint LANGUAGE sql IMMUTABLE AS 'SELECT 7::bigint';
CREATE TABLE public.t (id int PRIMARY KEY, s text);
INSERT INTO public.t VALUES (1, 'a'), (2, 'b');
"""


def test_a_search_path_listing_a_schema_before_pg_catalog_cannot_answer_the_tools_counts(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """A database whose search_path lists a schema before ``pg_catalog`` had that schema's
    ``count(*)`` and ``hashtextextended`` answer the backup's and validation's row counts and
    checksums: the restore failed its checksums, and validation of a copy with a row added
    said its row counts matched (found on a trial database)."""
    with database_pair(pg_server, "shadowed") as (source, copy):
        with pg_server.admin_conn(source) as conn:
            conn.execute(SHADOWING)
            conn.execute(f"ALTER DATABASE {source} SET search_path = shadow, public, pg_catalog")
        backup = back_up_and_restore(cli, local_repo, pg_server, source, copy)
        with pg_server.admin_conn(copy) as conn:
            conn.execute("INSERT INTO public.t VALUES (3, 'c')")
        proc = cli("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"], "--json")
        failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
        assert proc.returncode == 3 and failed["row_counts"] == "public.t has 3 rows, backup 2"


def test_a_role_preloading_a_library_the_target_lacks_is_refused_before_it_is_created(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """``--with-roles`` created a role whose own ``session_preload_libraries`` names a library the
    target lacks: every login of that role then failed, and the restore said nothing."""
    source, copy = f"rolelib_{uuid.uuid4().hex[:8]}", f"rolelib_copy_{uuid.uuid4().hex[:8]}"
    role = f"preloading_{uuid.uuid4().hex[:6]}"
    library = pg_server.make_user_dir() / "only_on_the_source.so"
    library.write_bytes((pg_server.bin_dir.parent / "lib" / "auto_explain.so").read_bytes())
    library.parent.chmod(0o755)
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"ALTER ROLE {role} SET session_preload_libraries = '{library.with_suffix('')}'")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.t (id int PRIMARY KEY)")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        with pg_server.admin_conn() as conn:
            conn.execute(f"DROP ROLE {role}")
        library.unlink()
        proc = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                   "--target-dsn", pg_server.dsn(copy), "--create", "--with-roles")
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert (f"the backup's role settings preload a library the target server cannot load: session_preload_libraries "
                f"of role {role} names '{library.with_suffix('')}' (could not access file") in proc.stderr
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (copy,)).fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone() == (0,)
    finally:
        drop_all(pg_server, [copy, source], [role])


def test_no_session_or_program_of_the_tool_compiles_its_queries_whatever_jit_a_database_sets(
        pg_server: Any) -> None:
    """A database's ``jit = on, jit_above_cost = 0`` (set for its applications' analytics) had
    every catalog query of the tool's sessions and of the programs it runs compiled (0.13 s
    of server CPU for the first statement of each session): they now run with ``jit`` off,
    unless the DSN's own ``options`` asks for it."""
    name = f"jitted_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {name}")
        conn.execute(f"ALTER DATABASE {name} SET jit = on")
        conn.execute(f"ALTER DATABASE {name} SET jit_above_cost = 0")
    try:
        conninfo = ConnInfo(pg_server.dsn(name))
        with conninfo.connect() as conn:
            assert conn.execute("SHOW jit").fetchone() == ("off",)
        shown = subprocess.run([find_tool("psql", 15), "-X", "-At", "-d", conninfo.tool_conninfo(), "-c", "SHOW jit"],
                               env=conninfo.tool_env(), capture_output=True, text=True, check=True)
        assert shown.stdout.strip() == "off"
        with ConnInfo(pg_server.dsn(name) + "?options=-c%20jit%3Don").connect() as conn:
            assert conn.execute("SHOW jit").fetchone() == ("on",)
    finally:
        pg_server.drop_db(name)


def test_a_restore_into_an_existing_database_of_another_locale_says_so_before_it_starts(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """A database keeps the encoding and locale it was created with: restored into an existing
    one of another collation, the restore could only end in exit 3 on database_properties, and
    said nothing until then. It now warns at the start, naming the differences and --create;
    a restore with --create (the backup's locale) says nothing of the kind."""
    source, other, fresh = (f"{p}_{uuid.uuid4().hex[:8]}" for p in ("loc_src", "loc_other", "loc_fresh"))
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
        conn.execute(f"CREATE DATABASE {other} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C.UTF-8'"
                     " LC_CTYPE 'C.UTF-8'")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, w text); INSERT INTO public.t VALUES (1, 'a')")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        proc = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                   "--target-dsn", pg_server.dsn(other))
        assert proc.returncode == 3, proc.stderr
        warned = [line for line in proc.stderr.splitlines() if "keeps its own" in line]
        assert len(warned) == 1, proc.stderr
        assert "collate 'C.UTF-8', backup 'C'" in warned[0] and "--create" in warned[0], warned[0]
        assert proc.stderr.index(warned[0]) < proc.stderr.index("database_properties"), proc.stderr
        created = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"], "--create",
                      "--target-dsn", pg_server.dsn(fresh))
        assert created.returncode == 0, created.stderr
        assert "keeps its own" not in created.stderr
    finally:
        drop_all(pg_server, [source, other, fresh])
