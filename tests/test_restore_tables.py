"""Selective table restores: only the chosen tables come back, nothing else is touched,
refusals change nothing, and each mode ends validated."""

from __future__ import annotations

from typing import Any, Callable

import pytest

import dbcompare
from backup_tool.errors import NotFoundError, UsageError
from backup_tool.restore_tables import resolve_tables, split_name
from test_manifest import make_manifest

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


def test_unknown_table_is_a_clear_error(cli: Any, local_repo: str, live: tuple[Any, dict[str, Any]]) -> None:
    db, _ = live
    proc = cli("restore", "tables", "--repo", local_repo, "--tables", "public.user_profile", "--target-dsn", db.dsn)
    assert proc.returncode == 1
    assert "public.user_profiles" in proc.stderr and "Traceback" not in proc.stderr
