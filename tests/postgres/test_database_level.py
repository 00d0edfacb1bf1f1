"""Database-level properties round-trip: a template database (``IS_TEMPLATE``, which
``pg_dump --create`` carries) restores as a template, validation names the flag when it
differs, and the databases the tool drops (a restore-test's scratch copy) may be templates."""

from __future__ import annotations

import subprocess
import uuid
from datetime import date, datetime
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def _drop(pg_server: Any, name: str) -> None:
    with pg_server.admin_conn() as conn:
        conn.execute(f"UPDATE pg_database SET datistemplate = false WHERE datname = '{name}'")
    pg_server.drop_db(name)


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
        pg_server.drop_db(copy)
        pg_server.drop_db(source)
        with pg_server.admin_conn() as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")


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
    source, copy = f"limits_{uuid.uuid4().hex[:8]}", f"limits_copy_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
    try:
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
    finally:
        pg_server.drop_db(copy)
        pg_server.drop_db(source)


def test_a_dsn_with_its_own_options_keeps_the_session_settings_of_the_copy_processes(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """An ``options`` in the DSN went into the connection string of the psql that copies a large
    table out, where libpq lets it replace PGOPTIONS and with it every pinned setting: under a
    database's ``DateStyle = 'SQL, DMY'`` the rows were stored as 13/03/2020 and the restore
    failed loading them (dates up to the 12th would have come back with day and month swapped)."""
    source, copy = f"dmy_{uuid.uuid4().hex[:8]}", f"dmy_copy_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
        conn.execute(f"ALTER DATABASE {source} SET DateStyle = 'SQL, DMY'")
    try:
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
    finally:
        pg_server.drop_db(copy)
        pg_server.drop_db(source)


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
        pg_server.drop_db(copy)
        pg_server.drop_db(source)


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
