"""``latest`` in a repository holding several databases, refused ``--create`` restores, and
the stderr of refusals, through the real CLI (stdin closed, stderr not a terminal).

- ``latest`` is the newest backup of the database named by ``--database`` or the DSN; with
  several databases and none named every command refuses in one line (exit 2), and every
  restore says which database, backup and moment it brought back.
- A ``restore full --create`` refused before loading drops the database it created, and
  never a database it did not create.
- A refusal prints exactly its one error line on stderr; a successful run prints nothing
  there unless ``BACKUP_TOOL_LOG=json`` asks for milestones.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
from clioutput import only_line
from support.cli import Cli
from support.clusters import DbHandle, PgServer

pytestmark = pytest.mark.slow


@dataclass
class TwoDatabases:
    repo: str
    app: DbHandle
    bench: DbHandle
    app_id: str
    bench_id: str
    entries: dict[str, dict[str, Any]]


def exists(server: PgServer, name: str) -> bool:
    with server.admin_conn() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


@pytest.fixture
def targets(pg_server: PgServer) -> Iterator[Callable[[str], str]]:
    """Names for restore targets (not created here); whatever exists afterwards is dropped."""
    names: list[str] = []

    def make(prefix: str) -> str:
        names.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield make
    for name in names:
        pg_server.drop_db(name)


@pytest.fixture
def two_dbs(cli: Cli, local_repo: str, seed_copy: Callable[[str], DbHandle],
            fresh_db: Callable[[str], DbHandle]) -> TwoDatabases:
    """The seed as ``app`` backed up first, then a pgbench-like ``bench``: ``bench`` is the
    repository's newest backup, the trap an unqualified ``latest`` fell into."""
    app = seed_copy("app")
    bench = fresh_db("bench")
    bench.execute("CREATE TABLE public.pgbench_accounts (aid int PRIMARY KEY, bid int NOT NULL, "
                  "abalance int NOT NULL, filler char(84))")
    bench.execute("INSERT INTO public.pgbench_accounts SELECT g, g % 10, 0, '' FROM generate_series(1, 5000) g")
    app_id = cli.json("backup", "full", "--repo", local_repo, "--dsn", app.dsn)["id"]
    bench_id = cli.json("backup", "full", "--repo", local_repo, "--dsn", bench.dsn)["id"]
    entries = {e["id"]: e for e in cli.json("list", "--repo", local_repo)}
    return TwoDatabases(local_repo, app, bench, app_id, bench_id, entries)


def test_latest_never_crosses_databases(cli: Cli, pg_server: PgServer, two_dbs: TwoDatabases,
                                        targets: Callable[[str], str]) -> None:
    w = two_dbs
    unnamed = targets("app_dr")
    proc = cli("restore", "full", "--repo", w.repo, "--backup", "latest", "--target-dsn", pg_server.dsn(unnamed),
               "--create")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = only_line(proc)
    assert "--database" in line and w.app.name in line and w.bench.name in line
    assert not exists(pg_server, unnamed)

    for args in (["show", "latest"], ["verify", "latest"],
                 ["validate", "--dsn", pg_server.dsn("postgres"), "--against", "latest"],
                 ["restore", "tables", "--tables", "public.pgbench_accounts", "--target-dsn",
                  pg_server.dsn(unnamed)]):
        proc = cli(*args, "--repo", w.repo)
        assert proc.returncode == 2 and "ambiguous" in only_line(proc), (args, proc.stdout, proc.stderr)
        assert "--backup" not in only_line(proc) or args[0] == "restore", (args, "hint names an option it lacks")

    by_option = targets("app_dr")
    result = cli.json("restore", "full", "--repo", w.repo, "--backup", "latest", "--database", w.app.name,
                      "--target-dsn", pg_server.dsn(by_option), "--create")
    app_entry = w.entries[w.app_id]
    assert (result["database"], result["backup_id"], result["snapshot_at"], result["backup_finished_at"],
            result["ok"]) == (w.app.name, w.app_id, app_entry["started_at"], app_entry["finished_at"], True)
    assert DbHandle(pg_server, by_option).scalar("SELECT count(*) FROM public.coupons") == \
        w.app.scalar("SELECT count(*) FROM public.coupons")

    by_dsn = targets("app_dr")
    proc = cli("restore", "full", "--repo", w.repo, "--target-dsn", pg_server.dsn(by_dsn), "--create",
               env={"DATABASE_URL": w.app.dsn})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    snapshot = app_entry["started_at"][:19] + "Z"  # human text shows times to the second
    assert f"restored database {w.app.name} from backup {w.app_id} (snapshot of {snapshot}" \
        in proc.stdout and "verdict: OK" in proc.stdout

    assert cli.json("show", "latest", "--repo", w.repo, "--database", w.bench.name)["id"] == w.bench_id
    assert cli.json("show", "latest", "--repo", w.repo, "--dsn", w.app.dsn)["id"] == w.app_id
    verified = cli.json("verify", "latest", "--repo", w.repo, "--database", w.app.name)
    assert verified["ok"] and w.app_id in json.dumps(verified) and w.bench_id not in json.dumps(verified)
    assert cli.json("validate", "--repo", w.repo, "--dsn", pg_server.dsn(by_option), "--against", "latest",
                    "--database", w.app.name)["ok"] is True
    said = cli("validate", "--repo", w.repo, "--dsn", pg_server.dsn(by_option), "--against", "latest",
               "--database", w.app.name)
    assert said.returncode == 0 and said.stdout.startswith(
        f"compared postgres@127.0.0.1:{pg_server.port}/{by_option} with backup {w.app_id} of database "
        f"{w.app.name} (taken {snapshot})"), said.stdout

    tables_target = targets("bench_tables")
    pg_server.create_db(tables_target)
    tables = cli.json("restore", "tables", "--repo", w.repo, "--tables", "public.pgbench_accounts",
                      "--database", w.bench.name, "--target-dsn", pg_server.dsn(tables_target))
    assert (tables["database"], tables["backup_id"], tables["rows"]) == (w.bench.name, w.bench_id, 5000)

    proc = cli("restore", "full", "--repo", w.repo, "--backup", w.bench_id, "--database", w.app.name,
               "--target-dsn", pg_server.dsn(targets("app_dr")), "--create")
    assert proc.returncode == 2 and w.bench_id in only_line(proc)
    proc = cli("show", "latest", "--repo", w.repo, "--database", "shop")
    assert proc.returncode == 1 and "'shop'" in only_line(proc)


def test_refused_create_leaves_the_server_as_it_found_it(cli: Cli, pg_server: PgServer, local_repo: str,
                                                         fresh_db: Callable[[str], DbHandle],
                                                         seed_copy: Callable[[str], DbHandle],
                                                         targets: Callable[[str], str]) -> None:
    role = f"bt_owner_{uuid.uuid4().hex[:8]}"
    src = fresh_db("owned")
    with pg_server.admin_conn() as conn:
        conn.execute(f'CREATE ROLE "{role}"')
    src.execute("CREATE TABLE public.ledger (id bigint PRIMARY KEY, amount numeric(12,2) NOT NULL)")
    src.execute("INSERT INTO public.ledger SELECT g, g * 1.5 FROM generate_series(1, 100) g")
    src.execute(f'ALTER TABLE public.ledger OWNER TO "{role}"')
    backup_id = cli.json("backup", "full", "--repo", local_repo, "--dsn", src.dsn)["id"]
    pg_server.drop_db(src.name)
    with pg_server.admin_conn() as conn:
        conn.execute(f'DROP ROLE "{role}"')

    created = targets("roles_dr")
    proc = cli("restore", "full", "--repo", local_repo, "--backup", backup_id, "--target-dsn",
               pg_server.dsn(created), "--create")
    assert proc.returncode == 1, proc.stderr
    assert not exists(pg_server, created)
    assert role in only_line(proc)

    missing = targets("missing")
    proc = cli("restore", "full", "--repo", local_repo, "--backup", backup_id, "--target-dsn", pg_server.dsn(missing))
    assert proc.returncode == 1 and missing in only_line(proc), proc.stderr
    assert not exists(pg_server, missing)

    occupied = seed_copy("occupied")
    coupons = occupied.scalar("SELECT count(*) FROM public.coupons")
    proc = cli("restore", "full", "--repo", local_repo, "--backup", backup_id, "--target-dsn", occupied.dsn,
               "--create")
    assert proc.returncode == 1 and "not empty" in only_line(proc), proc.stderr
    assert occupied.scalar("SELECT count(*) FROM public.coupons") == coupons


def test_milestones_on_stderr_only_when_logs_are_asked_for(cli: Cli, pg_server: PgServer, local_repo: str,
                                                           fresh_db: Callable[[str], DbHandle],
                                                           targets: Callable[[str], str]) -> None:
    src = fresh_db("small")
    src.execute("CREATE TABLE public.t (id int PRIMARY KEY)")
    src.execute("INSERT INTO public.t SELECT generate_series(1, 10)")
    quiet = cli("backup", "full", "--repo", local_repo, "--dsn", src.dsn, "--json")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    target = targets("logged")
    logged = cli("restore", "full", "--repo", local_repo, "--target-dsn", pg_server.dsn(target), "--create",
                 env={"BACKUP_TOOL_LOG": "json"})
    assert logged.returncode == 0, logged.stderr
    events = [json.loads(line)["event"] for line in logged.stderr.splitlines()]
    assert events[:3] == ["database created", "restore started", "schema created"] and "restore finished" in events
