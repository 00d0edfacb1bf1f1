"""Side-by-side benchmark: backup-tool against pg_dump/pg_restore and pgBackRest.

Builds a reproducible database (pgbench at --scale plus 16 wide tables with JSONB, bytea
and text, so an incremental can change 1 of 20 tables), starts the S3 test endpoint (moto
on 127.0.0.1), and measures every scenario --runs times, alternating the contenders inside
each run. Reports the median wall time, throughput (database MB per second) and peak RSS of
each command (the process and all its children, from wait4), then the ratios
backup-tool ÷ contender, as a markdown table with versions and the machine.

During the logical scenarios the cluster archives its WAL into the S3 repository the logical
backups go to (`wal push`), and the incremental is taken right after the full backups and
the change of one table, so it may learn the changed tables from the archived WAL; the
report notes which method each incremental used. Restore full and restore tables are timed
from the S3 repository and from the local one: pg_restore reads a local file, so the local
rows compare like with like and the S3 rows add the endpoint's cost.

Physical scenarios (base backup, PITR restore, WAL archiving vs pgBackRest) run when
`backup-tool backup base` exists and pgBackRest can be installed; pgBackRest only speaks
TLS to S3, so nginx with a self-signed certificate fronts the endpoint for it.

`--large-table` builds instead a database dominated by one table (a pgbench_accounts-like
table with a primary key and a wide filler, about 60 MB per --scale unit: 3 GB at 50) and
times backup full and restore full (validated) against pg_dump -Fc, pg_dump -Fd -j N and
pg_restore -j N, with the table split into parts (policy backup.split_table_mb, default) and
unsplit (split_table_mb = 0) in the same run.

`--many-tables N` builds instead a database of N small tables (in 10 schemas, each with a
serial primary key, an index, numeric, timestamptz and jsonb columns and 20-69 rows: a
schema-per-tenant application) and times backup full (S3 and a local repository) and
restore full (validated) against pg_dump -Fc, pg_dump -Fd -j N and pg_restore -j N: the
per-table costs (objects, sessions, locks) rather than the bytes.

`--curve 50,200` runs the scenarios at each scale (--runs at the first, one run at the
others; table PITR is left out) and adds the time per GB and peak RSS of every row at every
size to the markdown, with a PNG plot beside it (matplotlib, installed with pip if missing:
a bench-only dependency).

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
import signal
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
WAL_SEGMENTS = 32
PITR_TABLE = "wide_01"
RESTORE_TARGETS = ("r_pg", "r_bt", "r_one")  # the databases Bench.fresh_db makes for restores
SCRATCH_PREFIX = "backup-tool-tables-at-"  # backup_tool.jobs.table_pitr.SCRATCH_PREFIX
PITR_FULL = "backup-tool restore tables --target-time --full-layout (whole base backup)"
PITR_PARTIAL = "backup-tool restore tables --target-time (partial lay-out)"


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


def ensure_packages(physical: bool, barman: bool = False) -> None:
    need = []
    if not (PG_BIN / "pg_ctl").exists():
        need += ["postgresql-15", "postgresql-client-15"]
    if physical and not shutil.which("pgbackrest"):
        need.append("pgbackrest")
    if physical and not shutil.which("nginx"):
        need.append("nginx-light")
    if not shutil.which("openssl") and physical:
        need.append("openssl")
    if not subprocess.run(["/usr/bin/python3", "-c", "import venv, ensurepip"],
                          capture_output=True).returncode == 0:
        need.append("python3-venv")  # backup-tool's venv for the server's archive_command
    if barman and not shutil.which("barman-cloud-backup"):
        need.append("barman-cli-cloud")
    if need:
        log(f"installing {' '.join(need)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        optional = [p for p in need if p == "barman-cli-cloud"]
        required = [p for p in need if p not in optional]
        if required:
            subprocess.run(["apt-get", "install", "-y", "-qq", *required], check=True, env=env,
                           stdout=subprocess.DEVNULL)
        if optional and subprocess.run(["apt-get", "install", "-y", "-qq", *optional], env=env,
                                       stdout=subprocess.DEVNULL).returncode != 0:
            log(f"could not install {' '.join(optional)}; barman-cloud-backup is skipped")


@dataclass
class Measure:
    seconds: float
    peak_rss_mb: float


def after(prepare: Callable[[], object], run: Callable[[], Measure]) -> Measure:
    """``run()`` once ``prepare()`` has set the stage (outside the measured time)."""
    prepare()
    return run()


def timed(argv: list[str], env: dict[str, str], user: str | None = None) -> Measure:
    """Wall time and peak RSS (process tree, via wait4) of one command; fails loudly."""
    if user and os.geteuid() == 0:
        argv = ["runuser", "-u", user, "--", *argv]
    with tempfile.TemporaryFile() as errfile:  # a file, not a pipe: a chatty command cannot block on it
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errfile)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
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
    cluster.psql("DROP DATABASE IF EXISTS bench WITH (FORCE)", db="postgres")
    cluster.psql("CREATE DATABASE bench", db="postgres")
    log(f"pgbench -i -s {scale}")
    sh([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), "-d", cluster.dsn()])
    rows = max(5000, scale * 1500)
    for n in range(1, 17):
        cluster.psql(WIDE_TABLE.format(n=n, rows=rows))
    cluster.psql("VACUUM ANALYZE")
    return int(cluster.psql("SELECT pg_database_size('bench')"))


LARGE_ROWS_PER_SCALE = 200_000  # about 60 MB of heap per scale unit
LARGE_TABLE = "big_accounts"
LARGE_FILL = """
INSERT INTO big_accounts
SELECT g, 1 + g % {branches}, (g % 10007) - 5000,
       md5(g::text) || md5((g * 7)::text) || repeat(md5((g % 1000)::text), 5)
  FROM generate_series({start}, {stop}) g;
"""


def build_large_table(cluster: Cluster, scale: int, jobs: int) -> int:
    """A database dominated by one pgbench_accounts-like table (primary key, wide filler that
    compresses about 3:1), filled by ``jobs`` sessions at once; a small branches table beside it."""
    cluster.psql("DROP DATABASE IF EXISTS bench WITH (FORCE)", db="postgres")
    cluster.psql("CREATE DATABASE bench", db="postgres")
    branches = max(1, scale)
    cluster.psql(f"CREATE TABLE big_branches (bid int PRIMARY KEY, bbalance int NOT NULL, filler text);"
                 f"INSERT INTO big_branches SELECT g, 0, md5(g::text) FROM generate_series(1, {branches}) g;"
                 f"CREATE TABLE {LARGE_TABLE} (aid bigint NOT NULL, bid int NOT NULL, abalance int NOT NULL,"
                 " filler text NOT NULL) WITH (fillfactor = 100)")
    rows = scale * LARGE_ROWS_PER_SCALE
    log(f"filling {LARGE_TABLE}: {rows} rows in {jobs} sessions")
    cuts = [rows * i // jobs for i in range(jobs + 1)]
    fills = [subprocess.Popen([str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", cluster.dsn(), "-c",
                               LARGE_FILL.format(branches=branches, start=cuts[i] + 1, stop=cuts[i + 1])])
             for i in range(jobs) if cuts[i + 1] > cuts[i]]
    if any(p.wait() != 0 for p in fills):
        raise RuntimeError(f"filling {LARGE_TABLE} failed")
    cluster.psql(f"ALTER TABLE {LARGE_TABLE} ADD PRIMARY KEY (aid)")
    cluster.psql("VACUUM ANALYZE")
    return int(cluster.psql("SELECT pg_database_size('bench')"))


def build_many_tables(cluster: Cluster, tables: int) -> int:
    """``tables`` small tables in 10 schemas (see the module docstring), 200 per transaction."""
    cluster.psql("DROP DATABASE IF EXISTS bench WITH (FORCE)", db="postgres")
    cluster.psql("CREATE DATABASE bench", db="postgres")
    cluster.psql("; ".join(f"CREATE SCHEMA tenant_{s}" for s in range(10)))
    log(f"creating {tables} tables")
    for start in range(0, tables, 200):
        cluster.psql("BEGIN; " + " ".join(
            f"CREATE TABLE tenant_{i % 10}.t_{i} (id serial PRIMARY KEY, name text NOT NULL, amount numeric(12,2),"
            f" created timestamptz NOT NULL DEFAULT now(), note jsonb); CREATE INDEX ON tenant_{i % 10}.t_{i} (created);"
            f" INSERT INTO tenant_{i % 10}.t_{i} (name, amount, note) SELECT 'n' || g, g * 1.5,"
            f" jsonb_build_object('g', g) FROM generate_series(1, {20 + i % 50}) g;"
            for i in range(start, min(tables, start + 200))) + " COMMIT;")
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
            if keys := [{"Key": obj["Key"]} for obj in page.get("Contents", [])]:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
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
class Nginx:
    port: int
    proc: subprocess.Popen[bytes]
    version: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nginx(work: Path, upstream: str) -> Nginx:
    """nginx with a self-signed certificate on a free loopback port, proxying to ``upstream``
    (moto's plain-HTTP endpoint) without buffering: pgBackRest only speaks TLS to S3."""
    d = work / "nginx"
    (d / "tmp").mkdir(parents=True)
    (d / "tmp").chmod(0o777)
    sh(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
        "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")])
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(f"""worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    upstream moto {{
        server {upstream.removeprefix("http://")};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 600s;
        proxy_send_timeout 600s;
        location / {{
            proxy_pass http://moto;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    version = sh(["nginx", "-v"]).stderr.strip().removeprefix("nginx version: ")
    nginx = Nginx(port, proc, version)
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited ({proc.returncode}): {(d / 'error.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return nginx
        except OSError:
            time.sleep(0.1)
    nginx.stop()
    raise RuntimeError(f"nginx did not listen on {port}")


def chown_tree(path: Path, user: str = OS_USER) -> None:
    shutil.chown(path, user, user)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(Path(root) / name, user, user)


def quote_sql(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass
class Row:
    scenario: str
    contender: str
    runs: list[Measure] = field(default_factory=list)
    segments: int | None = None  # a WAL-archiving row: report segments per second, not DB MB/s

    @property
    def seconds(self) -> float:
        return statistics.median(m.seconds for m in self.runs)

    @property
    def rss(self) -> float:
        return max(m.peak_rss_mb for m in self.runs)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, cluster: Cluster, s3: S3, db_bytes: int,
                 scale: int, runs: int) -> None:
        self.args = args
        self.scale = scale
        self.runs = runs
        self.work = work
        self.cluster = cluster
        self.s3 = s3
        self.db_bytes = db_bytes
        self.rows: dict[tuple[str, str], Row] = {}
        self.tmp = work / "tmp"  # the tool's TMPDIR: settle waits for this bench's scratch directories only
        self.tmp.mkdir(exist_ok=True)
        self.tmp.chmod(0o1777)
        self.env = {**os.environ, **s3.env, "PGPASSWORD": "", "TMPDIR": str(self.tmp)}
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure the tool as installed: bytecode cached
        self.tool = [sys.executable, "-m", "backup_tool"]
        self.nginx: Nginx | None = None
        self.versions: dict[str, str] = {}
        self.notes: list[str] = []
        self.sizes: dict[str, int] = {}
        self.live_pgdata: list[Path] = []
        self.server_tool: Path | None = None
        self.pitr_repo: str | None = None

    def carry_over(self, previous: "Bench") -> None:
        """Reuse what the previous scale's bench set up once (nginx, the server's backup-tool,
        WAL segments of this cluster): a curve rebuilds the database, not the machinery."""
        for name in ("nginx", "server_tool", "scratch", "wal_segments"):
            if hasattr(previous, name):
                setattr(self, name, getattr(previous, name))
        self.versions.update(previous.versions)
        previous.nginx = None  # closed by this bench from now on

    def settle(self) -> None:
        """Start every measurement from the same state: the previous step's dirty pages
        written out (a checkpoint), the OS caches' dirty data on disk and the scratch
        directories a table PITR hands to a detached ``rm -rf`` gone, so no contender pays
        for another's writes or removals (the partial lay-out's run right after the whole
        lay-out's, whose 5 GB were still being unlinked, took 3.60 s against 3.09 s when
        it ran first). The previous restore's target database is dropped first: autovacuum
        would otherwise work on it during the next measurement (after ``pg_restore -j 2``
        of scale 50: a VACUUM of pgbench_accounts setting hint bits and freezing every page,
        0.8 s of CPU over 20 s, plus an ANALYZE of every table, 1.2 s of CPU), charging one
        contender with another's aftermath."""
        for name in RESTORE_TARGETS:
            self.cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", db="postgres")
        self.cluster.psql("CHECKPOINT", db="postgres")
        deadline = time.monotonic() + 300
        while any(self.tmp.glob(SCRATCH_PREFIX + "*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.sync()

    def record(self, scenario: str, contender: str, measure: Measure, segments: int | None = None) -> None:
        self.rows.setdefault((scenario, contender), Row(scenario, contender, segments=segments)).runs.append(measure)
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
             lambda: after(lambda: shutil.rmtree(dump_dir, ignore_errors=True),
                           lambda: timed([str(PG_BIN / "pg_dump"), "-Fd", "-j", j, "-f", str(dump_dir), "-d", src],
                                         self.env))),
            ("logical full backup", "backup-tool backup full (S3)",
             lambda: timed([*self.tool, "backup", "full", "--repo", s3_repo, "--dsn", src, "--jobs", j], self.env)),
            ("logical full backup", "backup-tool backup full (local repo)",
             lambda: timed([*self.tool, "backup", "full", "--repo", str(local_repo), "--dsn", src, "--jobs", j],
                           self.env)),
        ]
        if run % 2:
            steps = steps[::-1]
        self.archive_into(s3_repo)
        for scenario, name, fn in steps:
            self.settle()
            self.record(scenario, name, fn())

        self.cluster.psql(f"UPDATE wide_07 SET note = md5(note || '{run}') || note WHERE id % 10 = 0")
        self.settle()
        self.record("incremental (1 of 20 changed)", "backup-tool backup incremental (S3)",
                    timed([*self.tool, "backup", "incremental", "--repo", s3_repo, "--dsn", src, "--jobs", j], self.env))
        self.set_archive("/bin/true")
        listing = json.loads(subprocess.run([*self.tool, "list", "--repo", s3_repo, "--json"], env=self.env,
                                            capture_output=True, text=True, check=True).stdout)
        full_bytes = next(e["size_bytes"] for e in listing if e["kind"] == "full")
        incr = next(e for e in listing if e["kind"] == "incremental")
        method = f"incremental change detection (run {run + 1}): {incr.get('changed_tables_method', 'checksum')}"
        self.notes.append(method)
        log(method)
        self.sizes.update({"full backup bytes (S3)": full_bytes, "incremental bytes (S3)": incr["size_bytes"],
                           "pg_dump -Fc bytes": dump_file.stat().st_size})

        def restore_and_analyze(dsn: str) -> Measure:
            """pg_restore, then the planner statistics restore full also gathers: the work a
            validated restore does but its content checksums (autovacuum would otherwise
            analyze pg_restore's tables after the measurement, uncharged)."""
            first = timed([str(PG_BIN / "pg_restore"), "-j", j, "-d", dsn, str(dump_file)], self.env)
            then = timed([str(PG_BIN / "vacuumdb"), "--analyze-only", "-j", j, "-d", dsn], self.env)
            return Measure(first.seconds + then.seconds, max(first.peak_rss_mb, then.peak_rss_mb))

        restores: list[tuple[str, str, Callable[[], Measure]]] = [
            ("logical full restore", f"pg_restore -j {j} (local file)",
             lambda: timed([str(PG_BIN / "pg_restore"), "-j", j, "-d", self.fresh_db("r_pg"), str(dump_file)], self.env)),
            ("logical full restore", f"pg_restore -j {j} + vacuumdb --analyze-only -j {j} (local file; same work "
             "but the checksums)", lambda: restore_and_analyze(self.fresh_db("r_pg"))),
            ("logical full restore", "backup-tool restore full (S3, validated)",
             lambda: timed([*self.tool, "restore", "full", "--repo", s3_repo, "--target-dsn", self.fresh_db("r_bt"),
                            "--jobs", j], self.env)),
            ("logical full restore", "backup-tool restore full (S3, --no-validate)",
             lambda: timed([*self.tool, "restore", "full", "--repo", s3_repo, "--target-dsn", self.fresh_db("r_bt"),
                            "--jobs", j, "--no-validate"], self.env)),
            ("logical full restore", "backup-tool restore full (local repo, validated)",
             lambda: timed([*self.tool, "restore", "full", "--repo", str(local_repo), "--target-dsn",
                            self.fresh_db("r_bt"), "--jobs", j], self.env)),
        ]
        if run % 2:
            restores = restores[::-1]
        for scenario, name, fn in restores:
            self.settle()
            self.record(scenario, name, fn())

        one = "public.wide_07"
        single: list[tuple[str, str, Callable[[], Measure]]] = [
            ("single table restore", "pg_restore -t wide_07",
             lambda: timed([str(PG_BIN / "pg_restore"), "-n", "public", "-t", "wide_07", "-d", self.fresh_db("r_one"),
                            str(dump_file)], self.env)),
            ("single table restore", "backup-tool restore tables (S3)",
             lambda: timed([*self.tool, "restore", "tables", "--repo", s3_repo, "--tables", one, "--target-dsn",
                            self.fresh_db("r_one")], self.env)),
            ("single table restore", "backup-tool restore tables (local repo)",
             lambda: timed([*self.tool, "restore", "tables", "--repo", str(local_repo), "--tables", one,
                            "--target-dsn", self.fresh_db("r_one")], self.env)),
        ]
        if run % 2:
            single = single[::-1]
        for scenario, name, fn in single:
            self.settle()
            self.record(scenario, name, fn())

        self.s3.drop_bucket(bucket)
        shutil.rmtree(local_repo, ignore_errors=True)
        for name in RESTORE_TARGETS:  # the physical scenarios back up the cluster: only the bench db
            self.cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", db="postgres")

    def run_large(self, run: int) -> None:
        """The database dominated by one table: pg_dump -Fc, pg_dump -Fd -j N and pg_restore
        -j N against backup full / restore full (validated), with the table split into parts
        (the default policy) and unsplit (split_table_mb = 0), in the same run."""
        j = str(self.args.jobs)
        src = self.cluster.dsn()
        dump_file = self.work / "bench.dump"
        dump_dir = self.work / "bench.dir"
        unsplit = self.work / "unsplit.toml"
        unsplit.write_text("[backup]\nsplit_table_mb = 0\n")
        repos = {"split": f"s3://{self.s3.new_bucket()}/bench", "unsplit": f"s3://{self.s3.new_bucket()}/bench"}
        policy = {"split": [], "unsplit": ["--policy", str(unsplit)]}
        backup = "large table: backup full"

        def dump_dir_jobs() -> Measure:
            shutil.rmtree(dump_dir, ignore_errors=True)
            return timed([str(PG_BIN / "pg_dump"), "-Fd", "-j", j, "-f", str(dump_dir), "-d", src], self.env)

        steps: list[tuple[str, str, Callable[[], Measure]]] = [
            (backup, "pg_dump -Fc (local file)",
             lambda: timed([str(PG_BIN / "pg_dump"), "-Fc", "-f", str(dump_file), "-d", src], self.env)),
            (backup, f"pg_dump -Fd -j {j} (local dir)", dump_dir_jobs),
            *[(backup, f"backup-tool backup full (S3, {how})",
               lambda how=how: timed([*self.tool, "backup", "full", "--repo", repos[how], "--dsn", src, "--jobs", j,
                                      *policy[how]], self.env))
              for how in ("split", "unsplit")],
        ]
        restore = "large table: restore full"
        restores: list[tuple[str, str, Callable[[], Measure]]] = [
            (restore, f"pg_restore -j {j} (local dir)",
             lambda: timed([str(PG_BIN / "pg_restore"), "-j", j, "-d", self.fresh_db("r_pg"), str(dump_dir)],
                           self.env)),
            *[(restore, f"backup-tool restore full (S3, validated, {how})",
               lambda how=how: timed([*self.tool, "restore", "full", "--repo", repos[how], "--target-dsn",
                                      self.fresh_db("r_bt"), "--jobs", j], self.env))
              for how in ("split", "unsplit")],
        ]
        if run % 2:
            steps, restores = steps[::-1], restores[::-1]
        for scenario, name, fn in steps + restores:
            self.settle()
            self.record(scenario, name, fn())
        for how, repo in repos.items():
            listing = json.loads(subprocess.run([*self.tool, "show", "latest", "--repo", repo, "--json"],
                                                env=self.env, capture_output=True, text=True, check=True).stdout)
            table = next(t for t in listing["tables"] if t["table"] == f"public.{LARGE_TABLE}")
            self.sizes[f"backup full bytes (S3, {how}; {LARGE_TABLE} in {len(table.get('parts', [])) or 1} "
                       "object(s))"] = listing["size_bytes"]
            self.s3.drop_bucket(repo.split("/")[2])
        self.sizes["pg_dump -Fc bytes"] = dump_file.stat().st_size
        for name in ("r_pg", "r_bt"):
            self.cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", db="postgres")

    def run_many(self, run: int) -> None:
        """Many small tables: pg_dump -Fc, pg_dump -Fd -j N and pg_restore -j N against backup
        full (S3 and local) and restore full (validated)."""
        j = str(self.args.jobs)
        src = self.cluster.dsn()
        dump_dir = self.work / "many.dir"
        s3_repo = f"s3://{self.s3.new_bucket()}/bench"
        local_repo = self.work / "many-repo"
        shutil.rmtree(local_repo, ignore_errors=True)
        backup, restore = "many tables: backup full", "many tables: restore full"

        def dump_dir_jobs() -> Measure:
            shutil.rmtree(dump_dir, ignore_errors=True)
            return timed([str(PG_BIN / "pg_dump"), "-Fd", "-j", j, "-f", str(dump_dir), "-d", src], self.env)

        steps: list[tuple[str, str, Callable[[], Measure]]] = [
            (backup, "pg_dump -Fc (local file)",
             lambda: timed([str(PG_BIN / "pg_dump"), "-Fc", "-f", str(self.work / "many.dump"), "-d", src], self.env)),
            (backup, f"pg_dump -Fd -j {j} (local dir)", dump_dir_jobs),
            (backup, "backup-tool backup full (S3)",
             lambda: timed([*self.tool, "backup", "full", "--repo", s3_repo, "--dsn", src, "--jobs", j], self.env)),
            (backup, "backup-tool backup full (local repo)",
             lambda: timed([*self.tool, "backup", "full", "--repo", str(local_repo), "--dsn", src, "--jobs", j],
                           self.env)),
        ]
        restores: list[tuple[str, str, Callable[[], Measure]]] = [
            (restore, f"pg_restore -j {j} (local dir)",
             lambda: timed([str(PG_BIN / "pg_restore"), "-j", j, "-d", self.fresh_db("r_pg"), str(dump_dir)],
                           self.env)),
            (restore, "backup-tool restore full (S3, validated)",
             lambda: timed([*self.tool, "restore", "full", "--repo", s3_repo, "--target-dsn", self.fresh_db("r_bt"),
                            "--jobs", j], self.env)),
        ]
        if run % 2:
            steps, restores = steps[::-1], restores[::-1]
        for scenario, name, fn in steps + restores:
            self.settle()
            self.record(scenario, name, fn())
        self.s3.drop_bucket(s3_repo.split("/")[2])
        shutil.rmtree(local_repo, ignore_errors=True)
        for name in ("r_pg", "r_bt"):
            self.cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", db="postgres")

    # ----------------------------------------------------------------------------------- physical

    def physical_setup(self) -> None:
        """Once: nginx (TLS) in front of moto, backup-tool runnable by `postgres` for
        archive_command/restore_command, and real WAL segments of this cluster to push."""
        if self.nginx is not None:
            return
        self.nginx = start_nginx(self.work, self.s3.endpoint)
        self.versions["pgBackRest"] = sh(["pgbackrest", "version"]).stdout.strip()
        self.versions["nginx"] = self.nginx.version
        self.ensure_server_tool()
        self.scratch = self.work / "physical"
        self.scratch.mkdir()
        shutil.chown(self.scratch, OS_USER, OS_USER)
        self.wal_segments = self.make_wal_segments(WAL_SEGMENTS)

    def ensure_server_tool(self) -> Path:
        """Once: backup-tool runnable by `postgres` for archive_command (`wal push`)."""
        if self.server_tool is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from server_tool import install_source, write_wrapper

            self.server_tool = write_wrapper(self.work / "bin" / "backup-tool", install_source(self.work / "srv"),
                                             self.s3.env)
            self.versions["backup-tool for the server (archive_command, wal push)"] = (
                sh([str(self.server_tool), "version"], user=OS_USER).stdout.strip().splitlines()[0]
                + f" in a venv of {sh(['/usr/bin/python3', '--version']).stdout.strip()}, run as {OS_USER}")
        return self.server_tool

    def archive_into(self, repo: str) -> None:
        """archive_command = `wal push` into ``repo``, and one segment pushed through it."""
        self.set_archive(f"{self.ensure_server_tool()} wal push %p --repo {repo}")
        segment = self.cluster.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())", db="postgres")
        self.cluster.psql("SELECT pg_switch_wal()", db="postgres")
        self.wait_archived(segment)

    def table_pitr_setup(self) -> None:
        """Once: a base backup into its own local repository with WAL archived through
        backup-tool, a change to the target table after it, the moment T, and WAL archived
        past T. Local, not moto: moto answers a ranged GET in time proportional to the whole
        object (it copies it), which real S3 does not, so it would bill the partial lay-out
        for an artefact of the test server."""
        if getattr(self, "pitr_repo", None) is not None:
            return
        repo = self.work / "pitr-repo"
        repo.mkdir()
        shutil.chown(repo, OS_USER, OS_USER)
        self.pitr_repo = str(repo)
        self.set_archive(f"{self.ensure_server_tool()} wal push %p --repo {self.pitr_repo}")
        sh([*self.tool, "backup", "base", "--repo", self.pitr_repo, "--dsn", self.cluster.dsn()], env=self.env)
        self.cluster.psql(f"UPDATE {PITR_TABLE} SET note = note || 'x' WHERE id % 10 = 0")
        time.sleep(1)
        self.pitr_time = self.cluster.psql(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        time.sleep(1)
        self.cluster.psql(f"UPDATE {PITR_TABLE} SET note = 'after T'")
        segment = self.cluster.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())", db="postgres")
        self.cluster.psql("SELECT pg_switch_wal()", db="postgres")
        self.wait_archived(segment)
        self.set_archive("/bin/true")
        self.pitr_table_bytes = int(self.cluster.psql(f"SELECT pg_total_relation_size('{PITR_TABLE}')"))
        self.pitr_cluster_bytes = int(self.cluster.psql("SELECT sum(pg_database_size(oid)) FROM pg_database",
                                                        db="postgres"))

    def run_table_pitr(self, run: int) -> None:
        """`restore tables --target-time` of one table: the whole base backup laid out (as
        before issue 18, --full-layout) against just the files the table needs. Each run's
        `--json` says which lay-out served; the first run's bytes read and written and
        lay-out seconds go into the report's notes."""
        self.table_pitr_setup()
        mb = 2**20
        scenario = (f"table PITR ({PITR_TABLE}: {self.pitr_table_bytes / mb:.0f} MB of a "
                    f"{self.pitr_cluster_bytes / mb:.0f} MB cluster, local repo)")
        layouts: dict[str, dict[str, object]] = {}

        def timed_json(argv: list[str], env: dict[str, str]) -> tuple[Measure, dict[str, dict[str, object]]]:
            """:func:`timed` for a command printing one JSON document: the measure and the document."""
            with tempfile.TemporaryFile() as outfile, tempfile.TemporaryFile() as errfile:
                start = time.perf_counter()
                proc = subprocess.Popen(argv, env=env, stdout=outfile, stderr=errfile)
                _, status, usage = os.wait4(proc.pid, 0)
                elapsed = time.perf_counter() - start
                outfile.seek(0)
                errfile.seek(0)
                out, err = outfile.read().decode(errors="replace"), errfile.read().decode(errors="replace")
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"{' '.join(argv[:6])} ... failed ({os.waitstatus_to_exitcode(status)}): {err[-2000:]}")
            return Measure(elapsed, usage.ru_maxrss / 1024), json.loads(out)

        def restore(schema: str, kind: str, *extra: str) -> Measure:
            assert self.pitr_repo is not None
            try:
                measure, result = timed_json([*self.tool, "restore", "tables", "--repo", self.pitr_repo, "--tables",
                                              PITR_TABLE, "--target-time", self.pitr_time, "--target-dsn",
                                              self.cluster.dsn(), "--into-schema", schema, "--json", *extra], self.env)
            finally:
                self.cluster.psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            layout = result["recovery_layout"]
            if not result.get("ok") or layout["kind"] != kind:
                raise RuntimeError(f"table PITR expected a validated {kind} lay-out, got {result}")
            layouts.setdefault(kind, layout)
            return measure

        contenders: list[tuple[str, Callable[[], Measure]]] = [
            (PITR_FULL, lambda: restore(f"pitr_full_{run}", "full", "--full-layout")),
            (PITR_PARTIAL, lambda: restore(f"pitr_partial_{run}", "partial")),
        ]
        if run % 2:
            contenders = contenders[::-1]
        for name, fn in contenders:
            self.settle()
            self.record(scenario, name, fn())
        if run == 0:
            self.notes.append("table PITR lay-out (first run): " + "; ".join(
                f"{kind} read {int(str(lay['bytes_fetched'])) / mb:.0f} MB of the stored base backup, wrote "
                f"{int(str(lay['bytes_written'])) / mb:.0f} MB in {lay['seconds']} s"
                for kind, lay in sorted(layouts.items())) + "; the rest of each time is the scratch server's "
                "recovery and the logical copy of the table, the same for both")

    def set_archive(self, command: str) -> None:
        self.cluster.psql(f"ALTER SYSTEM SET archive_command = {quote_sql(command)}", db="postgres")
        self.cluster.psql("SELECT pg_reload_conf()", db="postgres")
        time.sleep(1.0)  # the archiver re-reads its configuration asynchronously

    def wait_archived(self, segment: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done, failed = self.cluster.psql(
                "SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver", db="postgres").split("|")
            if done >= segment:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{segment} not archived after {timeout}s ({failed} failures), "
                                   f"see {self.cluster.base / 'server.log'}")
            time.sleep(0.1)

    def make_wal_segments(self, count: int) -> list[Path]:
        """Real, full WAL segments of this cluster (pgBackRest checks the system id in their
        header): bulk inserts archived with `cp` into a source directory."""
        src = self.scratch / "walsrc"
        src.mkdir()
        shutil.chown(src, OS_USER, OS_USER)
        log(f"generating {count} WAL segments")
        self.set_archive(f"cp %p {src}/%f")

        def segno(name: str) -> int:
            return int(name[8:16], 16) * 0x100 + int(name[16:24], 16)

        current = "SELECT pg_walfile_name(pg_current_wal_insert_lsn())"
        first = self.cluster.psql(current, db="postgres")
        self.cluster.psql("CREATE TABLE bench_walgen (id bigint, pad text)")
        while segno(self.cluster.psql(current, db="postgres")) - segno(first) <= count:
            self.cluster.psql("INSERT INTO bench_walgen SELECT g, md5(random()::text) || md5(random()::text) "
                              "|| repeat(md5(g::text), 2) FROM generate_series(1, 100000) g")
        last = self.cluster.psql(current, db="postgres")
        self.cluster.psql("SELECT pg_switch_wal()", db="postgres")
        self.wait_archived(last)
        self.set_archive("/bin/true")
        self.cluster.psql("DROP TABLE bench_walgen")
        self.cluster.psql("CHECKPOINT", db="postgres")
        names = sorted(f.name for f in src.iterdir() if len(f.name) == 24 and segno(f.name) > segno(first))
        return [src / n for n in names[:count]]

    def pgbr_config(self, bucket: str) -> Path:
        """A pgBackRest configuration for one bucket (its own lock, log and spool paths), and its stanza."""
        assert self.nginx is not None
        return pgbackrest_config(self.scratch, bucket, self.nginx.port, self.cluster, self.args.jobs)

    @staticmethod
    def pgbr(conf: Path, *args: str) -> list[str]:
        return ["pgbackrest", f"--config={conf}", "--stanza=bench", *args]

    def new_pgdata(self, name: str) -> Path:
        path = self.scratch / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
        shutil.chown(path, OS_USER, OS_USER)
        self.live_pgdata.append(path)
        return path

    def drop_pgdata(self, path: Path) -> None:
        if (path / "postmaster.pid").exists():
            sh([str(PG_BIN / "pg_ctl"), "-D", str(path), "-w", "-m", "fast", "stop"], user=OS_USER, check=False)
        shutil.rmtree(path, ignore_errors=True)
        for log_file in path.parent.glob(f"{path.name}*.log"):
            log_file.unlink()

    def pgbr_restore(self, conf: Path, pgdata: Path) -> Measure:
        """`pgbackrest restore` to the end of the backup, then start the server, wait until it
        is promoted and accepts connections, and stop it: one timed command."""
        port = free_port()
        ctl = f"runuser -u {OS_USER} -- {PG_BIN}/pg_ctl -D {pgdata}"
        script = self.scratch / "pgbackrest-restore.sh"
        script.write_text(f"""set -euo pipefail
runuser -u {OS_USER} -- {' '.join(self.pgbr(conf))} restore --pg1-path={pgdata} --type=immediate \\
    --target-action=promote --archive-mode=off
{ctl} -l {pgdata}.log -w -t 1200 -o "-c port={port} -c listen_addresses=127.0.0.1" start >/dev/null
until [ "$({PG_BIN}/psql -X -A -t -h 127.0.0.1 -p {port} -U postgres -d postgres \\
          -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do sleep 0.05; done
{ctl} -w -m fast stop >/dev/null
""")
        return timed(["bash", str(script)], self.env)

    def push_all(self, name: str, argv_for: Callable[[Path], list[str]]) -> Measure:
        """Archive every prepared segment with one call each, in order, as PostgreSQL's archiver
        does: the segments are laid out in a pg_wal directory with an archive_status/*.ready
        file each, and a successful call turns its .ready into .done. The directory holds the
        cluster's global/pg_control too: pgBackRest (--pg1-path=<it>) checks the segments
        against it, and its asynchronous mode only reads archive_status under pg1-path."""
        pg_wal = self.scratch / name / "pg_wal"
        status = pg_wal / "archive_status"
        status.mkdir(parents=True)
        (pg_wal.parent / "global").mkdir()
        shutil.copy2(self.cluster.data / "global" / "pg_control", pg_wal.parent / "global" / "pg_control")
        for seg in self.wal_segments:
            os.link(seg, pg_wal / seg.name)
            (status / f"{seg.name}.ready").touch()
        chown_tree(pg_wal.parent)
        total, rss = 0.0, 0.0
        try:
            for seg in self.wal_segments:
                m = timed(argv_for(pg_wal / seg.name), self.env, user=OS_USER)
                (status / f"{seg.name}.ready").rename(status / f"{seg.name}.done")
                total += m.seconds
                rss = max(rss, m.peak_rss_mb)
        finally:
            shutil.rmtree(pg_wal.parent, ignore_errors=True)
        return Measure(total, rss)

    def run_physical(self, run: int) -> None:
        self.physical_setup()
        j = str(self.args.jobs)
        src = self.cluster.dsn()
        buckets: list[str] = []

        def bucket() -> str:
            buckets.append(self.s3.new_bucket())
            return buckets[-1]

        try:
            pgbr_conf = self.pgbr_config(bucket())
            tool_repo = f"s3://{bucket()}/bench"
            pgbr_archive = " ".join(self.pgbr(pgbr_conf, "archive-push", "%p"))
            tool_archive = f"{self.server_tool} wal push %p --repo {tool_repo}"

            base = "physical base backup"
            backups: list[tuple[str, str, Callable[[], Measure]]] = [
                (base, f"pgbackrest backup --type=full (process-max {j}, zst 3, TLS via nginx)",
                 lambda: after(lambda: self.set_archive(pgbr_archive),
                               lambda: timed(self.pgbr(pgbr_conf, "backup", "--type=full"), self.env, user=OS_USER))),
                (base, "backup-tool backup base (S3, zstd 3, direct)",
                 lambda: after(lambda: self.set_archive(tool_archive),
                               lambda: timed([*self.tool, "backup", "base", "--repo", tool_repo, "--dsn", src,
                                              "--method", "direct"], self.env))),
                (base, "backup-tool backup base (S3, zstd 3, --method pg_basebackup)",
                 lambda: after(lambda: self.set_archive(tool_archive),
                               lambda: timed([*self.tool, "backup", "base", "--repo", tool_repo, "--dsn", src,
                                              "--method", "pg_basebackup"], self.env))),
            ]
            if run % 2:
                backups = backups[::-1]
            for scenario, name, fn in backups:
                self.settle()
                self.record(scenario, name, fn())
            self.set_archive("/bin/true")
            self.physical_sizes(pgbr_conf, tool_repo)

            pitr = "PITR restore (to end of backup, server up)"
            theirs_dir, ours_dir = self.new_pgdata("pitr-pgbackrest"), self.new_pgdata("pitr-tool")
            ours_nv_dir = self.new_pgdata("pitr-tool-nv")
            restores: list[tuple[str, str, Callable[[], Measure]]] = [
                (pitr, "pgbackrest restore --type=immediate + start, promote, stop",
                 lambda: self.pgbr_restore(pgbr_conf, theirs_dir)),
                (pitr, "backup-tool restore pitr --latest (recover, promote, validate, restart)",
                 lambda: timed([*self.tool, "restore", "pitr", "--repo", tool_repo, "--latest", "--pgdata",
                                str(ours_dir), "--port", str(free_port()), "--no-archive"], self.env)),
                (pitr, "backup-tool restore pitr --latest --no-validate (recover, promote, restart)",
                 lambda: timed([*self.tool, "restore", "pitr", "--repo", tool_repo, "--latest", "--pgdata",
                                str(ours_nv_dir), "--port", str(free_port()), "--no-archive", "--no-validate"],
                               self.env)),
            ]
            if run % 2:
                restores = restores[::-1]
            for scenario, name, fn in restores:
                self.settle()
                self.record(scenario, name, fn())
                for d in (theirs_dir, ours_dir, ours_nv_dir):  # a restored server must not load the next one
                    if (d / "postmaster.pid").exists():
                        sh([str(PG_BIN / "pg_ctl"), "-D", str(d), "-w", "-m", "fast", "stop"], user=OS_USER,
                           check=False)
            for d in (theirs_dir, ours_dir, ours_nv_dir):
                self.drop_pgdata(d)
                self.live_pgdata.remove(d)

            n = len(self.wal_segments)
            walname = f"WAL archiving ({n} segments, one call each)"
            push_conf = {"sync": self.pgbr_config(bucket()), "async": self.pgbr_config(bucket())}
            push_repo = f"s3://{bucket()}/bench"
            pushes: list[tuple[str, str, Callable[[], Measure]]] = [
                (walname, "pgbackrest archive-push",
                 lambda: self.push_all("push-pgbr", lambda p: self.pgbr(
                     push_conf["sync"], f"--pg1-path={p.parent.parent}", "archive-push", str(p)))),
                (walname, f"pgbackrest archive-push --archive-async (process-max {j})",
                 lambda: self.push_all("push-pgbr-async", lambda p: self.pgbr(
                     push_conf["async"], f"--pg1-path={p.parent.parent}", "--archive-async", "archive-push",
                     str(p)))),
                (walname, "backup-tool wal push (batch 16, as postgres via venv)",
                 lambda: self.push_all("push-tool", lambda p: [str(self.server_tool), "wal", "push", str(p),
                                                               "--repo", push_repo])),
            ]
            if run % 2:
                pushes = pushes[::-1]
            for scenario, name, fn in pushes:
                self.settle()
                self.record(scenario, name, fn(), segments=n)

            if self.args.barman and run == 0:
                self.run_barman(bucket())
        finally:
            self.set_archive("/bin/true")
            for b in buckets:
                try:
                    self.s3.drop_bucket(b)
                except Exception as exc:  # noqa: BLE001 - cleanup must go on
                    log(f"could not drop bucket {b}: {exc}")

    def physical_sizes(self, pgbr_conf: Path, tool_repo: str) -> None:
        info = json.loads(sh(self.pgbr(pgbr_conf, "info", "--output=json"), user=OS_USER).stdout)
        last = info[0]["backup"][-1]["info"]
        listing = json.loads(subprocess.run([*self.tool, "list", "--repo", tool_repo, "--json"], env=self.env,
                                            capture_output=True, text=True, check=True).stdout)
        self.sizes.update({"cluster size (pgBackRest's count)": last["size"],
                           "pgBackRest full backup bytes (S3)": last["repository"]["delta"],
                           "backup-tool base backup bytes (S3)":
                               next(e["size_bytes"] for e in listing if e["kind"] == "base")})

    def run_barman(self, bucket: str) -> None:
        if not shutil.which("barman-cloud-backup"):
            self.notes.append("barman-cloud-backup: not installed (apt barman-cli-cloud), skipped")
            return
        self.versions["barman-cloud-backup"] = sh(["barman-cloud-backup", "--version"]).stdout.strip().split()[-1]
        url = f"s3://{bucket}/barman"
        endpoint = ["--endpoint-url", self.s3.endpoint]
        # --snappy when python-snappy works (Debian 12's python3-snappy 0.5.3 fails on Python 3.11
        # with "PY_SSIZE_T_CLEAN macro must be defined"): else barman's default, uncompressed
        snappy = sh(["/usr/bin/python3", "-c", "import snappy; snappy.StreamCompressor().add_chunk(b'x')"],
                    check=False).returncode == 0
        wrapper = self.work / "bin" / "barman-wal-archive"
        env = " ".join(f"{k}={v}" for k, v in self.s3.env.items())
        wrapper.write_text(f"#!/bin/sh\nexec env {env} barman-cloud-wal-archive {' '.join(endpoint)}"
                           f"{' --snappy' if snappy else ''} {url} bench \"$1\"\n")
        wrapper.chmod(0o755)
        self.set_archive(f"{wrapper} %p")
        try:
            m = timed(["barman-cloud-backup", *endpoint, *(["--snappy"] if snappy else []), "--immediate-checkpoint",
                       "-J", str(self.args.jobs), "-h", str(self.cluster.base), "-p", str(self.cluster.port),
                       "-U", "postgres", url, "bench"], self.env, user=OS_USER)
        except RuntimeError as exc:
            self.notes.append(f"barman-cloud-backup failed: {str(exc)[:300]}")
            return
        self.record("physical base backup",
                    f"barman-cloud-backup -J {self.args.jobs} ({'snappy' if snappy else 'uncompressed'}, "
                    "plain HTTP, 1 run)", m)

    def close(self) -> None:
        """Stop whatever the physical part started (restored servers, nginx); safe to call twice."""
        for d in self.live_pgdata:
            if (d / "postmaster.pid").exists():
                sh([str(PG_BIN / "pg_ctl"), "-D", str(d), "-m", "immediate", "stop"], user=OS_USER, check=False)
        self.live_pgdata.clear()
        if self.nginx is not None:
            self.nginx.stop()

    def internal_ratios(self) -> list[str]:
        """The targets that compare backup-tool with itself: one table against the whole
        restore, an incremental against the full (time and bytes)."""
        def row(scenario: str, contender: str) -> Row | None:
            return self.rows.get((scenario, contender))

        out = []
        pitr = [r for r in self.rows.values() if r.scenario.startswith("table PITR")]
        part = next((r for r in pitr if r.contender == PITR_PARTIAL), None)
        whole_pitr = next((r for r in pitr if r.contender == PITR_FULL), None)
        if part and whole_pitr:
            out.append(f"| table PITR partial lay-out ÷ full lay-out (time) | {part.seconds / whole_pitr.seconds:.2f} "
                       "| ≤ 0.15 (cluster ≥ 3 GB, table ≤ 5 %) |")
        one = row("single table restore", "backup-tool restore tables (S3)")
        whole = row("logical full restore", "backup-tool restore full (S3, validated)")
        if one and whole:
            out.append(f"| restore tables (one table) ÷ restore full (time) | {one.seconds / whole.seconds:.2f} |  |")
        for scenario, name in (("large table: backup full", "backup-tool backup full (S3, {})"),
                               ("large table: restore full", "backup-tool restore full (S3, validated, {})")):
            split, unsplit = row(scenario, name.format("split")), row(scenario, name.format("unsplit"))
            if split and unsplit:
                out.append(f"| {scenario}: table split into parts ÷ unsplit (time) "
                           f"| {split.seconds / unsplit.seconds:.2f} | < 1 (with cores to spare) |")
        incr = row("incremental (1 of 20 changed)", "backup-tool backup incremental (S3)")
        full = row("logical full backup", "backup-tool backup full (S3)")
        if incr and full:
            out.append(f"| backup incremental ÷ backup full, 1 of 20 tables changed (time) "
                       f"| {incr.seconds / full.seconds:.2f} | ≤ 0.15 |")
        if self.sizes.get("incremental bytes (S3)") and self.sizes.get("full backup bytes (S3)"):
            out.append(f"| backup incremental ÷ backup full, 1 of 20 tables changed (bytes) "
                       f"| {self.sizes['incremental bytes (S3)'] / self.sizes['full backup bytes (S3)']:.3f} | ≤ 0.15 |")
        return out

    def report(self) -> str:
        mb = self.db_bytes / 2**20
        lines = [
            "# backup-tool benchmark",
            "",
            f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.platform()}",
            f"- PostgreSQL: {sh([str(PG_BIN / 'postgres'), '--version']).stdout.strip()}",
            f"- database: {self.dataset()} = {mb:.0f} MB; runs: {self.runs}"
            f" (median), jobs: {self.args.jobs}; S3: moto server on 127.0.0.1",
        ]
        lines += [f"- {k}: {v}" for k, v in self.versions.items()]
        if self.nginx is not None:
            lines += [
                "- physical: pgBackRest reaches moto through nginx (TLS, self-signed, repo1-storage-verify-tls=n,"
                " no buffering); backup-tool and barman over plain HTTP. Both pgBackRest and backup-tool compress"
                " with zstd level 3. Each contender archives WAL into its own fresh bucket (archive_command"
                " switched with ALTER SYSTEM before its backup).",
                "- PITR restore: pgBackRest's time covers restore + pg_ctl start + recovery to the backup's end +"
                " promote + fast stop; backup-tool's covers lay-out + private start + recovery to the archive's end"
                " (= the backup's end) + promote + validation of every database + restart on its port. Archiving"
                " off on both restored servers.",
                f"- WAL archiving: {len(self.wal_segments)} real 16 MiB segments of the bench cluster, laid out"
                " as pg_wal/ + archive_status/*.ready, one call per segment as PostgreSQL's archiver makes them"
                " (as postgres; .ready -> .done after each); time = sum of the calls.",
            ]
        lines += [f"- note: {n}" for n in self.notes]
        lines += [
            "",
            "| scenario | contender | median s | throughput | peak RSS MB |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        order = list(dict.fromkeys(r.scenario for r in self.rows.values()))
        for row in sorted(self.rows.values(), key=lambda r: order.index(r.scenario)):
            rate = (f"{row.segments / row.seconds:.1f} segments/s" if row.segments
                    else f"{mb / row.seconds:.0f} DB MB/s")
            lines.append(f"| {row.scenario} | {row.contender} | {row.seconds:.2f} | {rate} | {row.rss:.0f} |")
        lines += ["", "| ratio backup-tool ÷ contender | value | target |", "| --- | ---: | --- |"]
        # Issue 15's targets (the ratio each contender pair must reach).
        targets = {"physical base backup": "≤ 0.80", "PITR restore": "≤ 0.90", "WAL archiving": "≥ 1.00",
                   "logical full restore": "≤ 1.00", "single table restore": "≤ 1.5",
                   "large table: restore full": "≤ 1.00", "many tables: restore full": "≤ 1.00"}
        logical_goals = {("backup full (S3)", "pg_dump -Fc"): "≤ 0.50", ("backup full (S3)", "pg_dump -Fd"): "≤ 0.80",
                         ("backup full (S3, split)", "pg_dump -Fc"): "≤ 0.50",
                         ("backup full (S3, split)", "pg_dump -Fd"): "≤ 0.80"}
        if self.args.many_tables:
            logical_goals = {}
        for scenario in dict.fromkeys(r.scenario for r in self.rows.values()):
            ours = [r for r in self.rows.values() if r.scenario == scenario and r.contender.startswith("backup-tool")]
            theirs = [r for r in self.rows.values() if r.scenario == scenario and not r.contender.startswith("backup-tool")]
            target = next((t for k, t in targets.items() if scenario.startswith(k)), "")
            for a in ours:
                for b in theirs:
                    goal = target if b.contender.startswith(("pgbackrest", "pg_restore")) and "--no-validate" not in a.contender \
                        and "--method" not in a.contender and "vacuumdb" not in b.contender else ""
                    goal = next((g for (x, y), g in logical_goals.items() if x in a.contender and y in b.contender),
                                goal)
                    if a.segments:  # throughput: higher is better
                        lines.append(f"| {a.contender} ÷ {b.contender} (segments/s; ≥ 1 = backup-tool faster) "
                                     f"| {b.seconds / a.seconds:.2f} | {goal} |")
                    else:
                        lines.append(f"| {a.contender} ÷ {b.contender} (time) | {a.seconds / b.seconds:.2f} | {goal} |")
        lines += self.internal_ratios()
        if self.sizes:
            lines += ["", "| stored size | bytes |", "| --- | ---: |"]
            lines += [f"| {k} | {v} |" for k, v in self.sizes.items()]
        return "\n".join(lines) + "\n"

    def dataset(self) -> str:
        if self.args.many_tables:
            return f"{self.args.many_tables} small tables in 10 schemas (--many-tables)"
        if self.args.large_table:
            return (f"one {LARGE_TABLE} table of {self.scale * LARGE_ROWS_PER_SCALE} rows (--large-table, scale "
                    f"{self.scale}) + a {self.scale}-row branches table")
        return f"pgbench scale {self.scale} + 16 wide tables"


def curve_report(benches: list[Bench], png: Path) -> str:
    """Time per GB and peak RSS of every row at every size, as a markdown table, and the same
    as a PNG plot at ``png`` (backup-tool's rows solid, the contenders' dashed). WAL archiving
    rows, measured in segments per second rather than per GB, are left out."""
    gb = {b.scale: b.db_bytes / 2**30 for b in benches}
    keys = list(dict.fromkeys((r.scenario, r.contender) for b in benches for r in b.rows.values()
                              if not r.segments))
    lines = ["", "## Scale curve", "",
             "| scenario | contender | " + " | ".join(f"s/GB at {gb[b.scale]:.2f} GB" for b in benches)
             + " | " + " | ".join(f"peak RSS MB at {gb[b.scale]:.2f} GB" for b in benches) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in range(2 * len(benches))) + " |"]
    for scenario, contender in keys:
        rows = [b.rows.get((scenario, contender)) for b in benches]
        per_gb = [f"{r.seconds / gb[b.scale]:.1f}" if r else "" for r, b in zip(rows, benches, strict=True)]
        rss = [f"{r.rss:.0f}" if r else "" for r in rows]
        lines.append(f"| {scenario} | {contender} | " + " | ".join(per_gb + rss) + " |")
    try:
        plot_curve(benches, keys, gb, png)
        lines += ["", f"![scale curve]({png.name})"]
    except Exception as exc:  # noqa: BLE001 - the table above is the result; the plot is a convenience
        log(f"no plot: {exc}")
        lines += ["", f"(no plot: {exc})"]
    return "\n".join(lines) + "\n"


def plot_curve(benches: list[Bench], keys: list[tuple[str, str]], gb: dict[int, float], png: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        log("installing matplotlib for the plot (bench only)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_inches = 0.16 * -(-len(keys) // 2) + 0.2
    height = 5 + legend_inches
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, height))
    for scenario, contender in keys:
        points = [(gb[b.scale], r) for b in benches if (r := b.rows.get((scenario, contender)))]
        style = "-" if contender.startswith("backup-tool") else "--"
        label = f"{scenario}: {contender}"[:70]
        xs = [x for x, _ in points]
        left.plot(xs, [r.seconds / x for x, r in points], style, marker="o", label=label)
        right.plot(xs, [r.rss for _, r in points], style, marker="o", label=label)
    left.set(xlabel="database GB", ylabel="seconds per GB", title="time per GB")
    right.set(xlabel="database GB", ylabel="peak RSS MB", title="peak RSS (process tree)")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (50: 1.25 GB with the 16 wide tables)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (median reported)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel jobs for every contender")
    parser.add_argument("--out", default=str(ROOT / "bench-results.md"), help="markdown report path")
    parser.add_argument("--logical-only", action="store_true", help="skip the physical (pgBackRest) scenarios")
    parser.add_argument("--physical-only", action="store_true", help="skip the logical (pg_dump) scenarios")
    parser.add_argument("--barman", action="store_true", help="also time barman-cloud-backup (one run)")
    parser.add_argument("--table-pitr-only", action="store_true",
                        help="only table PITR, partial against full lay-out (no pgBackRest needed)")
    parser.add_argument("--large-table", action="store_true",
                        help="a database dominated by one table (60 MB per scale unit: 3 GB at 50), backup full "
                             "and restore full with the table split and unsplit against pg_dump/pg_restore")
    parser.add_argument("--many-tables", type=int, metavar="N", default=0,
                        help="a database of N small tables (e.g. 3000): backup full and restore full against "
                             "pg_dump/pg_restore, the per-table costs rather than the bytes")
    parser.add_argument("--curve", metavar="SCALES",
                        help="comma-separated scales (e.g. 50,200): every scenario at each (--runs at the first, "
                             "one run at the others), with time per GB and peak RSS per size and a PNG plot")
    args = parser.parse_args()
    if args.logical_only and args.physical_only:
        parser.error("--logical-only and --physical-only exclude each other")
    if args.large_table and (args.physical_only or args.table_pitr_only):
        parser.error("--large-table times logical backups; it excludes --physical-only and --table-pitr-only")
    if args.many_tables and (args.large_table or args.physical_only or args.table_pitr_only or args.curve):
        parser.error("--many-tables times logical backups of its own database; it excludes --large-table, "
                     "--physical-only, --table-pitr-only and --curve")
    try:
        scales = [int(x) for x in args.curve.split(",")] if args.curve else [args.scale]
    except ValueError:
        parser.error("--curve takes comma-separated whole scales, e.g. 50,200")
    if args.curve and (len(scales) < 2 or min(scales) < 1):
        parser.error("--curve needs at least two scales, each at least 1")
    if os.geteuid() != 0:
        print("scripts/bench runs as root (it installs packages and runs PostgreSQL as 'postgres')", file=sys.stderr)
        return 2
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        ensure_packages(False)
    ensure_packages(not args.logical_only and not args.table_pitr_only and not args.many_tables,
                    args.barman and not args.logical_only)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally below) on kill too
    work = Path(tempfile.mkdtemp(prefix="bt-bench-", dir="/tmp"))
    work.chmod(0o755)
    cluster: Cluster | None = None
    s3: S3 | None = None
    benches: list[Bench] = []
    try:
        cluster = start_cluster(work)
        s3 = start_s3()
        for index, scale in enumerate(scales):
            db_bytes = (build_many_tables(cluster, args.many_tables) if args.many_tables
                        else build_large_table(cluster, scale, args.jobs) if args.large_table
                        else build_database(cluster, scale))
            log(f"database ready: {db_bytes / 2**20:.0f} MB (scale {scale})")
            runs = args.runs if index == 0 else 1
            bench = Bench(args, work, cluster, s3, db_bytes, scale, runs)
            if benches:
                bench.carry_over(benches[-1])
            benches.append(bench)
            for run in range(runs):
                log(f"run {run + 1}/{runs} at scale {scale}")
                if args.table_pitr_only:
                    bench.run_table_pitr(run)
                    continue
                if args.many_tables:
                    bench.run_many(run)
                    continue
                if args.large_table:
                    bench.run_large(run)
                elif not args.physical_only:
                    bench.run_logical(run)
                if not args.logical_only:
                    bench.run_physical(run)
                    if not args.large_table and not args.curve:
                        bench.run_table_pitr(run)
        out = Path(args.out)
        report = "\n".join(b.report() for b in benches)
        if args.curve:
            report += curve_report(benches, out.with_suffix(".png"))
        out.write_text(report)
        print(report)
        return 0
    finally:
        for bench in benches:
            bench.close()
        if s3 is not None:
            s3.proc.terminate()
            s3.proc.wait()
        if cluster is not None:
            try:
                cluster.ctl("stop", "-m", "fast")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(work, ignore_errors=True)



def pgbackrest_config(scratch: Path, bucket: str, port: int, cluster: "Cluster", jobs: int) -> Path:
    """A pgBackRest configuration for one bucket reached through nginx on ``port`` (its own
    lock, log and spool paths), owned by the cluster's user, and its stanza created."""
    d = scratch / f"pgbackrest-{bucket}"
    for sub in ("lock", "log", "spool"):
        (d / sub).mkdir(parents=True)
    conf = d / "pgbackrest.conf"
    conf.write_text(f"""[global]
repo1-type=s3
repo1-s3-endpoint=127.0.0.1
repo1-storage-port={port}
repo1-storage-verify-tls=n
repo1-s3-uri-style=path
repo1-s3-bucket={bucket}
repo1-s3-region=us-east-1
repo1-s3-key=bench
repo1-s3-key-secret=bench-secret
repo1-path=/pgbackrest
process-max={jobs}
compress-type=zst
compress-level=3
start-fast=y
lock-path={d}/lock
log-path={d}/log
spool-path={d}/spool
log-level-console=warn
log-level-file=off

[bench]
pg1-path={cluster.data}
pg1-port={cluster.port}
pg1-socket-path={cluster.base}
""")
    chown_tree(d)
    conf.chmod(0o644)
    sh(["pgbackrest", f"--config={conf}", "--stanza=bench", "stanza-create"], user=OS_USER)
    return conf

if __name__ == "__main__":
    sys.exit(main())
