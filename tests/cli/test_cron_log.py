"""The crontab `schedule` prints, run as cron would: every line its jobs append to the log
file is one JSON document (the `--json` result on one line, milestones and the error as JSON
lines on stderr), on success and on failure (issue 13)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from support.cli import Cli
from support.clusters import DbHandle

pytestmark = pytest.mark.slow


def crontab_jobs(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(environment lines, {job name: shell command}) of a crontab as `schedule` prints it."""
    env: dict[str, str] = {}
    jobs: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if m := re.match(r"# (\S+): ", line):
            name = m.group(1)
        elif m := re.match(r"([A-Z_]+)=(.*)$", line):
            env[m.group(1)] = m.group(2)
        elif line.strip() and not line.startswith("#"):
            jobs[name] = line.split(None, 5)[5].replace("\\%", "%")
    return env, jobs


def run_job(command: str, env: dict[str, str]) -> int:
    """Run a crontab command line as cron does (its exit code is that of the last command)."""
    return subprocess.run(["/bin/sh", "-c", command], env=env, stdin=subprocess.DEVNULL, timeout=300).returncode


def test_the_cron_log_is_json_lines_on_success_and_failure(cli: Cli, fresh_db: Callable[[str], DbHandle],
                                                           tmp_path: Path) -> None:
    db = fresh_db("cronlog")
    db.execute("CREATE TABLE items (id int PRIMARY KEY, note text)")
    db.execute("INSERT INTO items SELECT g, 'line ' || g || E'\\nsecond line' FROM generate_series(1, 50) g")
    repo, log = tmp_path / "repo", tmp_path / "log" / "backup-tool.log"
    log.parent.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "backup-tool"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m backup_tool \"$@\"\n")
    exe.chmod(0o755)
    crontab = cli("schedule", "--format", "cron", "--repo", repo, "--dsn", db.dsn, "--log-file", log,
                  "--textfile", tmp_path / "backup_tool.prom",
                  env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert crontab.returncode == 0, crontab.stderr
    cron_env, jobs = crontab_jobs(crontab.stdout)
    assert cron_env["BACKUP_TOOL_LOG"] == "json" and set(jobs) == {"run-due", "maintenance"}
    assert all(command.startswith(f"{exe} ") for command in jobs.values()), jobs
    env = {**cli.base_env(), **cron_env}

    run_job(jobs["run-due"], {**env, "PGPASSWORD": "not-the-password"})
    failed = [json.loads(line) for line in log.read_text().splitlines()]
    run_job(jobs["run-due"], {**env, "PGPASSWORD": db.server.password})
    assert run_job(jobs["maintenance"], {**env, "PGPASSWORD": db.server.password}) == 0

    lines = log.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"line {number} of the cron log is not JSON: {line!r}\n" + "\n".join(lines))
    assert all(isinstance(r, dict) for r in records)
    error_doc = [r for r in failed if "exit_code" in r and "level" not in r]
    error_log = [r for r in failed if r.get("level") == "error"]
    assert len(error_doc) == 1 and error_doc[0]["ok"] is False and error_doc[0]["exit_code"] == 1
    assert "password authentication failed" in error_doc[0]["error"]
    assert len(error_log) == 1 and error_log[0]["event"] == error_doc[0]["error"]
    results = [r for r in records[len(failed):] if "level" not in r]
    assert [sorted(r)[:1] for r in results] and len(results) == 3, results
    taken = results[0]["taken"]
    assert [t["kind"] for t in taken] == ["full"]
    assert set(results[1]) >= {"deleted", "kept"} and taken[0]["id"] in results[1]["kept"]
    assert results[2]["ok"] is True
    assert any(r.get("event") == "backup finished" for r in records)
    assert "not-the-password" not in log.read_text() and db.server.password not in log.read_text()
    assert os.environ.get("BACKUP_TOOL_LOG") is None
