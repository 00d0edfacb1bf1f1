"""The WAL archive belongs to one cluster (``wal/archive.info``).

Data directories here are laid out as PostgreSQL lays them out: ``global/pg_control`` starting
with the system identifier (little-endian), ``PG_VERSION``, and segments in ``pg_wal`` whose
first page is a long header carrying the same identifier. The last test runs two real
clusters archiving (as the postgres OS user) into one repository."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy, Rule
from server_tool import archive_settings, archiving_workspace
from support.cli import Cli
from support.clusters import PgServer, start_pg_server

from backup_tool.physical import wal
from backup_tool.repository import walidentity
from backup_tool.repository.storage import open_storage

SEG = 16 << 20
SYSID_A = 7301234567890123456
SYSID_B = 7309876543210987654


def segment_bytes(sysid: int, name: str, payload: int = 8192) -> bytes:
    """A segment's first page: XLogLongPageHeaderData (magic of PostgreSQL 15, long header flag,
    timeline, page address, system identifier, segment and block size), then WAL-ish bytes."""
    tli, segno = int(name[:8], 16), wal.segment_number(name)
    header = (0xD110).to_bytes(2, "little") + (0x0006).to_bytes(2, "little") + tli.to_bytes(4, "little")
    header += (segno * SEG).to_bytes(8, "little") + bytes(8) + sysid.to_bytes(8, "little")
    header += SEG.to_bytes(4, "little") + (8192).to_bytes(4, "little")
    return header + os.urandom(payload)


def data_dir(root: Path, sysid: int, names: list[str], major: int = 15) -> Path:
    """A data directory of the cluster ``sysid`` holding ``names`` in pg_wal (marked ready)."""
    (root / "global").mkdir(parents=True)
    (root / "global" / "pg_control").write_bytes(sysid.to_bytes(8, "little") + os.urandom(8184))
    (root / "PG_VERSION").write_text(f"{major}\n")
    status = root / "pg_wal" / "archive_status"
    status.mkdir(parents=True)
    for name in names:
        (root / "pg_wal" / name).write_bytes(segment_bytes(sysid, name))
        (status / f"{name}.ready").touch()
    return root


def wal_keys(repo: str) -> list[str]:
    return sorted(o.key for o in open_storage(repo).list("wal/"))


def test_identities_are_read_without_a_connection(tmp_path: Path) -> None:
    name = wal.segment_name(1, 7)
    pgdata = data_dir(tmp_path / "a", SYSID_A, [name])
    assert walidentity.pg_control_identity(pgdata) == walidentity.ClusterIdentity(SYSID_A, 15)
    assert walidentity.segment_identity(pgdata / "pg_wal" / name) == walidentity.ClusterIdentity(SYSID_A)
    loose = tmp_path / name
    loose.write_bytes(segment_bytes(SYSID_B, name))
    assert walidentity.wal_file_identity(loose) == walidentity.ClusterIdentity(SYSID_B)
    random = tmp_path / "random" / wal.segment_name(1, 8)
    random.parent.mkdir()
    random.write_bytes(os.urandom(4096))
    assert walidentity.wal_file_identity(random) is None
    a, b = walidentity.ClusterIdentity(SYSID_A, 15), walidentity.ClusterIdentity(SYSID_B, 15)
    assert walidentity.mismatch(a, b) and not walidentity.mismatch(a, walidentity.ClusterIdentity(SYSID_A))
    assert walidentity.mismatch(a, walidentity.ClusterIdentity(SYSID_A, 16))


def test_push_from_another_cluster_is_refused(cli: Any, repo: str, tmp_path: Path) -> None:
    names = [wal.segment_name(1, n) for n in (1, 2)]
    a = data_dir(tmp_path / "a", SYSID_A, names)
    b = data_dir(tmp_path / "b", SYSID_B, [wal.segment_name(1, n) for n in (1, 3)])
    (b / "pg_wal" / "00000002.history").write_text("1\t0/3000000\tno recovery target specified\n")

    first = cli("wal", "push", a / "pg_wal" / names[0], "--repo", repo, "--batch", "1")
    assert first.returncode == 0, first.stderr
    info = json.loads(open_storage(repo).get_bytes("wal/archive.info"))
    assert (info["system_identifier"], info["pg_major"]) == (str(SYSID_A), 15)
    before = wal_keys(repo)
    assert len(before) == 2

    for name in (wal.segment_name(1, 3), wal.segment_name(1, 1), "00000002.history"):
        refused = cli("wal", "push", b / "pg_wal" / name, "--repo", repo)
        assert refused.returncode == 1, refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"this cluster has system identifier {SYSID_B} (PostgreSQL 15)" in line
        assert f"belongs to system identifier {SYSID_A} (PostgreSQL 15)" in line
        assert (b / "pg_wal" / name).exists()
    assert wal_keys(repo) == before, "nothing of the other cluster was written"

    again = cli("wal", "push", a / "pg_wal" / names[1], "--repo", repo)
    assert again.returncode == 0, again.stderr
    assert len(wal_keys(repo)) == 3


def test_verified_identity_is_cached_but_every_segment_is_checked(
        cli: Any, s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    repo = f"s3://{s3_bucket}/prod"
    names = [wal.segment_name(1, n) for n in range(1, 5)]
    a = data_dir(tmp_path / "a", SYSID_A, names)
    reads = Rule("error500", method="GET", path=r"/wal/archive\.info$", skip=10**6)
    writes = Rule("error500", method="PUT", path=r"/wal/archive\.info$", skip=10**6)
    with FaultProxy(s3_server.endpoint_url, [reads, writes]) as proxy:
        env = {"AWS_ENDPOINT_URL_S3": proxy.url}
        assert cli("wal", "push", a / "pg_wal" / names[0], "--repo", repo, "--batch", "1", env=env).returncode == 0
        assert (reads.seen, writes.seen) == (2, 1), "absent: written once, then read back"
        for name in names[1:3]:
            done = cli("wal", "push", a / "pg_wal" / name, "--repo", repo, "--batch", "1", env=env)
            assert done.returncode == 0, done.stderr
        assert (reads.seen, writes.seen) == (2, 1), "verified once, then trusted from the spool"

        stray = a / "pg_wal" / names[3]
        stray.write_bytes(segment_bytes(SYSID_B, names[3]))
        refused = cli("wal", "push", stray, "--repo", repo, "--batch", "1", env=env)
    assert refused.returncode == 1
    assert str(SYSID_A) in refused.stderr and str(SYSID_B) in refused.stderr
    assert sorted(k.split("/")[-1].split("-")[0] for k in wal_keys(repo)) == sorted(["archive.info"] + names[:3])


def _switch(server: PgServer) -> str:
    with server.admin_conn() as conn:
        last = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
    return str(last)


def _sysid(server: PgServer) -> int:
    with server.admin_conn() as conn:
        return int(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])


def _archiver(server: PgServer) -> tuple[Any, int]:
    with server.admin_conn() as conn:
        row = conn.execute("SELECT last_archived_wal, failed_count FROM pg_stat_archiver").fetchone()
    return row[0], int(row[1])


@pytest.mark.slow
def test_two_clusters_into_one_repository(tmp_path: Path) -> None:
    base, wrapper, repo = archiving_workspace("backup-tool-walid-test-")
    settings = archive_settings(wrapper, repo)
    servers: list[PgServer] = []
    cli = Cli(workdir=tmp_path)
    try:
        first = start_pg_server(settings)
        servers.append(first)
        shutil.chown(repo, first.os_user, first.os_user)
        last = _switch(first)
        deadline = time.monotonic() + 60
        while (_archiver(first)[0] or "") < last:
            assert _archiver(first)[1] == 0 and time.monotonic() < deadline, f"see {first.log_file}"
            time.sleep(0.1)
        sysid_a = _sysid(first)
        recorded = walidentity.read_archive_identity(open_storage(str(repo)))
        assert recorded == walidentity.ClusterIdentity(sysid_a, 15)
        before = wal_keys(str(repo))

        second = start_pg_server(settings)
        servers.append(second)
        sysid_b = _sysid(second)
        assert sysid_b != sysid_a
        _switch(second)
        deadline = time.monotonic() + 60
        while _archiver(second)[1] == 0:
            assert time.monotonic() < deadline, f"the second cluster's archiving never failed: {second.log_file}"
            time.sleep(0.1)
        assert _archiver(second)[0] is None
        log = second.log_file.read_text()
        assert f"this cluster has system identifier {sysid_b}" in log and f"belongs to system identifier {sysid_a}" in log
        assert wal_keys(str(repo)) == before, "the second cluster's WAL never reached the archive"

        report = cli("check", "--repo", str(repo), "--dsn", second.dsn(), "--json")
        checks = {c["name"]: c for c in report.json()["checks"]}
        assert checks["archive_identity"]["ok"] is False
        assert str(sysid_a) in checks["archive_identity"]["detail"] and str(sysid_b) in checks["archive_identity"]["detail"]
        own = {c["name"]: c for c in cli.json("check", "--repo", str(repo), "--dsn", first.dsn(), expect_rc=None)["checks"]}
        assert own["archive_identity"]["ok"] is True, own["archive_identity"]

        refused = cli("backup", "base", "--repo", str(repo), "--dsn", second.dsn())
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert str(sysid_a) in refused.stderr and str(sysid_b) in refused.stderr
        assert not list(open_storage(str(repo)).list("backups/")) and not list(open_storage(str(repo)).list("manifests/"))
    finally:
        for server in servers:
            server.destroy()
        shutil.rmtree(base, ignore_errors=True)
