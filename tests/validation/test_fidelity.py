"""Everything a database holds beyond its tables comes back, and the verdict sees it if not:
materialized views (populated ones refreshed in dependency order), database-level
properties, large objects, tables without columns, planner statistics.

The oracle is independent of the tool: ``pg_dump --create`` (schema, data, large objects,
database properties) of the source and of the restore, equal once the database name is
normalised.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable

import dbcompare
import pytest
from support.clusters import find_pg_bin_dir

from backup_tool.postgres.extension_config import load_order

pytestmark = pytest.mark.slow


def dump_create(db: Any) -> str:
    """pg_dump --create of a database, its own name replaced by DBNAME, \\restrict keys dropped."""
    out = subprocess.run([dbcompare.find_pg_dump(), "--create", "--dbname", db.dsn],
                         capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if not ln.startswith(("\\restrict", "\\unrestrict", "--"))]
    return re.sub(rf"\b{re.escape(db.name)}\b", "DBNAME", "\n".join(lines))


def build_rich_source(db: Any, tag: str) -> dict[str, str]:
    """A source with what a table-by-table copy misses; returns the role names it made."""
    roles = {"owner": f"lo_owner_{tag}", "reader": f"lo_reader_{tag}", "app": f"app_user_{tag}"}
    for role in roles.values():
        db.execute(f"CREATE ROLE {role}")
    db.execute(f"""
        CREATE TABLE public.orders (id int PRIMARY KEY, amount numeric NOT NULL, doc oid);
        INSERT INTO public.orders SELECT g, g * 1.5, NULL FROM generate_series(1, 500) g;
        CREATE MATERIALIZED VIEW public.order_totals AS SELECT count(*) AS n, sum(amount) AS total FROM public.orders;
        CREATE VIEW public.totals_view AS SELECT n, total FROM public.order_totals;
        CREATE MATERIALIZED VIEW public.totals_of_view AS SELECT n * 2 AS doubled FROM public.totals_view;
        CREATE MATERIALIZED VIEW public.big_orders AS SELECT id FROM public.orders WHERE amount > 700;
        CREATE UNIQUE INDEX ON public.big_orders (id);
        CREATE MATERIALIZED VIEW public.never_filled AS SELECT id FROM public.orders WITH NO DATA;
        CREATE SCHEMA crm;
        CREATE TABLE crm.accounts (id int PRIMARY KEY, name text);
        INSERT INTO crm.accounts VALUES (1, 'Ærø'), (2, 'O''Brien');
        CREATE TABLE public.no_columns ();
        INSERT INTO public.no_columns DEFAULT VALUES; INSERT INTO public.no_columns DEFAULT VALUES;
        INSERT INTO public.no_columns DEFAULT VALUES;
        CREATE TABLE public.all_dropped (a int, b text);
        INSERT INTO public.all_dropped VALUES (1, 'x'), (2, 'y');
        ALTER TABLE public.all_dropped DROP COLUMN a; ALTER TABLE public.all_dropped DROP COLUMN b;
        SELECT lo_from_bytea(424242, convert_to('first large object', 'UTF8'));
        SELECT lo_from_bytea(424243, decode(repeat('00ff', 300000), 'hex'));
        ALTER LARGE OBJECT 424242 OWNER TO {roles['owner']};
        GRANT SELECT ON LARGE OBJECT 424242 TO {roles['reader']};
        COMMENT ON LARGE OBJECT 424242 IS 'contract scan';
        UPDATE public.orders SET doc = 424242 WHERE id = 1;
        ALTER DATABASE {db.name} SET "app.settings.jwt_secret" = 'super-secret-jwt-token';
        ALTER DATABASE {db.name} SET search_path = "$user", public, extensions;
        ALTER DATABASE {db.name} SET work_mem = '8MB';
        ALTER ROLE {roles['app']} IN DATABASE {db.name} SET statement_timeout = '5s';
        REVOKE TEMPORARY ON DATABASE {db.name} FROM PUBLIC;
        GRANT TEMPORARY, CREATE ON DATABASE {db.name} TO {roles['app']};
        COMMENT ON DATABASE {db.name} IS 'orders: the app''s database';
        ALTER DATABASE {db.name} OWNER TO {roles['owner']};
    """)
    return roles


def restore_into(cli: Any, repo: str, backup_id: str, target: Any, *extra: str, expect_rc: int = 0) -> Any:
    return cli.json("restore", "full", "--repo", repo, "--backup", backup_id,
                    "--target-dsn", target.dsn, "--create", *extra, expect_rc=expect_rc)


def check(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in result["validation"]["checks"] if c["name"] == name)


def test_rich_database_round_trips_with_an_identical_pg_dump(cli: Any, repo: str, fresh_db: Callable[..., Any],
                                                            pg_server: Any) -> None:
    source = fresh_db("rich")
    build_rich_source(source, uuid.uuid4().hex[:6])
    entry = cli.json("backup", "full", "--repo", repo, "--dsn", source.dsn)
    target = fresh_db("rich_r")
    pg_server.drop_db(target.name)

    result = restore_into(cli, repo, entry["id"], target)

    assert result["ok"] is True
    for name in ("database_properties", "materialized_views", "large_objects"):
        assert check(result, name)["ok"], check(result, name)
    assert dump_create(source) == dump_create(target)
    assert target.scalar("SELECT relispopulated FROM pg_class WHERE relname = 'never_filled'") is False
    assert target.scalar("SELECT doubled FROM public.totals_of_view") == 1000
    assert target.scalar("SELECT count(*) FROM public.no_columns") == 3
    assert target.scalar("SELECT count(*) FROM public.all_dropped") == 2
    assert bytes(target.scalar("SELECT lo_get(424243)")) == bytes.fromhex("00ff" * 300000)
    assert target.scalar("SELECT count(*) FROM pg_stats WHERE tablename = 'orders'") > 0
    assert target.scalar("SELECT count(*) FROM crm.accounts") == 2


def test_incremental_chain_carries_them_too(cli: Any, local_repo: str, fresh_db: Callable[..., Any],
                                            pg_server: Any) -> None:
    source = fresh_db("rich")
    roles = build_rich_source(source, uuid.uuid4().hex[:6])
    cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    source.execute(f"""
        INSERT INTO public.orders VALUES (501, 9999, NULL);
        REFRESH MATERIALIZED VIEW public.order_totals;
        REFRESH MATERIALIZED VIEW public.totals_of_view;
        REFRESH MATERIALIZED VIEW public.never_filled;
        REFRESH MATERIALIZED VIEW public.big_orders;
        INSERT INTO public.no_columns DEFAULT VALUES;
        SELECT lo_from_bytea(424250, 'added later');
        ALTER DATABASE {source.name} SET work_mem = '16MB';
        ALTER ROLE {roles['app']} IN DATABASE {source.name} SET lock_timeout = '2s';
    """)
    incremental = cli.json("backup", "incremental", "--repo", local_repo, "--dsn", source.dsn)
    assert incremental["kind"] == "incremental"
    target = fresh_db("rich_i")
    pg_server.drop_db(target.name)

    result = restore_into(cli, local_repo, incremental["id"], target, "--no-analyze")

    assert result["ok"] is True
    assert dump_create(source) == dump_create(target)
    assert target.scalar("SELECT count(*) FROM pg_stats WHERE tablename = 'orders'") == 0


def test_validation_names_each_difference(cli: Any, local_repo: str, fresh_db: Callable[..., Any],
                                          pg_server: Any) -> None:
    source = fresh_db("rich")
    roles = build_rich_source(source, uuid.uuid4().hex[:6])
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    target = fresh_db("rich_v")
    pg_server.drop_db(target.name)
    restore_into(cli, local_repo, entry["id"], target)

    def verdict() -> dict[str, dict[str, Any]]:
        out = cli.json("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"],
                       expect_rc=None)
        return {c["name"]: c for c in out["checks"]}

    assert all(c["ok"] for c in verdict().values())
    target.execute("REFRESH MATERIALIZED VIEW public.big_orders WITH NO DATA")
    target.execute(f"ALTER DATABASE {target.name} RESET \"app.settings.jwt_secret\"")
    target.execute(f"GRANT CONNECT ON DATABASE {target.name} TO {roles['reader']}")
    target.execute("SELECT lo_put(424243, 0, '\\x01')")
    checks = verdict()
    assert not checks["materialized_views"]["ok"] and "public.big_orders" in checks["materialized_views"]["detail"]
    detail = checks["database_properties"]["detail"]
    assert "app.settings.jwt_secret" in detail and f"CONNECT to {roles['reader']}" in detail
    assert not checks["large_objects"]["ok"]
    proc = cli("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"])
    assert proc.returncode == 3


def test_setting_of_a_role_missing_on_the_target_is_reported_not_dropped(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    source = fresh_db("ghost")
    ghost = f"ghost_{uuid.uuid4().hex[:6]}"
    source.execute(f"CREATE ROLE {ghost}")
    source.execute(f"ALTER ROLE {ghost} IN DATABASE {source.name} SET statement_timeout = '7s'")
    source.execute("CREATE TABLE public.t (id int); INSERT INTO public.t VALUES (1)")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    source.execute(f"ALTER ROLE {ghost} IN DATABASE {source.name} RESET ALL")
    source.execute(f"DROP ROLE {ghost}")
    target = fresh_db("ghost_r")
    pg_server.drop_db(target.name)

    proc = cli("restore", "full", "--repo", local_repo, "--backup", entry["id"], "--target-dsn", target.dsn,
               "--create")

    assert proc.returncode == 3
    warnings = [ln for ln in proc.stderr.splitlines() if "not restored" in ln]
    assert len(warnings) == 1 and ghost in warnings[0] and "statement_timeout" in warnings[0]
    out = cli.json("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"], expect_rc=3)
    failed = {c["name"]: c["detail"] for c in out["checks"] if not c["ok"]}
    assert list(failed) == ["database_properties"]
    assert f"missing setting statement_timeout=7s for role {ghost}" in failed["database_properties"]


def test_zero_column_table_backs_up(cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    source = fresh_db("zero")
    source.execute("CREATE TABLE public.nothing (); INSERT INTO public.nothing SELECT FROM generate_series(1, 7)")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    assert entry["rows"] == 7
    target = fresh_db("zero_r")
    result = cli.json("restore", "full", "--repo", local_repo, "--backup", entry["id"], "--target-dsn", target.dsn)
    assert result["ok"] is True and result["rows"] == 7
    assert target.scalar("SELECT count(*) FROM public.nothing") == 7


def test_extensions_come_back_at_their_backed_up_version(cli: Any, local_repo: str, fresh_db: Callable[..., Any],
                                                        pg_server: Any) -> None:
    source = fresh_db("ext")
    source.execute("CREATE SCHEMA extensions")
    source.execute("CREATE EXTENSION pg_trgm VERSION '1.5' SCHEMA extensions")
    source.execute("CREATE EXTENSION hstore VERSION '1.7'")
    source.execute("CREATE TABLE public.docs (body text, attrs hstore)")
    source.execute("CREATE INDEX docs_trgm ON public.docs USING gin (body extensions.gin_trgm_ops)")
    source.execute("INSERT INTO public.docs VALUES ('hello world', 'a=>1')")
    defaults = dict(source.execute("SELECT name, default_version FROM pg_available_extensions "
                                   "WHERE name IN ('pg_trgm', 'hstore')"))
    assert defaults["pg_trgm"] != "1.5" and defaults["hstore"] != "1.7"
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    target = fresh_db("ext_r")
    pg_server.drop_db(target.name)

    result = restore_into(cli, local_repo, entry["id"], target)

    assert result["ok"] is True
    assert dict(target.execute("SELECT extname, extversion FROM pg_extension")) == \
        {"plpgsql": "1.0", "pg_trgm": "1.5", "hstore": "1.7"}
    assert dump_create(source) == dump_create(target)


def test_a_materialized_view_stale_in_the_source_is_named_by_the_verdict(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    source = fresh_db("stale")
    source.execute("CREATE TABLE public.t (v int); INSERT INTO public.t VALUES (1), (2)")
    source.execute("CREATE MATERIALIZED VIEW public.fresh AS SELECT sum(v) AS s FROM public.t")
    source.execute("CREATE MATERIALIZED VIEW public.stale AS SELECT count(*) AS n FROM public.t")
    source.execute("INSERT INTO public.t VALUES (3); REFRESH MATERIALIZED VIEW public.fresh")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    target = fresh_db("stale_r")
    pg_server.drop_db(target.name)

    out = restore_into(cli, local_repo, entry["id"], target, expect_rc=3)

    failed = {c["name"]: c["detail"] for c in out["validation"]["checks"] if not c["ok"]} \
        if "validation" in out else None
    if failed is None:
        out = cli.json("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"], expect_rc=3)
        failed = {c["name"]: c["detail"] for c in out["checks"] if not c["ok"]}
    assert list(failed) == ["materialized_views"]
    assert "public.stale" in failed["materialized_views"] and "public.fresh" not in failed["materialized_views"]
    assert target.scalar("SELECT n FROM public.stale") == 3


# An extension with a configuration table and sequence, as PostGIS marks spatial_ref_sys: its
# script inserts built-in rows; pg_dump dumps only the rows the filter keeps (the user's).
CONFIG_EXTENSION = "backup_tool_site_config"
CONFIG_EXTENSION_SQL = """
CREATE TABLE site_config (key text PRIMARY KEY, value text, builtin boolean NOT NULL DEFAULT false);
INSERT INTO site_config VALUES ('default_srid', '4326', true), ('units', 'metre', true);
CREATE SEQUENCE site_config_serial;
SELECT pg_catalog.pg_extension_config_dump('site_config', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('site_config_serial', '');
"""


def install_extension(name: str, script: str) -> str:
    """Installs extension ``name`` (version 1.0, schema public) with ``script`` into the
    server's extension directory (needs write access there: root in CI)."""
    sharedir = subprocess.run([str(find_pg_bin_dir() / "pg_config"), "--sharedir"], capture_output=True,
                              text=True, check=True).stdout.strip()
    extdir = Path(sharedir) / "extension"
    if not os.access(extdir, os.W_OK):
        pytest.skip(f"cannot install a test extension into {extdir}")
    (extdir / f"{name}.control").write_text(
        "comment = 'backup-tool test: an extension with a configuration table'\n"
        "default_version = '1.0'\nrelocatable = false\nschema = public\n")
    (extdir / f"{name}--1.0.sql").write_text(script)
    return name


@pytest.fixture(scope="module")
def config_extension() -> str:
    return install_extension(CONFIG_EXTENSION, CONFIG_EXTENSION_SQL)


def test_rows_users_added_to_an_extension_configuration_table_come_back(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any, config_extension: str) -> None:
    """PostGIS's spatial_ref_sys with a custom SRID: CREATE EXTENSION makes the built-in rows,
    the user's rows are data only the backup holds. They were lost while the verdict said OK."""
    source = fresh_db("extcfg")
    source.execute(f"CREATE EXTENSION {config_extension}")
    source.execute("INSERT INTO public.site_config VALUES ('site grid', E'LOCAL_CS[\"grid\"]\\t+proj=tmerc', false), "
                   "('ünïcode key', NULL, false)")
    source.execute("SELECT nextval('public.site_config_serial') FROM generate_series(1, 3)")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    manifest = (Path(local_repo) / "manifests" / f"{entry['id']}.json").read_text()
    assert "site grid" not in manifest and "extension_config.json.zst" in manifest, \
        "the rows are user data: in a stored object (encrypted like the tables), not in the manifest"
    target = fresh_db("extcfg_r")
    pg_server.drop_db(target.name)

    result = restore_into(cli, local_repo, entry["id"], target)

    assert result["ok"] is True
    assert target.scalar("SELECT count(*) FROM public.site_config") == 4
    assert dump_create(source) == dump_create(target)
    assert check(result, "extension_config")["ok"], check(result, "extension_config")

    def verdict() -> tuple[int, dict[str, Any]]:
        proc = cli("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"], "--json")
        return proc.returncode, {c["name"]: c for c in proc.json()["checks"]}

    target.execute("UPDATE public.site_config SET value = 'changed' WHERE key = 'site grid'")
    rc, checks = verdict()
    assert rc == 3 and not checks["extension_config"]["ok"]
    assert "public.site_config" in checks["extension_config"]["detail"]
    target.execute("UPDATE public.site_config SET value = E'LOCAL_CS[\"grid\"]\\t+proj=tmerc' WHERE key = 'site grid'")
    target.execute("SELECT setval('public.site_config_serial', 1)")
    rc, checks = verdict()
    assert rc == 3 and "public.site_config_serial" in checks["extension_config"]["detail"]


# As pointcloud's pcpatch input looks its format up in pointcloud_formats, this extension's
# domain takes a value only once its configuration holds it; as pgq's event_template, its
# configuration table is the parent of the user's own tables.
FORMATS_EXTENSION_SQL = """
CREATE TABLE formats (pcid int PRIMARY KEY, name text NOT NULL);
INSERT INTO formats VALUES (1, 'built-in');
SELECT pg_catalog.pg_extension_config_dump('formats', 'WHERE pcid > 1');
CREATE FUNCTION known_format(int) RETURNS boolean LANGUAGE sql STABLE
    AS 'SELECT EXISTS (SELECT 1 FROM public.formats WHERE pcid = $1)';
CREATE DOMAIN patch AS int CHECK (public.known_format(VALUE));
CREATE TABLE event_template (ev_id bigint, ev_data text);
SELECT pg_catalog.pg_extension_config_dump('event_template', '');
"""


def test_configuration_rows_are_in_before_the_data_that_needs_them_and_without_their_childrens_rows(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    """pointcloud: a table of pcpatch values failed to load (`no entry in pointcloud_formats for
    pcid = 1`) because the configuration rows were restored after the tables. pgq: the rows of
    event_template were read with its children's (the user's event tables), so the restore put
    every event a second time into event_template and validation failed extension_config."""
    extension = install_extension("backup_tool_formats", FORMATS_EXTENSION_SQL)
    source = fresh_db("extorder")
    source.execute(f"CREATE EXTENSION {extension}")
    source.execute("INSERT INTO public.formats VALUES (7, 'user format')")
    source.execute("CREATE TABLE public.patches (id int PRIMARY KEY, p patch)")
    source.execute("INSERT INTO public.patches SELECT g, 7 FROM generate_series(1, 20) g")
    source.execute("CREATE TABLE public.event_1 () INHERITS (public.event_template)")
    source.execute("INSERT INTO public.event_1 SELECT g, 'event ' || g FROM generate_series(1, 30) g")
    source.execute("INSERT INTO public.event_template VALUES (0, 'in the template itself')")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    target = fresh_db("extorder_r")
    pg_server.drop_db(target.name)

    result = restore_into(cli, local_repo, entry["id"], target)

    assert result["ok"] is True, [c for c in result["validation"]["checks"] if not c["ok"]]
    assert target.scalar("SELECT count(*) FROM ONLY public.event_template") == 1
    assert target.scalar("SELECT count(*) FROM public.event_1") == 30
    assert dump_create(source) == dump_create(target)
    target.execute("INSERT INTO public.event_template VALUES (1, 'one more')")
    out = cli.json("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"], expect_rc=3)
    failed = {c["name"]: c["detail"] for c in out["checks"] if not c["ok"]}
    assert list(failed) == ["extension_config"] and "public.event_template" in failed["extension_config"]


def test_an_index_pg_restore_cannot_rebuild_fails_the_restore_with_the_reason(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    """earthdistance on PostgreSQL 15: ll_to_earth's body names cube and earth without their
    schema; pg_restore runs with an empty search_path, so an index on it cannot be rebuilt by
    any restore of a pg_dump. The restore fails (exit 1) saying which function and why."""
    source = fresh_db("earth")
    source.execute("CREATE EXTENSION cube")
    source.execute("CREATE EXTENSION earthdistance")
    source.execute("CREATE TABLE public.stores (id int PRIMARY KEY, lat float8, lon float8)")
    source.execute("INSERT INTO public.stores SELECT g, g % 80, g % 170 FROM generate_series(1, 50) g")
    source.execute("CREATE INDEX stores_earth ON public.stores USING gist (ll_to_earth(lat, lon))")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    target = fresh_db("earth_r")
    pg_server.drop_db(target.name)

    proc = cli("restore", "full", "--repo", local_repo, "--backup", entry["id"], "--target-dsn", target.dsn,
               "--create")

    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "public.stores" in proc.stderr and "ll_to_earth" in proc.stderr and "search_path" in proc.stderr


def test_an_extension_the_target_cannot_install_is_refused_before_anything_is_created(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    """A backup of a PostGIS database restored into a server without PostGIS failed half-way
    through the schema (a marked, unfinished database left behind); now it is refused first,
    naming the extension, and the database --create would make is not made."""
    sharedir = subprocess.run([str(find_pg_bin_dir() / "pg_config"), "--sharedir"], capture_output=True,
                              text=True, check=True).stdout.strip()
    extdir = Path(sharedir) / "extension"
    if not os.access(extdir, os.W_OK):
        pytest.skip(f"cannot install a test extension into {extdir}")
    name = f"bt_gone_{uuid.uuid4().hex[:8]}"
    files = [extdir / f"{name}.control", extdir / f"{name}--1.0.sql"]
    files[0].write_text("comment = 'backup-tool test: removed before the restore'\ndefault_version = '1.0'\n"
                        "relocatable = true\n")
    files[1].write_text("CREATE FUNCTION gone_answer() RETURNS int LANGUAGE sql AS 'SELECT 42';\n")
    try:
        source = fresh_db("extgone")
        source.execute(f"CREATE EXTENSION {name}")
        source.execute("CREATE TABLE public.answers AS SELECT gone_answer() AS a")
        entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
        for f in files:
            f.unlink()
        target_name = f"extgone_r_{uuid.uuid4().hex[:8]}"
        proc = cli("restore", "full", "--repo", local_repo, "--backup", entry["id"],
                   "--target-dsn", pg_server.dsn(target_name), "--create")
        assert proc.returncode == 1
        assert f"the backup uses extension {name}, which the target server cannot install" in proc.stderr
        assert "install their packages on the target server" in proc.stderr
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (target_name,)).fetchone() == (0,)
    finally:
        for f in files:
            f.unlink(missing_ok=True)


# As pgagent's pga_job references pga_jobclass: configuration tables with foreign keys between
# them, whose names sort the referencing one first.
JOBS_EXTENSION_SQL = """
CREATE TABLE job_class (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE job (id int PRIMARY KEY, class int NOT NULL REFERENCES job_class, name text);
CREATE TABLE a_step (id int PRIMARY KEY, job int NOT NULL REFERENCES job ON DELETE CASCADE);
INSERT INTO job_class VALUES (1, 'built-in');
SELECT pg_catalog.pg_extension_config_dump('job_class', 'WHERE id > 1');
SELECT pg_catalog.pg_extension_config_dump('job', '');
SELECT pg_catalog.pg_extension_config_dump('a_step', '');
"""


def test_configuration_tables_load_after_the_configuration_tables_they_reference(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any], pg_server: Any) -> None:
    """pgagent: restore full failed (`pga_job` violates `pga_job_jobjclid_fkey`) because the
    configuration tables were loaded in name order, `pga_job` before the `pga_jobclass` it
    references; pg_dump orders them by their foreign keys."""
    extension = install_extension("backup_tool_jobs", JOBS_EXTENSION_SQL)
    source = fresh_db("extfk")
    source.execute(f"CREATE EXTENSION {extension}")
    source.execute("INSERT INTO public.job_class VALUES (2, 'nightly')")
    source.execute("INSERT INTO public.job SELECT g, 2, 'job ' || g FROM generate_series(1, 5) g")
    source.execute("INSERT INTO public.a_step SELECT g, g % 5 + 1 FROM generate_series(1, 10) g")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    target = fresh_db("extfk_r")
    pg_server.drop_db(target.name)

    result = restore_into(cli, local_repo, entry["id"], target)

    assert result["ok"] is True, [c for c in result["validation"]["checks"] if not c["ok"]]
    assert target.scalar("SELECT count(*) FROM public.a_step") == 10
    assert dump_create(source) == dump_create(target)


def test_load_order_puts_referenced_configuration_tables_first_and_keeps_cycles() -> None:
    items = [{"schema": "s", "name": n} for n in ("a", "b", "c", "d")]
    refs = [("s", "a", "s", "c"), ("s", "c", "s", "d"), ("s", "b", "s", "b"), ("x", "a", "s", "b"),
            ("s", "a", "s", "zz")]
    assert [i["name"] for i in load_order(items, refs)] == ["b", "d", "c", "a"]
    cyclic = [("s", "a", "s", "b"), ("s", "b", "s", "a")]
    assert [i["name"] for i in load_order(items, cyclic)] == ["c", "d", "a", "b"]
