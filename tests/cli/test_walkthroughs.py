"""README's incident walk-throughs, run exactly as written.

Each block marked ``<!-- walkthrough: NAME; set: VAR ... -->`` in README.md is run by bash
(``-e -o pipefail``: any failing command fails the walk-through) against one throwaway
cluster loaded with the seed, archiving its WAL to ``s3://acme-backups/prod`` on the test
S3 server (the bucket the README names), with ``backup-tool`` and ``psql`` on PATH and only
the variables the README tells the operator to set. The outcome is checked independently:
the table or database is back as it was, compared by content hashes."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import dbcompare
import pytest
from server_tool import install_source, write_wrapper
from support.cli import Cli
from support.clusters import PgServer, run_sql, start_pg_server, switch_and_wait_archived
from support.paths import REPO_ROOT, SEED_FILES
from support.s3 import S3Server

pytestmark = pytest.mark.slow

BUCKET = "acme-backups"
REPO = f"s3://{BUCKET}/prod"
MARKER = re.compile(r"<!-- walkthrough: ([\w-]+); set: ([A-Z_ ]+) -->\n```bash\n(.*?)```", re.S)


@dataclass(frozen=True)
class Walkthrough:
    name: str
    needs: frozenset[str]
    script: str


def walkthroughs() -> dict[str, Walkthrough]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return {m[1]: Walkthrough(m[1], frozenset(m[2].split()), m[3]) for m in MARKER.finditer(text)}


@dataclass
class Stage:
    server: PgServer
    cli: Cli
    bin_dir: Path
    full_id: str

    def run(self, walk: Walkthrough, **values: str) -> subprocess.CompletedProcess[str]:
        """The block under bash with only what the README says to set (plus AWS credentials)."""
        assert set(values) == walk.needs, f"the README says to set {sorted(walk.needs)}"
        env = self.cli.base_env()
        env["PATH"] = os.pathsep.join([str(self.bin_dir), str(self.server.bin_dir), env.get("PATH", "")])
        env.update(values)
        return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", walk.script], env=env, cwd=self.cli.workdir,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stage(s3_server: S3Server) -> Iterator[Stage]:
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    base = Path(tempfile.mkdtemp(prefix="backup-tool-walkthrough-", dir="/tmp"))
    base.chmod(0o755)
    archiver = write_wrapper(base / "server-bin" / "backup-tool", install_source(base / "src"),
                             {**s3_server.env, "BACKUP_TOOL_REPO": REPO})
    shim = base / "bin" / "backup-tool"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m backup_tool \"$@\"\n")
    shim.chmod(0o755)
    server = start_pg_server({"archive_mode": "on", "archive_command": f"{archiver} wal push %p"})
    workdir = base / "cli"
    workdir.mkdir()
    cli = Cli(workdir=workdir)
    try:
        server.create_db("app")
        server.load_sql("app", list(SEED_FILES))
        env = {"BACKUP_TOOL_REPO": REPO}
        full = cli.json("backup", "full", "--dsn", server.dsn("app"), env=env)
        cli.json("backup", "base", "--dsn", server.dsn("app"), env=env)
        yield Stage(server, cli, shim.parent, full["id"])
    finally:
        server.pg_ctl("-m", "immediate", "-w", "stop", check=False)  # a fast stop would archive what is left
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=BUCKET):
            if page.get("Contents"):
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": o["Key"]} for o in page["Contents"]]})
        client.delete_bucket(Bucket=BUCKET)


def test_readme_marks_the_incident_walkthroughs() -> None:
    assert set(walkthroughs()) == {"restore-full", "restore-tables", "pitr-tables"}
    for walk in walkthroughs().values():
        used = set(re.findall(r"\$\{?([A-Z_]+)", walk.script))
        assert used <= walk.needs | {"BACKUP_TOOL_REPO"}, f"{walk.name} uses {sorted(used - walk.needs)} unannounced"


def test_database_gone_restore_full(stage: Stage) -> None:
    before = dbcompare.table_hashes(stage.server.dsn("app"))
    done = stage.run(walkthroughs()["restore-full"], NEW_DATABASE_URL=stage.server.dsn("app_restored"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verdict: OK" in done.stdout + done.stderr
    assert stage.full_id in done.stdout  # the list the operator reads first
    assert dbcompare.table_hashes(stage.server.dsn("app_restored")) == before


def test_rows_deleted_restore_tables_from_the_backup(stage: Stage) -> None:
    dsn = stage.server.dsn("app")
    before = dbcompare.table_hashes(dsn)
    # every client has projects (a foreign key forbids deleting them): the damage is an UPDATE
    damaged = run_sql(stage.server, "app", "WITH d AS (UPDATE public.crm_clients SET notes = 'overwritten', phone = NULL "
                                       "RETURNING 1) SELECT count(*) FROM d")[0]
    assert damaged > 0 and dbcompare.table_hashes(dsn)["public.crm_clients"] != before["public.crm_clients"]
    done = stage.run(walkthroughs()["restore-tables"], DATABASE_URL=dsn, BACKUP=stage.full_id)
    assert done.returncode == 0, done.stderr[-3000:]
    after = dbcompare.table_hashes(dsn)
    assert after.pop("incident_1403.crm_clients") == before["public.crm_clients"]
    assert after == before


def test_delete_minutes_ago_point_in_time_table_recovery(stage: Stage) -> None:
    dsn = stage.server.dsn("app")
    expected = dbcompare.table_hashes(dsn)
    time.sleep(0.3)
    moment = run_sql(stage.server, "app", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                      "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0]
    # The archive's coverage ends when its last segment was stored, and S3 keeps that time in
    # whole seconds: archived a second or more after `moment`, the segment covers it.
    time.sleep(1.0)
    assert run_sql(stage.server, "app", "WITH d AS (DELETE FROM public.payments RETURNING 1) SELECT count(*) FROM d")[0] > 0
    switch_and_wait_archived(stage.server)
    done = stage.run(walkthroughs()["pitr-tables"], DATABASE_URL=dsn, BEFORE=moment)
    assert done.returncode == 0, done.stderr[-3000:]
    after = dbcompare.table_hashes(dsn)
    assert after.pop("recovered.payments") == expected["public.payments"]
    assert after == expected
