"""Side-by-side benchmark: backup-tool against pg_dump/pg_restore and pgBackRest.

Builds a reproducible database (pgbench at --scale plus 16 wide tables with JSONB, bytea
and text, so an incremental can change 1 of 20 tables), starts the S3 test endpoint (moto
on 127.0.0.1), and measures every scenario --runs times, alternating the contenders inside
each run. Reports the median wall time, throughput (database MB per second) and peak RSS of
each command (the process and all its children, from wait4), then the ratios
backup-tool ÷ contender, as a markdown table with versions and the machine.

Physical scenarios (base backup, PITR restore, WAL archiving vs pgBackRest) run when
`backup-tool backup base` exists and pgBackRest can be installed; pgBackRest only speaks
TLS to S3, so nginx with a self-signed certificate fronts the endpoint for it.

Run as root on a fresh Debian 12 machine (it installs PostgreSQL 15, pgBackRest and nginx
with apt when missing); the cluster runs as the unprivileged `postgres` user.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(argv: list[str], env: dict[str, str] | None = None, check: bool = True, user: str | None = None,
       quiet: bool = True) -> subprocess.CompletedProcess[str]:
    if user and os.geteuid() == 0:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, env=env, check=check, text=True,
                          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE if quiet else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_packages(physical: bool) -> None:
    need = []
    if not (PG_BIN / "pg_ctl").exists():
        need += ["postgresql-15", "postgresql-client-15"]
    if physical and not shutil.which("pgbackrest"):
        need.append("pgbackrest")
    if physical and not shutil.which("nginx"):
        need.append("nginx-light")
    if not shutil.which("openssl") and physical:
        need.append("openssl")
    if need:
        log(f"installing {' '.join(need)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *need], check=True, env=env, stdout=subprocess.DEVNULL)


@dataclass
class Measure:
    seconds: float
    peak_rss_mb: float


def timed(argv: list[str], env: dict[str, str], user: str | None = None) -> Measure:
    """Wall time and peak RSS (process tree, via wait4) of one command; fails loudly."""
    if user and os.geteuid() == 0:
        argv = ["runuser", "-u", user, "--", *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed ({proc.returncode}): {err[-2000:]}")
    return Measure(elapsed, usage.ru_maxrss / 1024)


@dataclass
class Cluster:
    base: Path
    port: int

    @property
    def data(self) -> Path:
        return self.base / "data"

    def dsn(self, db: str = "bench") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def psql(self, sql: str, db: str = "bench") -> str:
        out = sh([str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(db),
                  "-c", sql])
        return out.stdout.strip()

    def ctl(self, *args: str) -> None:
        sh([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", *args],
           user=OS_USER)


def start_cluster(work: Path) -> Cluster:
    base = work / "pg"
    base.mkdir()
    shutil.chown(base, OS_USER)
    cluster = Cluster(base, free_port())
    sh([str(PG_BIN / "initdb"), "-D", str(cluster.data), "-U", "postgres", "-A", "trust", "--no-sync"],
       user=OS_USER)
    conf = {
        "listen_addresses": "'127.0.0.1'", "port": str(cluster.port),
        "unix_socket_directories": f"'{base}'", "shared_buffers": "'512MB'", "max_wal_size": "'4GB'",
        "wal_level": "'replica'", "archive_mode": "'on'", "archive_command": "'/bin/true'",
        "max_wal_senders": "'8'", "checkpoint_timeout": "'30min'", "synchronous_commit": "'off'",
    }
    with open(cluster.data / "postgresql.auto.conf", "a") as fh:
        for k, v in conf.items():
            fh.write(f"{k} = {v}\n")
    with open(cluster.data / "pg_hba.conf", "a") as fh:
        fh.write("host replication all 127.0.0.1/32 trust\n")
    cluster.ctl("start")
    return cluster


WIDE_TABLE = """
CREATE TABLE wide_{n:02d} (
    id bigint PRIMARY KEY, doc jsonb, blob bytea, note text, tags text[], at timestamptz
);
INSERT INTO wide_{n:02d}
SELECT g,
       jsonb_build_object('k', g, 'name', md5(g::text), 'nested', jsonb_build_object('v', g % 97, 's', md5((g * 3)::text))),
       decode(md5(g::text || 'b') || md5(g::text || 'c'), 'hex'),
       repeat(md5((g % 5000)::text), 3),
       ARRAY[md5(g::text), (g % 13)::text],
       timestamptz '2025-01-01' + g * interval '1 second'
  FROM generate_series(1, {rows}) g;
"""


def build_database(cluster: Cluster, scale: int) -> int:
    cluster.psql("CREATE DATABASE bench", db="postgres")
    log(f"pgbench -i -s {scale}")
    sh([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), "-d", cluster.dsn()])
    rows = max(5000, scale * 1500)
    for n in range(1, 17):
        cluster.psql(WIDE_TABLE.format(n=n, rows=rows))
    cluster.psql("VACUUM ANALYZE")
    return int(cluster.psql("SELECT pg_database_size('bench')"))


@dataclass
class S3:
    endpoint: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def new_bucket(self) -> str:
        import boto3

        name = f"bench-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)


def start_s3() -> S3:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    return S3(endpoint, proc, env)


@dataclass
class Row:
    scenario: str
    contender: str
    runs: list[Measure] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(m.seconds for m in self.runs)

    @property
    def rss(self) -> float:
        return max(m.peak_rss_mb for m in self.runs)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, cluster: Cluster, s3: S3, db_bytes: int) -> None:
        self.args = args
        self.work = work
        self.cluster = cluster
        self.s3 = s3
        self.db_bytes = db_bytes
        self.rows: dict[tuple[str, str], Row] = {}
        self.env = {**os.environ, **s3.env, "PGPASSWORD": ""}
        self.tool = [sys.executable, "-m", "backup_tool"]

    def record(self, scenario: str, contender: str, measure: Measure) -> None:
        self.rows.setdefault((scenario, contender), Row(scenario, contender)).runs.append(measure)
        log(f"{scenario:<28} {contender:<44} {measure.seconds:7.2f}s  {measure.peak_rss_mb:6.0f} MB RSS")

    def fresh_db(self, name: str) -> str:
        self.cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", db="postgres")
        self.cluster.psql(f"CREATE DATABASE {name}", db="postgres")
        return self.cluster.dsn(name)

    def run_logical(self, run: int) -> None:
        j = str(self.args.jobs)
        src = self.cluster.dsn()
        dump_file = self.work / "bench.dump"
        dump_dir = self.work / "bench.dir"
        local_repo = self.work / f"repo-{run}"
        bucket = self.s3.new_bucket()
        s3_repo = f"s3://{bucket}/bench"

        steps: list[tuple[str, str, Callable[[], Measure]]] = [
            ("logical full backup", "pg_dump -Fc (local file)",
             lambda: timed([str(PG_BIN / "pg_dump"), "-Fc", "-f", str(dump_file), "-d", src], self.env)),
            ("logical full backup", f"pg_dump -Fd -j {j} (local dir)",
             lambda: (shutil.rmtree(dump_dir, ignore_errors=True),
                      timed([str(PG_BIN / "pg_dump"), "-Fd", "-j", j, "-f", str(dump_dir), "-d", src], self.env))[1]),
            ("logical full backup", "backup-tool backup full (S3)",
             lambda: timed([*self.tool, "backup", "full", "--repo", s3_repo, "--dsn", src, "--jobs", j], self.env)),
            ("logical full backup", "backup-tool backup full (local repo)",
             lambda: timed([*self.tool, "backup", "full", "--repo", str(local_repo), "--dsn", src, "--jobs", j],
                           self.env)),
        ]
        if run % 2:
            steps = steps[::-1]
        for scenario, name, fn in steps:
            self.record(scenario, name, fn())

        restores: list[tuple[str, str, Callable[[], Measure]]] = [
            ("logical full restore", f"pg_restore -j {j} (local file)",
             lambda: timed([str(PG_BIN / "pg_restore"), "-j", j, "-d", self.fresh_db("r_pg"), str(dump_file)], self.env)),
            ("logical full restore", "backup-tool restore full (S3, validated)",
             lambda: timed([*self.tool, "restore", "full", "--repo", s3_repo, "--target-dsn", self.fresh_db("r_bt"),
                            "--jobs", j], self.env)),
            ("logical full restore", "backup-tool restore full (S3, --no-validate)",
             lambda: timed([*self.tool, "restore", "full", "--repo", s3_repo, "--target-dsn", self.fresh_db("r_bt"),
                            "--jobs", j, "--no-validate"], self.env)),
        ]
        if run % 2:
            restores = restores[::-1]
        for scenario, name, fn in restores:
            self.record(scenario, name, fn())

        one = "public.wide_07"
        single: list[tuple[str, str, Callable[[], Measure]]] = [
            ("single table restore", "pg_restore -t wide_07",
             lambda: timed([str(PG_BIN / "pg_restore"), "-n", "public", "-t", "wide_07", "-d", self.fresh_db("r_one"),
                            str(dump_file)], self.env)),
            ("single table restore", "backup-tool restore tables (S3)",
             lambda: timed([*self.tool, "restore", "tables", "--repo", s3_repo, "--tables", one, "--target-dsn",
                            self.fresh_db("r_one")], self.env)),
        ]
        if run % 2:
            single = single[::-1]
        for scenario, name, fn in single:
            self.record(scenario, name, fn())

        self.cluster.psql("UPDATE wide_07 SET note = upper(note) WHERE id % 10 = 0")
        self.record("incremental (1 of 20 changed)", "backup-tool backup incremental (S3)",
                    timed([*self.tool, "backup", "incremental", "--repo", s3_repo, "--dsn", src, "--jobs", j], self.env))
        listing = json.loads(subprocess.run([*self.tool, "list", "--repo", s3_repo, "--json"], env=self.env,
                                            capture_output=True, text=True, check=True).stdout)
        full_bytes = next(e["size_bytes"] for e in listing if e["kind"] == "full")
        incr_bytes = next(e["size_bytes"] for e in listing if e["kind"] == "incremental")
        self.sizes = getattr(self, "sizes", {})
        self.sizes.update({"full backup bytes (S3)": full_bytes, "incremental bytes (S3)": incr_bytes,
                           "pg_dump -Fc bytes": dump_file.stat().st_size})
        self.s3.drop_bucket(bucket)
        shutil.rmtree(local_repo, ignore_errors=True)

    def report(self) -> str:
        mb = self.db_bytes / 2**20
        lines = [
            "# backup-tool benchmark",
            "",
            f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.platform()}",
            f"- PostgreSQL: {sh([str(PG_BIN / 'postgres'), '--version']).stdout.strip()}",
            f"- database: pgbench scale {self.args.scale} + 16 wide tables = {mb:.0f} MB; runs: {self.args.runs}"
            f" (median), jobs: {self.args.jobs}; S3: moto server on 127.0.0.1",
            "",
            "| scenario | contender | median s | DB MB/s | peak RSS MB |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for row in self.rows.values():
            lines.append(f"| {row.scenario} | {row.contender} | {row.seconds:.2f} | {mb / row.seconds:.0f} | {row.rss:.0f} |")
        lines += ["", "| ratio (backup-tool ÷ contender) | value |", "| --- | ---: |"]
        for scenario in dict.fromkeys(r.scenario for r in self.rows.values()):
            ours = [r for r in self.rows.values() if r.scenario == scenario and r.contender.startswith("backup-tool")]
            theirs = [r for r in self.rows.values() if r.scenario == scenario and not r.contender.startswith("backup-tool")]
            for a in ours:
                for b in theirs:
                    lines.append(f"| {a.contender} ÷ {b.contender} | {a.seconds / b.seconds:.2f} |")
        if getattr(self, "sizes", None):
            lines += ["", "| stored size | bytes |", "| --- | ---: |"]
            lines += [f"| {k} | {v} |" for k, v in self.sizes.items()]
        return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (50 ≈ 750 MB in all)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (median reported)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel jobs for every contender")
    parser.add_argument("--out", default=str(ROOT / "bench-results.md"), help="markdown report path")
    parser.add_argument("--logical-only", action="store_true", help="skip the physical (pgBackRest) scenarios")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("scripts/bench runs as root (it installs packages and runs PostgreSQL as 'postgres')", file=sys.stderr)
        return 2
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        ensure_packages(False)
    ensure_packages(not args.logical_only)
    work = Path(tempfile.mkdtemp(prefix="bt-bench-", dir="/tmp"))
    work.chmod(0o755)
    cluster = start_cluster(work)
    s3 = start_s3()
    try:
        db_bytes = build_database(cluster, args.scale)
        log(f"database ready: {db_bytes / 2**20:.0f} MB")
        bench = Bench(args, work, cluster, s3, db_bytes)
        for run in range(args.runs):
            log(f"run {run + 1}/{args.runs}")
            bench.run_logical(run)
        report = bench.report()
        Path(args.out).write_text(report)
        print(report)
        return 0
    finally:
        s3.proc.terminate()
        try:
            cluster.ctl("stop", "-m", "fast")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
