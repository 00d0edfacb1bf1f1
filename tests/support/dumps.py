"""Dumps of a database and its cluster's roles, normalised for comparison: the fidelity
oracles (tests/validation/test_regression_oracle.py, test_realdb_oracle.py) compare
`pg_dump --create` and `pg_dumpall --globals-only` of a source and of its restore.

Normalised: the database name, pg_dump's random `\\restrict` keys, and the order of rows
inside each COPY block (row order is not part of a table's content). Set
BACKUP_TOOL_ORACLE_DIFF_DIR to keep the dumps and diffs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support.clusters import PgServer


def tool_env(server: PgServer, dbname: str = "postgres") -> dict[str, str]:
    return {**os.environ, **server.libpq_env(dbname)}


def run_tool(server: PgServer, tool: str, *args: str, dbname: str = "postgres") -> str:
    proc = subprocess.run([str(server.bin_dir / tool), *args], env=tool_env(server, dbname),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def psql(server: PgServer, dbname: str, script: str) -> str:
    return run_tool(server, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-c", script, dbname=dbname)


_RESTRICT = re.compile(r"^\\(un)?restrict \S+$")


def normalise_dump(text: str, dbname: str) -> list[str]:
    """pg_dump --create output with the database name replaced by <DB>, \\restrict keys
    blanked, the rows of each COPY block sorted, and blank and bare `--` lines dropped."""
    name_re = re.compile(r'(?<![\w"])("?)' + re.escape(dbname) + r'\1(?![\w"])')
    out: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if block is not None:
            if line == "\\.":
                out.extend(sorted(block))
                out.append(line)
                block = None
            else:
                block.append(line)
            continue
        if not line or line == "--":
            continue
        if _RESTRICT.match(line):
            out.append(line.split()[0] + " <KEY>")
            continue
        if line.startswith("COPY ") and line.endswith("FROM stdin;"):
            block = []
        elif (dbname in line and (line.startswith(("\\connect", "-- Name: ", "CREATE DATABASE", "ALTER DATABASE",
                                                     "COMMENT ON DATABASE", "GRANT ", "REVOKE ", "ALTER ROLE",
                                                     "SECURITY LABEL ON DATABASE", "-- Database ")))):
            line = name_re.sub("<DB>", line)
        out.append(line)
    return out


def dump_database(server: PgServer, dbname: str) -> list[str]:
    return normalise_dump(run_tool(server, "pg_dump", "--create", "--no-sync", dbname=dbname), dbname)


def dump_globals(server: PgServer) -> list[str]:
    text = run_tool(server, "pg_dumpall", "--globals-only", "--no-role-passwords")
    return [ln.split()[0] + " <KEY>" if _RESTRICT.match(ln) else ln for ln in text.splitlines()]


def unexplained_diff(label: str, before: list[str], after: list[str], known_patterns: Sequence[str] = ()) -> list[str]:
    """`diff -u` of the two dumps minus lines matching one of ``known_patterns`` (kept in
    BACKUP_TOOL_ORACLE_DIFF_DIR when set)."""
    keep = os.environ.get("BACKUP_TOOL_ORACLE_DIFF_DIR")
    workdir = Path(keep) if keep else None
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = workdir or Path(tmp)
        a, b = base / f"{label}.source.sql", base / f"{label}.restored.sql"
        a.write_text("\n".join(before) + "\n")
        b.write_text("\n".join(after) + "\n")
        diff = subprocess.run(["diff", "-u", str(a), str(b)], capture_output=True, text=True).stdout
    if workdir:
        (workdir / f"{label}.diff").write_text(diff)
    lines = diff.splitlines()
    first_hunk = next((i for i, ln in enumerate(lines) if ln.startswith("@@")), len(lines))
    changed = [ln for ln in lines[first_hunk:] if ln[:1] in "+-"]
    known = [re.compile(p) for p in known_patterns]
    return [ln for ln in changed if not any(p.search(ln[1:]) for p in known)]


def assert_same_dump(label: str, before: list[str], after: list[str], known_patterns: Sequence[str] = ()) -> None:
    left = unexplained_diff(label, before, after, known_patterns)
    assert not left, f"{label}: {len(left)} differing dump lines, first 120:\n" + "\n".join(left[:120])


def failed_checks(proc: Any) -> list[str]:
    """The failing checks of a `--json` validate or restore run, "name: detail" each."""
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return [f"(no JSON: {proc.stderr.strip()[-300:]})"]
    checks = report.get("checks") or report.get("validation", {}).get("checks", [])
    return [f"{c['name']}: {c.get('detail', '')[:200]}" for c in checks if not c.get("ok")]
