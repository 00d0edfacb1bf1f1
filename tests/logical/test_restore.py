"""A full restore: when its loading sessions let the server add parallel workers, and the
refusal, before anything is created, of a role that cannot give objects back to their owners."""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable

import psycopg
import pytest
from support.clusters import logged_pid, logged_statements

from backup_tool.config.policy import BackupSettings, Policy
from backup_tool.config.settings import Settings
from backup_tool.logical.backup import backup_full
from backup_tool.logical.restore import (
    PARALLEL_MIN_BYTES,
    PARALLEL_WORKER_SETTINGS,
    allow_parallel_workers,
    parallel_workers_matter,
    parallel_workers_wanted,
    restore_full,
)


@pytest.mark.parametrize(("busy", "jobs", "wanted"), [
    (2, 2, False),
    (1, 2, True),
    (4, 4, False),
    (3, 4, True),
    (1, 1, True),
])
def test_parallel_workers_only_while_a_session_is_idle_or_with_one_job(busy: int, jobs: int, wanted: bool) -> None:
    assert parallel_workers_wanted(busy, jobs) is wanted


def test_only_a_table_of_a_megabyte_or_more_has_its_parallel_workers_set() -> None:
    assert not parallel_workers_matter(PARALLEL_MIN_BYTES - 1)
    assert parallel_workers_matter(PARALLEL_MIN_BYTES)


def _shown(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in PARALLEL_WORKER_SETTINGS}


def test_parallel_workers_are_turned_off_then_back_to_the_databases_own_settings(
        fresh_db: Callable[..., Any]) -> None:
    db = fresh_db("par")
    with psycopg.connect(db.dsn, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{db.name}" SET max_parallel_workers_per_gather = 3')
        admin.execute(f'ALTER DATABASE "{db.name}" SET max_parallel_maintenance_workers = 1')
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert _shown(conn) == {"max_parallel_workers_per_gather": "3", "max_parallel_maintenance_workers": "1"}
        allow_parallel_workers(conn, False)
        assert _shown(conn) == {"max_parallel_workers_per_gather": "0", "max_parallel_maintenance_workers": "0"}
        allow_parallel_workers(conn, True)
        assert _shown(conn) == {"max_parallel_workers_per_gather": "3", "max_parallel_maintenance_workers": "1"}


def test_a_restore_that_cannot_give_objects_back_to_their_owners_is_refused_before_anything_is_created(
        cli: Any, local_repo: str, pg_server: Any) -> None:
    """GNUmed's objects belong to gm-dbo. Restored by a role that may create databases but is
    neither a superuser nor a member of gm-dbo, pg_restore failed half-way (`must be member of
    role "gm-dbo"`), leaving a new database marked unfinished. The restore now refuses before
    creating anything, naming the owners and the grant that lets it through."""
    tag = uuid.uuid4().hex[:8]
    source, copy, owner, restorer = f"owned_{tag}", f"owned_copy_{tag}", f"app-owner_{tag}", f"restorer_{tag}"
    password = uuid.uuid4().hex
    with pg_server.admin_conn() as conn:
        conn.execute(f'CREATE ROLE "{owner}" NOLOGIN')
        conn.execute(f"CREATE ROLE {restorer} CREATEDB LOGIN PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {source} OWNER {restorer}")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute(f'CREATE SCHEMA app AUTHORIZATION "{owner}";'
                         "CREATE TABLE app.t (id int PRIMARY KEY, note text);"
                         f'ALTER TABLE app.t OWNER TO "{owner}";'
                         "INSERT INTO app.t VALUES (1, 'a'), (2, E'tab\\there')")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        as_restorer = f"postgresql://{restorer}:{password}@{pg_server.host}:{pg_server.port}/{copy}"
        proc = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"], "--target-dsn", as_restorer,
                   "--create")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f'"{owner}"' in proc.stderr and f'GRANT "{owner}" TO {restorer}' in proc.stderr, proc.stderr
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (copy,)).fetchone() == (0,)
            conn.execute(f'GRANT "{owner}" TO {restorer}')
        restored = cli.json("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                            "--target-dsn", as_restorer, "--create")
        assert restored["ok"] is True
    finally:
        with pg_server.admin_conn() as conn:
            for db in (copy, source):
                conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            conn.execute(f'DROP ROLE IF EXISTS "{owner}"')
            conn.execute(f"DROP ROLE IF EXISTS {restorer}")


PARTITIONS = 30


def _validated_restore_logged(pg_server: Any, source: Any, target: Any, local_repo: str) -> list[str]:
    """The statements a validated ``restore full --jobs 2`` of a backup of ``source`` sent
    into ``target`` (logged by the database's own ``log_statement``, which the restore's last
    step, applying the backed-up settings, ends: validation's own statements are not seen)."""
    settings = Settings(local_repo, source.dsn, Policy(backup=BackupSettings(jobs=2)))
    backup_full(settings)
    target.execute(f"ALTER DATABASE {target.name} SET log_statement = 'all'")
    since = pg_server.log_file.stat().st_size
    result = restore_full(settings, target.dsn, jobs=2, run_validation=True)
    assert result.validation is not None and result.validation.ok
    return logged_statements(pg_server, target.name, since)


@pytest.mark.slow
def test_a_validated_restore_reads_column_types_once_and_sets_jit_on_no_checksum_session(
        pg_server: Any, fresh_db: Callable[..., Any], local_repo: str) -> None:
    """Each table's checksum after its load cost three round trips: its column types, ``SET
    jit = off`` and the query. The types of every table are read in one catalog query before
    the loads, and the sessions start with JIT off: the loading sessions run the checksum
    query alone, and the restore still validates."""
    source, target = fresh_db("partsrc"), fresh_db("partdst")
    source.execute("CREATE TABLE public.m (id int, k int, v numeric, ts timestamptz) PARTITION BY LIST (k);"
                   + "".join(f"CREATE TABLE public.m_{i} PARTITION OF public.m FOR VALUES IN ({i});"
                             for i in range(PARTITIONS))
                   + f"INSERT INTO public.m SELECT g, g % {PARTITIONS}, g / 7.0, now() FROM generate_series(1, 300) g")
    logged = _validated_restore_logged(pg_server, source, target, local_repo)
    checksums = [e for e in logged if "SELECT n, " in e]
    assert len(checksums) == PARTITIONS, logged
    assert not [e for e in logged if "SET jit" in e]
    summing = {logged_pid(e) for e in checksums}
    assert len([e for e in logged if logged_pid(e) in summing and "pg_attribute" in e]) <= 1


SMALL_TABLES = 12


@pytest.mark.slow
def test_a_restore_of_small_tables_leaves_parallel_workers_alone_and_resets_sessions_with_their_analyze(
        pg_server: Any, fresh_db: Callable[..., Any], local_repo: str) -> None:
    """Each small table's load was followed by ``SET`` of the session's parallel workers before
    its checksum and again before its indexes (``RESET`` when a session was idle): two round
    trips per table that no plan of a table that small could use (3,000 tables: 6,000
    statements); then its ANALYZE and the pool's ``RESET ALL``, two more. Now no ``SET`` for a
    small table, the ``RESET ALL`` goes with the ANALYZE, and the restore still validates and
    analyzes every table."""
    source, target = fresh_db("smallsrc"), fresh_db("smalldst")
    source.execute("".join(f"CREATE TABLE public.s_{i} (id serial PRIMARY KEY, v text);"
                           f"CREATE INDEX ON public.s_{i} (v);"
                           f"INSERT INTO public.s_{i} (v) SELECT md5(g::text) FROM generate_series(1, 30) g;"
                           for i in range(SMALL_TABLES)))
    logged = _validated_restore_logged(pg_server, source, target, local_repo)
    assert not [e for e in logged if "max_parallel_workers_per_gather" in e], logged
    assert len([e for e in logged if "ANALYZE " in e]) == SMALL_TABLES
    resets = [e for e in logged if re.search(r"statement: RESET ALL\s*$", e)]
    assert len(resets) <= 1, resets  # the session that read every table's column types
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        analyzed = conn.execute("SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND attname = 'v'").fetchone()
    assert analyzed == (SMALL_TABLES,)
