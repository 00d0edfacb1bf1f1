"""The WAL archiving row of ``scripts/bench`` alone, for A/B comparisons of ``wal push``.

Same harness as the bench's row: real 16 MiB segments of a throwaway PostgreSQL 15 cluster
laid out as ``pg_wal`` with an ``archive_status/*.ready`` file each (and ``global/pg_control``
beside it), one call per segment in order as `postgres` through the server venv, each
``.ready`` renamed ``.done`` after its call, the time being the sum of the calls. Each
contender is a source tree (the worktree, or ``git archive`` of a revision), timed against
moto S3 and a local repository, interleaved run by run; optionally pgBackRest
``archive-push --archive-async`` (through nginx TLS, as in the bench) as the reference.
Between contenders it waits until no push-ahead process holds the spool, so no run pays
for another's background work.

Usage (root): python3 scripts/walbench.py [--runs 5] [--old REV] [--repos s3,local] [--pgbackrest]
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import functools
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import bench  # noqa: E402
from bench import OS_USER, chown_tree, log, quote_sql, start_cluster, start_nginx, start_s3, timed  # noqa: E402
from server_tool import server_python  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def install(tree: Path, dest: Path, env: dict[str, str]) -> Path:
    """``tree``'s package installed world-readable with a wrapper as the bench does it."""
    dest.mkdir(parents=True)
    shutil.copytree(tree / "backup_tool", dest / "src" / "backup_tool", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([server_python(), "-m", "compileall", "-q", str(dest / "src" / "backup_tool")], check=True,
                   capture_output=True)
    chown_tree(dest)
    for root, _dirs, files in os.walk(dest):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)
    wrapper = dest / "backup-tool"
    assignments = " ".join(f"{k}={v}" for k, v in {"PYTHONPATH": str(dest / "src"), **env}.items())
    wrapper.write_text(f"#!/bin/sh\nexec env {assignments} {server_python()} -m backup_tool \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def make_segments(cluster: bench.Cluster, work: Path, count: int) -> list[Path]:
    src = work / "walsrc"
    src.mkdir()
    shutil.chown(src, OS_USER, OS_USER)

    def set_archive(command: str) -> None:
        cluster.psql(f"ALTER SYSTEM SET archive_command = {quote_sql(command)}", db="postgres")
        cluster.psql("SELECT pg_reload_conf()", db="postgres")
        time.sleep(1.0)

    def segno(name: str) -> int:
        return int(name[8:16], 16) * 0x100 + int(name[16:24], 16)

    set_archive(f"cp %p {src}/%f")
    current = "SELECT pg_walfile_name(pg_current_wal_insert_lsn())"
    first = cluster.psql(current, db="postgres")
    cluster.psql("CREATE TABLE walgen (id bigint, pad text)", db="postgres")
    while segno(cluster.psql(current, db="postgres")) - segno(first) <= count:
        cluster.psql("INSERT INTO walgen SELECT g, md5(random()::text) || md5(random()::text) "
                     "|| repeat(md5(g::text), 2) FROM generate_series(1, 100000) g", db="postgres")
    last = cluster.psql(current, db="postgres")
    cluster.psql("SELECT pg_switch_wal()", db="postgres")
    for _ in range(600):
        if (src / last).exists():
            break
        time.sleep(0.1)
    set_archive("/bin/true")
    names = sorted(f.name for f in src.iterdir() if len(f.name) == 24 and segno(f.name) > segno(first))
    return [src / n for n in names[:count]]


def wait_spool_idle(pg_wal: Path, timeout: float = 120) -> None:
    """Until no push-ahead process holds the spool's lock (new contenders only)."""
    lock = pg_wal / "backup-tool-spool" / "pushing.lock"
    deadline = time.monotonic() + timeout
    while lock.exists() and time.monotonic() < deadline:
        with open(lock) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                time.sleep(0.05)


def reap_orphans() -> None:
    """Collect the processes reparented to us (we are a subreaper): detached push-ahead
    processes, so that their CPU time counts in RUSAGE_CHILDREN."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def push_all(scratch: Path, cluster: bench.Cluster, segments: list[Path], argv_for,
             env: dict[str, str]) -> tuple[float, float]:
    """Sum of the calls' wall times, and the CPU time of every process they started
    (detached ones included), as the bench's row times them."""
    pg_wal = scratch / "pg_wal"
    status = pg_wal / "archive_status"
    status.mkdir(parents=True)
    (pg_wal.parent / "global").mkdir()
    shutil.copy2(cluster.data / "global" / "pg_control", pg_wal.parent / "global" / "pg_control")
    for seg in segments:
        os.link(seg, pg_wal / seg.name)
        (status / f"{seg.name}.ready").touch()
    chown_tree(pg_wal.parent)
    total = 0.0
    reap_orphans()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        for seg in segments:
            m = timed(argv_for(pg_wal / seg.name), env, user=OS_USER)
            (status / f"{seg.name}.ready").rename(status / f"{seg.name}.done")
            total += m.seconds
        wait_spool_idle(pg_wal)
        time.sleep(1.0)  # pgBackRest's async process ends on its own once its queue is empty
        reap_orphans()
    finally:
        shutil.rmtree(pg_wal.parent, ignore_errors=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return total, cpu


def pgbackrest_argv(conf: Path, p: Path) -> list[str]:
    return ["pgbackrest", f"--config={conf}", "--stanza=bench", f"--pg1-path={p.parent.parent}",
            "--archive-async", "archive-push", str(p)]


def tool_argv(wrapper: Path, repo: str, p: Path) -> list[str]:
    return [str(wrapper), "wal", "push", str(p), "--repo", repo]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--segments", type=int, default=bench.WAL_SEGMENTS)
    parser.add_argument("--old", action="append", default=[], metavar="REV",
                        help="a revision to compare against the worktree (repeatable)")
    parser.add_argument("--repos", default="s3,local")
    parser.add_argument("--pgbackrest", action="store_true", help="also time pgBackRest archive-push --archive-async")
    parser.add_argument("--jobs", type=int, default=2, help="pgBackRest process-max")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the calls run as 'postgres' like the archiver's)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: detached pushers are reaped here
    work = Path(tempfile.mkdtemp(prefix="bt-walbench-", dir="/tmp"))
    work.chmod(0o755)
    cluster = s3 = nginx = None
    try:
        cluster = start_cluster(work)
        s3 = start_s3()
        trees = {"worktree": ROOT}
        for rev in args.old:
            tree = work / f"rev-{rev}"
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "backup_tool"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            trees[rev] = tree
        wrappers = {name: install(tree, work / "bin" / name, s3.env) for name, tree in trees.items()}
        log(f"generating {args.segments} WAL segments")
        segments = make_segments(cluster, work, args.segments)
        contenders: list[tuple[str, object]] = []
        for name, wrapper in wrappers.items():
            for kind in args.repos.split(","):
                contenders.append((f"{name} {kind}", (wrapper, kind)))
        pgbr_conf = None
        if args.pgbackrest:
            nginx = start_nginx(work, s3.endpoint)
            contenders.append(("pgbackrest async", None))
        results: dict[str, list[float]] = {name: [] for name, _ in contenders}
        cpus: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for run in range(args.runs):
            order = contenders[run % len(contenders):] + contenders[:run % len(contenders)]
            for name, spec in order:
                scratch = work / "push" / f"{name.replace(' ', '-')}-{run}"
                scratch.mkdir(parents=True)
                argv_for: Callable[[Path], list[str]]
                if spec is None:
                    assert nginx is not None
                    pgbr_conf = bench.pgbackrest_config(work, s3.new_bucket(), nginx.port, cluster, args.jobs)
                    argv_for = functools.partial(pgbackrest_argv, pgbr_conf)
                else:
                    wrapper, kind = spec  # type: ignore[misc]
                    if kind == "s3":
                        repo = f"s3://{s3.new_bucket()}/walbench"
                    else:
                        repo_dir = scratch / "repo"
                        repo_dir.mkdir()
                        shutil.chown(repo_dir, OS_USER, OS_USER)
                        repo = str(repo_dir)
                    argv_for = functools.partial(tool_argv, wrapper, repo)
                os.sync()
                seconds, cpu = push_all(scratch, cluster, segments, argv_for, {**os.environ, **s3.env})
                results[name].append(seconds)
                cpus[name].append(cpu)
                log(f"run {run + 1}: {name:<24} {seconds:6.2f} s  cpu {cpu:6.2f} s  load {os.getloadavg()[0]:.1f}")
                shutil.rmtree(scratch, ignore_errors=True)
        print(f"\n{args.segments} segments, one call each; medians of {args.runs}: wall (sum of calls), CPU of "
              "every process the calls started (moto/nginx excluded); all runs")
        for name, times in results.items():
            print(f"{name:<26} {statistics.median(times):6.2f} s  cpu {statistics.median(cpus[name]):6.2f} s   "
                  + " ".join(f"{t:.2f}" for t in times) + "  cpu " + " ".join(f"{c:.2f}" for c in cpus[name]))
    finally:
        if nginx is not None:
            nginx.stop()
        if s3 is not None:
            s3.proc.terminate()
        if cluster is not None:
            cluster.ctl("-m", "immediate", "stop")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
