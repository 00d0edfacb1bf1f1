"""Migration discovery and ordering, statement splitting, drift comparison and the policy's
[schema] key: the parts that need no server."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.paths import FIXTURES_DIR

from backup_tool.config.policy import parse_policy
from backup_tool.errors import ConfigError, UsageError
from backup_tool.schema import drift
from backup_tool.schema.migrations import MigrationError, discover, split_statements

FIXTURE = FIXTURES_DIR / "migrations"
SEED_ORDER = ["init_schema", "user_profiles_system", "projects_core", "ai_integration", "gamification_v1",
              "admin_permissions", "crm_basic", "analytics_enhanced", "security_audit", "email_system",
              "payment_integration", "alerts_system"]


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("SELECT 1;\n")


def test_supabase_project_is_found_in_the_seeds_order() -> None:
    found = discover(FIXTURE)
    assert found.folder == FIXTURE / "supabase" / "migrations"
    assert [m.name for m in found.migrations] == SEED_ORDER
    assert found.migrations[0].file == "20241201000000_init_schema.sql"
    assert found.skipped == ()


def test_plain_numbers_sort_numerically_and_strays_are_skipped(tmp_path: Path) -> None:
    touch(tmp_path, "10_ten.sql", "2_two.sql", "1_one.sql", "3_three.down.sql", "4_four.up.sql",
          "seed.sql", "README.md")
    found = discover(tmp_path)
    assert [m.name for m in found.migrations] == ["one", "two", "four", "ten"]
    assert set(found.skipped) == {"3_three.down.sql", "seed.sql"}


def test_same_version_twice_is_refused(tmp_path: Path) -> None:
    touch(tmp_path, "001_a.sql", "1_b.sql")
    with pytest.raises(UsageError, match="001_a.sql and 1_b.sql have the same version"):
        discover(tmp_path)


def test_missing_or_empty_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        discover(tmp_path / "nope")
    touch(tmp_path, "notes.sql")
    with pytest.raises(UsageError, match="no migration files"):
        discover(tmp_path)


def test_statements_split_like_psql_with_their_lines() -> None:
    text = (
        "-- header\n"
        "SET x = 1;\n"
        "/* a ; /* nested ; */ still comment */\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN; RETURN 1; END $body$;\n"
        "SELECT E'it\\'s; ok', 'a''b;', \"we;ird\", $$;$$;\n"
        "CREATE FUNCTION g(a int) RETURNS int LANGUAGE sql\n"
        "BEGIN ATOMIC\n"
        "  SELECT CASE WHEN a > 0 THEN 1 ELSE 2 END;\n"
        "END;\n"
        "CREATE RULE r AS ON INSERT TO t DO INSTEAD (INSERT INTO u VALUES (1); INSERT INTO v VALUES (2));\n"
        "SELECT foo$bar, 1\n"
    )
    got = [(s.line, s.text.split()[0], s.text.split()[-1]) for s in split_statements(text)]
    assert got == [(2, "SET", "1;"), (4, "CREATE", "$body$;"), (5, "SELECT", "$$;$$;"), (6, "CREATE", "END;"),
                   (10, "CREATE", "(2));"), (11, "SELECT", "1")]


@pytest.mark.parametrize("text, line, needle", [
    ("SELECT 1;\nSELECT $x$ never closed;\n", 2, "unterminated dollar-quoted"),
    ("SELECT 1;\n\nSELECT 'open;\n", 3, "unterminated string"),
    ("SELECT 1;\n/* open\n", 2, "unterminated /* comment"),
    ("SELECT 1;\n\\i other.sql\n", 2, "psql meta-command"),
])
def test_unsplittable_files_name_the_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(MigrationError) as err:
        split_statements(text, "007_bad.sql")
    assert err.value.line == line and err.value.file == "007_bad.sql"
    assert needle in str(err.value) and f"line {line}" in str(err.value)


def obj(what: str, name: str, parent: tuple[str, str] | None = None, **props: object) -> drift.SchemaObject:
    return drift.SchemaObject(what, name, dict(props), parent)


def model(*objects: drift.SchemaObject) -> drift.Model:
    return {(o.kind, o.name): o for o in objects}


def test_compare_names_objects_and_fields_and_folds_whole_tables() -> None:
    built = model(obj("table", "public.a", kind="table"), obj("column", "public.a.x", ("table", "public.a"),
                                                            type="integer", nullable=True),
                  obj("policy", "public.a.p", ("table", "public.a"), using="(owner = me())"))
    live = model(obj("table", "public.a", kind="table"),
                 obj("column", "public.a.x", ("table", "public.a"), type="bigint", nullable=True),
                 obj("column", "public.a.y", ("table", "public.a"), type="text", nullable=True),
                 obj("policy", "public.a.p", ("table", "public.a"), using="true"),
                 obj("table", "public.extra", kind="table"),
                 obj("column", "public.extra.id", ("table", "public.extra"), type="integer", nullable=False),
                 obj("grant", "TABLE public.extra TO app", ("table", "public.extra"), privileges="SELECT"))
    found = {(d.kind, d.name, d.change): d for d in drift.compare(built, live)}
    assert set(found) == {("table", "public.extra", "added"), ("column", "public.a.x", "changed"),
                          ("column", "public.a.y", "added"), ("policy", "public.a.p", "changed")}
    assert found[("column", "public.a.x", "changed")].fields == (("type", "integer", "bigint"),)
    assert "using: (owner = me()) → true" in found[("policy", "public.a.p", "changed")].describe()


def test_policy_schema_key_resolves_relative_to_the_policy_file(tmp_path: Path) -> None:
    policy = parse_policy('[schema]\nmigrations = "db/migrations"\n', str(tmp_path / "prod.toml"))
    assert drift.policy_migrations(policy) == tmp_path.resolve() / "db" / "migrations"
    assert drift.policy_migrations(parse_policy("", str(tmp_path / "p.toml"))) is None
    with pytest.raises(ConfigError, match="schema.migrations"):
        parse_policy("[schema]\nmigrations = 3\n", str(tmp_path / "bad.toml"))
