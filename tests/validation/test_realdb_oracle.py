"""The fidelity oracle on real public databases nobody here wrote: pagila (partitioned payments,
domains, enums, triggers, full text, views, sequences) and chinook from
neondatabase/postgres-sample-dbs, plus contrib extensions as a user uses them (hstore, ltree,
citext, cube, seg, isn, intarray, pg_trgm, btree_gist, bloom, earthdistance, tablefunc, unaccent,
pgcrypto, uuid-ossp, postgres_fdw, file_fdw: data in their types, their index kinds, a text search
configuration, servers, user mappings with passwords, foreign tables), and an application
schema using what those lack (app_features.sql: ICU collations, multiranges, rules, sub-partitions,
an unlogged table, an event trigger, publications, default and column privileges...), in one
database with roles owning and reading part of it (fixtures in tests/fixtures/realdb).

Through the real CLI: `backup full`, changes, `backup incremental`, `restore full --create
--with-roles` of the incremental into an empty cluster. `pg_dump --create` of source and
restore must be identical (normalised as tests/support/dumps.py says), the roles the restore
created must be the source's, `validate` must pass the restore, then fail (exit 3) naming the
check for each alteration of what these databases hold. `restore tables` of the partitioned
table and of the citext/hstore/domain table must give their rows back.
"""

from __future__ import annotations

import lzma
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.cli import Cli
from support.clusters import PG_MAJOR, PgServer, start_pg_server
from support.dumps import dump_database, dump_globals, failed_checks, psql, unexplained_diff
from support.paths import REPO_ROOT

from backup_tool.errors import BackupToolError
from backup_tool.logical import restore_tables
from backup_tool.postgres import schema
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.catalog import Catalog
from backup_tool.repository.storage import open_storage

pytestmark = pytest.mark.slow

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "realdb"

ROLES_SQL = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'realdb_owner') THEN
    CREATE ROLE realdb_owner LOGIN CONNECTION LIMIT 5;
    CREATE ROLE realdb_reader NOLOGIN;
    GRANT realdb_reader TO realdb_owner;
    ALTER ROLE realdb_reader SET statement_timeout = '1min';
  END IF;
END $$;
"""

CHANGES_SQL = """
INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date)
  VALUES (1, 1, 1, 12.34, '2022-03-15 10:00:00+00'), (2, 2, 2, 0.99, '2022-06-30 23:59:59+00');
DELETE FROM public.payment WHERE payment_id % 97 = 0;
UPDATE public.film SET description = description || ' (remastered)' WHERE film_id <= 20;
UPDATE public."Track" SET "Name" = "Name" || ' — live' WHERE "TrackId" % 50 = 0;
INSERT INTO shop.customer (email, attrs, category, name)
  VALUES ('Late@Example.com', 'a=>1, "b c"=>NULL', 'Top.Art.Late', 'late ñame');
UPDATE shop.customer SET attrs = attrs || 'changed=>yes' WHERE height IS NOT NULL AND id::text < '4';
INSERT INTO shop.booking (room, during) VALUES (99, '[2030-01-01, 2030-01-02)');
ALTER SERVER remote_pg OPTIONS (SET fetch_size '1000');
UPDATE app.account SET mood = 'happy' WHERE id % 5 = 0;
INSERT INTO app.events (region, at, payload) VALUES ('eu', '2024-05-05', '{"n": -1}'), ('zz', '2020-01-01', NULL);
REFRESH MATERIALIZED VIEW CONCURRENTLY app.mood_counts;
"""


@dataclass
class RealDb:
    source: PgServer
    dbname: str
    target: PgServer
    repo: str
    cli: Cli
    full_id: str
    inc_id: str


@pytest.fixture(scope="module")
def realdb(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealDb]:
    dbname = f"realdb_{uuid.uuid4().hex[:8]}"
    psql(pg_server, "postgres", ROLES_SQL)
    pg_server.create_db(dbname)
    target = start_pg_server()
    try:
        scripts = tmp_path_factory.mktemp("realdb-sql")
        for name in ("pagila.sql", "chinook.sql"):
            (scripts / name).write_bytes(lzma.decompress((FIXTURES / f"{name}.xz").read_bytes()))
        pg_server.load_sql(dbname, [scripts / "pagila.sql", scripts / "chinook.sql",
                                    FIXTURES / "contrib_extensions.sql", FIXTURES / "app_features.sql"])
        repo = str(tmp_path_factory.mktemp("realdb-repo"))
        cli = Cli(workdir=tmp_path_factory.mktemp("realdb-cli"))
        full = cli.json("backup", "full", "--repo", repo, "--dsn", pg_server.dsn(dbname))
        psql(pg_server, dbname, CHANGES_SQL)
        inc = cli.json("backup", "incremental", "--repo", repo, "--dsn", pg_server.dsn(dbname))
        assert inc["kind"] == "incremental" and inc["parent_id"] == full["id"]
        yield RealDb(pg_server, dbname, target, repo, cli, full["id"], inc["id"])
    finally:
        target.destroy()
        pg_server.drop_db(dbname)


@pytest.fixture(scope="module")
def restored(realdb: RealDb) -> Any:
    return realdb.cli("restore", "full", "--repo", realdb.repo, "--backup", realdb.inc_id,
                      "--target-dsn", realdb.target.dsn(realdb.dbname), "--create", "--with-roles", "--json")


def role_lines(globals_dump: list[str]) -> set[str]:
    return {ln for ln in globals_dump if "realdb_" in ln}


# Each alteration of the faithful restore, the statement undoing it and the check that must
# name it.
ALTERATIONS: tuple[tuple[str, str, str], ...] = (
    ("ALTER USER MAPPING FOR realdb_reader SERVER remote_pg OPTIONS (SET password 'guessed')",
     "ALTER USER MAPPING FOR realdb_reader SERVER remote_pg OPTIONS (SET password 'reader-pw')", "schema_matches"),
    ("DROP USER MAPPING FOR PUBLIC SERVER remote_pg",
     "CREATE USER MAPPING FOR PUBLIC SERVER remote_pg OPTIONS (user 'reporter', password 'secret-pw')",
     "schema_matches"),
    ("ALTER SERVER remote_pg OPTIONS (SET host 'elsewhere.invalid')",
     "ALTER SERVER remote_pg OPTIONS (SET host 'db.example.invalid')", "schema_matches"),
    ("ALTER FOREIGN TABLE shop.remote_orders OPTIONS (SET table_name 'orders_old')",
     "ALTER FOREIGN TABLE shop.remote_orders OPTIONS (SET table_name 'orders')", "schema_matches"),
    ("ALTER TEXT SEARCH CONFIGURATION shop.fr_unaccent ALTER MAPPING FOR word WITH french_stem",
     "ALTER TEXT SEARCH CONFIGURATION shop.fr_unaccent ALTER MAPPING FOR word WITH unaccent, french_stem",
     "schema_matches"),
    ("REVOKE USAGE ON FOREIGN SERVER remote_pg FROM realdb_reader",
     "GRANT USAGE ON FOREIGN SERVER remote_pg TO realdb_reader", "object_privileges"),
    ("UPDATE shop.customer SET attrs = attrs || 'x=>1' WHERE email = 'late@example.com'",
     "UPDATE shop.customer SET attrs = attrs - 'x'::text WHERE email = 'late@example.com'", "content_checksums"),
    ("ALTER TABLE app.session_cache SET LOGGED", "ALTER TABLE app.session_cache SET UNLOGGED", "schema_matches"),
    ("UPDATE app.session_cache SET v = '{}' WHERE k = 'k1'", "UPDATE app.session_cache SET v = '{\"g\": 1}' WHERE k = 'k1'",
     "content_checksums"),
    ("ALTER EVENT TRIGGER realdb_ddl ENABLE", "ALTER EVENT TRIGGER realdb_ddl DISABLE", "event_triggers"),
    ("ALTER PUBLICATION realdb_pub SET (publish = 'insert')",
     "ALTER PUBLICATION realdb_pub SET (publish = 'insert, update')", "publications"),
    ("ALTER DEFAULT PRIVILEGES FOR ROLE realdb_app IN SCHEMA app REVOKE SELECT ON TABLES FROM realdb_ro",
     "ALTER DEFAULT PRIVILEGES FOR ROLE realdb_app IN SCHEMA app GRANT SELECT ON TABLES TO realdb_ro",
     "default_privileges"),
    ("REVOKE GRANT OPTION FOR UPDATE (score) ON app.account FROM realdb_app",
     "GRANT UPDATE (score) ON app.account TO realdb_app WITH GRANT OPTION", "column_privileges"),
    ("ALTER TABLE app.account ALTER CONSTRAINT account_parent_fkey INITIALLY IMMEDIATE",
     "ALTER TABLE app.account ALTER CONSTRAINT account_parent_fkey INITIALLY DEFERRED", "foreign_keys_match"),
    ("REFRESH MATERIALIZED VIEW app.never_filled", "REFRESH MATERIALIZED VIEW app.never_filled WITH NO DATA",
     "materialized_views"),
    ("ALTER ROLE realdb_ro IN DATABASE {db} RESET search_path",
     "ALTER ROLE realdb_ro IN DATABASE {db} SET search_path = app, public", "database_properties"),
    ("ALTER DOMAIN app.posint DROP CONSTRAINT posint_pos",
     "ALTER DOMAIN app.posint ADD CONSTRAINT posint_pos CHECK (VALUE > 0);"
     " COMMENT ON CONSTRAINT posint_pos ON DOMAIN app.posint IS 'positive'", "schema_matches"),
    ("UPDATE public.payment SET amount = amount + 1 WHERE payment_id = (SELECT min(payment_id) FROM public.payment)",
     "UPDATE public.payment SET amount = amount - 1 WHERE payment_id = (SELECT min(payment_id) FROM public.payment)",
     "content_checksums"),
)


def test_restore_of_the_incremental_is_identical_and_validates(realdb: RealDb, restored: Any) -> None:
    expected = dump_database(realdb.source, realdb.dbname)
    diff = unexplained_diff("realdb", expected, dump_database(realdb.target, realdb.dbname))
    assert not diff, f"{len(diff)} differing dump lines, first 120:\n" + "\n".join(diff[:120])
    assert role_lines(dump_globals(realdb.target)) == role_lines(dump_globals(realdb.source))
    assert restored.returncode == 0, failed_checks(restored) or restored.stderr[-2000:]

    def validate() -> Any:
        return realdb.cli("validate", "--repo", realdb.repo, "--dsn", realdb.target.dsn(realdb.dbname),
                          "--against", realdb.inc_id, "--json")

    missed = []
    for alter, undo, check in ALTERATIONS:
        alter, undo = alter.replace("{db}", realdb.dbname), undo.replace("{db}", realdb.dbname)
        psql(realdb.target, realdb.dbname, alter)
        proc = validate()
        if proc.returncode != 3 or not any(f.startswith(check + ":") for f in failed_checks(proc)):
            missed.append(f"{alter}: exit {proc.returncode}, failing {failed_checks(proc)}")
        psql(realdb.target, realdb.dbname, undo)
    assert not missed, "alterations validate did not name:\n" + "\n".join(missed)
    final = validate()
    assert final.returncode == 0, failed_checks(final)


@pytest.mark.parametrize("table", ["public.payment", "shop.customer", "app.events"])
def test_restore_tables_gives_the_rows_back(realdb: RealDb, restored: Any, table: str) -> None:
    """A partitioned table (rows in its partitions), one with citext-domain, hstore, ltree, isn,
    cube and seg columns, and one sub-partitioned by list, then range and hash, with default
    partitions, restored into a database holding the schema."""
    target_db = realdb.dbname
    count = int(psql(realdb.target, target_db, f"SELECT count(*) FROM {table}"))
    psql(realdb.target, target_db, f"TRUNCATE {table}")
    proc = realdb.cli("restore", "tables", "--repo", realdb.repo, "--backup", realdb.inc_id, "--tables", table,
                      "--target-dsn", realdb.target.dsn(target_db), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(psql(realdb.target, target_db, f"SELECT count(*) FROM {table}")) == count


def test_each_tables_definitions_read_from_the_objects_they_need_equal_those_of_the_whole_schema(
        realdb: RealDb, tmp_path: Path) -> None:
    """``restore tables --into-schema`` (and a selection pg_restore cannot script) reads the
    tables' definitions from a scratch database. It replayed the whole schema there: 15 s for
    one small table beside 3,000 partitions. Now only what the tables' definitions depend on,
    as pg_dump recorded it. For every table of these databases, alone and moved to an
    inspection schema, what pg_dump then writes must equal what it writes after the whole
    schema's replay (the old way, and the fallback)."""
    source = ConnInfo(realdb.source.dsn(realdb.dbname))
    archive = tmp_path / "schema.pgdump"
    archive.write_bytes(schema.dump_schema(source, PG_MAJOR))
    toc = schema.read_toc(archive.read_bytes())
    manifest = Catalog(open_storage(realdb.repo)).resolve_logical(realdb.full_id, None)
    entries = {(t.schema, t.name): t for t in manifest.tables}
    tables = [entries[(e.namespace, e.tag)] for e in toc if e.desc == "TABLE" and (e.namespace, e.tag) in entries]
    assert len(tables) > 40
    fewer = 0

    def text(archive_bytes: bytes) -> str:
        return "\n".join(line for line in schema.schema_text(archive_bytes, PG_MAJOR).splitlines()
                         if not line.startswith(("\\restrict", "\\unrestrict")))

    scratch_name = f"whole_{uuid.uuid4().hex[:8]}"
    realdb.source.create_db(scratch_name)
    try:
        scratch = ConnInfo(realdb.source.dsn(scratch_name))
        schema.replay_into_scratch(archive, scratch, PG_MAJOR)
        whole = {(t.schema, t.name): text(schema.dump_schema(scratch, PG_MAJOR, tables=[
            restore_tables._pattern(t.schema, t.name)])) for t in tables}
    finally:
        realdb.source.drop_db(scratch_name)
    extensions_needed = []
    for t in tables:
        attempts = restore_tables.scratch_attempts(archive, {(t.schema, t.name)})
        assert attempts, t.full_name
        fewer += len(attempts[0]) < len(toc) // 2
        for i, needed in enumerate(attempts):
            try:
                got = restore_tables._definitions_in_scratch(source, PG_MAJOR, archive, [t], None, needed)
            except BackupToolError:
                assert i + 1 < len(attempts), t.full_name
                continue
            extensions_needed += [t.full_name] if i else []
            assert text(got.archive) == whole[(t.schema, t.name)], t.full_name
            break
    assert extensions_needed == ["shop.booking"]
    for t in tables[::9]:
        needed = restore_tables.scratch_attempts(archive, {(t.schema, t.name)})[-1]
    assert fewer > len(tables) // 2
