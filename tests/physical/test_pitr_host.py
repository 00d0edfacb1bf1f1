"""Settings of the restored configuration this host cannot honour are found (read with
``postgres -C``, while the recovered server may still run) and overridden before the start."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from support.clusters import find_pg_bin_dir

from backup_tool.core.report import NullReporter
from backup_tool.physical import pitr
from backup_tool.postgres.cluster import LocalServer, is_root


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A directory the server's OS user can enter (pytest's own is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="backup-tool-host-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_missing_socket_directory_and_tls_files_are_overridden(reachable_tmp: Path) -> None:
    tmp_path = reachable_tmp
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "PG_VERSION").write_text("15\n")
    (data / "postgresql.conf").write_text("unix_socket_directories = '/nonexistent/sock, @abstract'\n"
                                          "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    (data / "postgresql.auto.conf").write_text("port = 5999\n")
    (data / "server.crt").write_text("only the certificate is here\n")
    user = "postgres" if is_root() else os.environ.get("USER", "")
    if is_root():
        for path in (data, *data.iterdir()):
            shutil.chown(path, user)
    server = LocalServer(data, user, find_pg_bin_dir(), 5999, tmp_path / "s", tmp_path / "log")
    changes = pitr._host_changes(server)
    fallback = "/var/run/postgresql" if Path("/var/run/postgresql").is_dir() else "/tmp"
    assert changes == {"unix_socket_directories": fallback, "ssl": "off"}
    pitr._adapt_to_this_host(server, NullReporter(), changes)
    assert server.config_value("unix_socket_directories") == fallback
    assert server.config_value("ssl") == "off" and server.config_value("port") == "5999"
