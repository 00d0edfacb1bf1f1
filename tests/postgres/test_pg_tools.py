"""Choosing PostgreSQL programs per server major (backup_tool.postgres.tools) and what a
restore into a newer major tolerates (backup_tool.validation.majors): the pure decisions,
plus the real lookup against fake program directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backup_tool.postgres import tools
from backup_tool.postgres.connection import tool_versions
from backup_tool.postgres.tools import Candidate, Match, Source, ToolError
from backup_tool.validation import majors

ALL_15 = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]


def cand(path: str, version: str | None, source: Source = Source.PATH) -> Candidate:
    return Candidate(Path(path), source, version)


def test_versions_are_read_as_postgres_prints_them() -> None:
    assert tools.parse_version("pg_dump (PostgreSQL) 17.10") == "17.10"
    assert tools.parse_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)") == "15.18"
    assert tools.parse_version("postgres (PostgreSQL) 18beta1") == "18"
    assert tools.parse_version("something else 1.2") is None


def test_client_tools_of_the_server_major_or_newer_first_fit_wins() -> None:
    found = [cand("/a/pg_dump", "15.18"), cand("/b/pg_dump", "18.6"), cand("/c/pg_dump", "17.10")]
    chosen = tools.choose("pg_dump", 17, Match.AT_LEAST, found)
    assert (chosen.path, chosen.version, chosen.major) == (Path("/b/pg_dump"), "18.6", 18)


def test_physical_programs_must_be_exactly_the_major() -> None:
    found = [cand("/b/pg_ctl", "18.6"), cand("/c/pg_ctl", "17.10")]
    assert tools.choose("pg_ctl", 17, tools.match_for("pg_ctl"), found).path == Path("/c/pg_ctl")
    with pytest.raises(ToolError) as err:
        tools.choose("pg_ctl", 16, tools.match_for("pg_ctl"), found)
    assert str(err.value) == ("pg_ctl of PostgreSQL 16 not found (found only 17.10, 18.6) — install PostgreSQL 16 "
                              "(postgresql-16 from the PGDG apt repository on Debian/Ubuntu), or point --pg-bin / "
                              "BACKUP_TOOL_PG_BIN at its bin directory")


def test_too_old_only_names_the_major_needed_and_the_client_package() -> None:
    with pytest.raises(ToolError) as err:
        tools.choose("pg_dump", 18, Match.AT_LEAST, [cand("/usr/bin/pg_dump", "15.18")])
    assert "pg_dump of PostgreSQL 18 or newer not found (found only 15.18)" in str(err.value)
    assert "postgresql-client-18" in str(err.value)


def test_an_explicit_directory_is_never_passed_over() -> None:
    explicit = cand("/opt/pg15/bin/pg_dump", "15.18", Source.EXPLICIT)
    with pytest.raises(ToolError) as err:
        tools.choose("pg_dump", 17, Match.AT_LEAST, [explicit, cand("/usr/bin/pg_dump", "17.10")])
    assert str(err.value).startswith("pg_dump in /opt/pg15/bin is PostgreSQL 15.18; the server needs "
                                     "PostgreSQL 17 or newer — ")


def test_search_order() -> None:
    dirs = tools.search_dirs(16, None, Path("/srv/pg16/bin"), [15, 16, 17, 18], "/usr/local/bin:/usr/bin")
    assert dirs == [(Source.SERVER, Path("/srv/pg16/bin")),
                    (Source.DEBIAN, Path("/usr/lib/postgresql/16/bin")),
                    (Source.DEBIAN, Path("/usr/lib/postgresql/17/bin")),
                    (Source.DEBIAN, Path("/usr/lib/postgresql/18/bin")),
                    (Source.PATH, Path("/usr/local/bin")), (Source.PATH, Path("/usr/bin"))]
    assert tools.search_dirs(16, Path("/x"), Path("/srv"), [16], "/usr/bin") == [(Source.EXPLICIT, Path("/x"))]


def fake_program(directory: Path, name: str, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\necho '{name} (PostgreSQL) {version}'\n")
    path.chmod(0o755)
    return path


def test_find_probes_real_programs_along_path(tmp_path: Path) -> None:
    # Majors no machine has under /usr/lib/postgresql, so only PATH can answer.
    old = fake_program(tmp_path / "old", "pg_restore", "27.4")
    new = fake_program(tmp_path / "new", "pg_restore", "29.2")
    env = {"PATH": f"{old.parent}{os.pathsep}{new.parent}"}
    found = tools.find("pg_restore", 28, env)
    assert (found.path, found.version, found.source) == (new, "29.2", Source.PATH)
    assert tools.find("pg_restore", 27, env).path == old
    with pytest.raises(ToolError):
        tools.find("pg_restore", 30, env)
    with pytest.raises(ToolError) as err:
        tools.find("pg_restore", 28, {**env, "BACKUP_TOOL_PG_BIN": str(tmp_path / "empty")})
    assert str(err.value).startswith(f"pg_restore is not in {tmp_path / 'empty'}")


def test_client_tool_versions_are_probed_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup records the four client tools' versions; each ``--version`` (here half a second
    long) runs beside the others, and a missing one is the error of the first missing."""
    bindir = tmp_path / "bin"
    for n, name in enumerate(tools.CLIENT_TOOLS):
        fake_program(bindir, name, f"27.{n}")
        (bindir / name).write_text(f"#!/bin/sh\nsleep 0.5\necho '{name} (PostgreSQL) 27.{n}'\n")
    monkeypatch.setenv(tools.PG_BIN_ENV, str(bindir))
    started = time.monotonic()
    assert tool_versions(27) == {name: f"27.{n}" for n, name in enumerate(tools.CLIENT_TOOLS)}
    assert time.monotonic() - started < 1.5, "probed one after the other"
    (bindir / "psql").unlink()
    (bindir / "pg_dumpall").unlink()
    with pytest.raises(ToolError, match="^psql is not in"):
        tool_versions(27)


def acl_item(obj: str, *entries: tuple[str, str, str, bool]) -> dict[str, object]:
    return {"object": obj, "acl": [list(e) for e in sorted(entries)]}


def grants(grantee: str, privileges: list[str], grantable: bool = False) -> list[tuple[str, str, str, bool]]:
    return [(grantee, "postgres", p, grantable) for p in privileges]


def test_maintain_is_expected_only_where_the_backup_held_all() -> None:
    inventory = {
        "object_privileges": [
            acl_item("table public.a", *grants("svc", ALL_15), *grants("reader", ["SELECT"])),
            acl_item("materialized view public.m", *grants("svc", ALL_15, grantable=True)),
            acl_item("sequence public.s", *grants("svc", ["USAGE", "SELECT", "UPDATE"])),
            acl_item("table public.b", *grants("almost", ALL_15[:-1])),
        ],
        "default_privileges": [acl_item("for role postgres in schema public on tables", *grants("svc", ALL_15)),
                               acl_item("for role postgres on functions", *grants("svc", ["EXECUTE"]))],
        "comments": [],
    }
    expected, tolerated = majors.expected_inventory(inventory, 15, 17)
    assert tolerated == (majors.Tolerance("maintain_in_all", 3),)
    by_object = {i["object"]: {tuple(e) for e in i["acl"]} for k in ("object_privileges", "default_privileges")
                 for i in expected[k]}
    assert ("svc", "postgres", "MAINTAIN", False) in by_object["table public.a"]
    assert not any(e[0] == "reader" and e[2] == "MAINTAIN" for e in by_object["table public.a"])
    assert ("svc", "postgres", "MAINTAIN", True) in by_object["materialized view public.m"]
    assert ("svc", "postgres", "MAINTAIN", False) in by_object["for role postgres in schema public on tables"]
    for untouched in ("sequence public.s", "table public.b", "for role postgres on functions"):
        assert not any(e[2] == "MAINTAIN" for e in by_object[untouched]), untouched
    assert expected["comments"] is inventory["comments"]
    assert all(not any(e[2] == "MAINTAIN" for e in i["acl"]) for i in inventory["object_privileges"])


@pytest.mark.parametrize("backup_major,target_major", [(15, 15), (15, 16), (17, 18), (18, 17), (16, 15)])
def test_nothing_is_tolerated_without_the_change_that_causes_it(backup_major: int, target_major: int) -> None:
    inventory = {"object_privileges": [acl_item("table public.a", *grants("svc", ALL_15))]}
    assert majors.expected_inventory(inventory, backup_major, target_major) == (inventory, ())
