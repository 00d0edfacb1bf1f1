"""Preflight checks (``backup-tool check``): is everything in place for the next backup?

Checks the policy, the repository (reachable, writable, manifests readable), the database
(reachable, version, privileges to dump), the PostgreSQL client tools, and — when the
database is set up for point-in-time recovery — WAL archiving: archive_command pushes to
this repository, pg_stat_archiver shows no failure, no gap after the oldest base backup,
and the newest segment is recent. Each check says
what is wrong and what to do, so cron's first run does not have to be the test.

A local repository is also tested as the user PostgreSQL runs ``archive_command`` as (the
data directory's owner) when that is not the user running ``check`` — as root, by a child
process that becomes that user. ``check`` leaves no directory of its own behind: its write
probe would otherwise create the repository owned by whoever ran it.
"""

from __future__ import annotations

import os
import pwd
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from backup_tool.config.settings import Settings
from backup_tool.core.kinds import BackupKind
from backup_tool.errors import BackupToolError
from backup_tool.jobs.expire import check_object_lock
from backup_tool.physical import wal
from backup_tool.physical.wal import repository_health
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import tools as pg_tools
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.catalog import Catalog
from backup_tool.repository.storage import Storage, open_storage
from backup_tool.repository.storage.encrypted import ALGORITHM, KEY_HINT, encryption_of
from backup_tool.repository.walidentity import ClusterIdentity, mismatch, read_archive_identity
from backup_tool.validation.validate import Check, ValidationReport, check_restore_finished


def tools_check(major: int, uses_pitr: bool) -> Check:
    """Which PostgreSQL programs backups and restores of this server will run (with
    ``pg_basebackup`` when the repository holds base backups), or the one that is missing."""
    names = (*pg_tools.CLIENT_TOOLS, *(("pg_basebackup",) if uses_pitr else ()))
    try:
        found = [pg_tools.find(name, major) for name in names]
    except pg_tools.ToolError as exc:
        return Check("client_tools", False, str(exc))
    return Check("client_tools", True, ", ".join(f"{t.name} {t.version} ({t.path})" for t in found))


def archive_checks(conn: Any, storage: Storage, settings: Settings, uses_pitr: bool) -> list[Check]:
    """Archiving healthy, when this database is meant to be recoverable to a point in time."""
    from datetime import timedelta


    server = wal.archiving_checks(conn, storage)
    off = [c for c in server if c.name == "archive_mode" and not c.ok]
    if off and not uses_pitr:
        return [Check("archiving", True, "archive_mode is off and the repository holds no base backup or WAL: "
                                         "logical backups only, no point-in-time recovery")]
    minutes = settings.policy.monitoring.wal_max_age_minutes
    health = repository_health(settings).checks(timedelta(minutes=minutes) if minutes else None)
    return server + [archive_identity_check(conn, storage)] + health


def archive_identity_check(conn: Any, storage: Storage) -> Check:
    """The WAL archive belongs to this cluster (``wal/archive.info``, see :mod:`backup_tool.repository.walidentity`)."""
    row = conn.execute("SELECT system_identifier, current_setting('server_version_num')::int / 10000"
                       " FROM pg_control_system()").fetchone()
    assert row is not None
    local = ClusterIdentity(int(row[0]), int(row[1]))
    try:
        recorded = read_archive_identity(storage)
    except BackupToolError as exc:
        return Check("archive_identity", False, exc.message)
    if recorded is None:
        return Check("archive_identity", True, f"no cluster recorded yet in {storage.url}: the first wal push "
                                               f"records this one ({local.describe()})")
    if mismatch(recorded, local):
        return Check("archive_identity", False,
                     f"the WAL archive in {storage.url} belongs to {recorded.describe()}, not to this cluster "
                     f"({local.describe()}): its wal push is refused; give each cluster its own repository")
    return Check("archive_identity", True, f"the WAL archive belongs to this cluster ({local.describe()})")


@dataclass(frozen=True)
class DirStat:
    """What decides whether a user may enter or write a directory (ACLs aside)."""

    path: str
    uid: int
    gid: int
    mode: int

    @classmethod
    def of(cls, path: Path) -> "DirStat":
        st = path.stat()
        return cls(str(path), st.st_uid, st.st_gid, st.st_mode)


def mode_allows(d: DirStat, uid: int, gids: frozenset[int], bits: int) -> bool:
    """POSIX permission bits (``bits`` of 0o7: r=4, w=2, x=1) for ``uid`` in ``gids``: owner
    class, else group class, else other — never a union of classes, as the kernel decides."""
    if uid == 0:
        return True
    shift = 6 if d.uid == uid else 3 if d.gid in gids else 0
    return (d.mode >> shift) & bits == bits


def first_blocked(ancestors: Sequence[DirStat], writable: Sequence[DirStat], uid: int,
                  gids: frozenset[int]) -> DirStat | None:
    """The first directory that stops ``uid`` from writing into the repository: an ancestor it
    may not search (x), or a repository directory it may not write and search (wx). Pure."""
    for d in ancestors:
        if not mode_allows(d, uid, gids, 0o1):
            return d
    for d in writable:
        if not mode_allows(d, uid, gids, 0o3):
            return d
    return None


def repository_dirs(root: Path) -> tuple[list[Path], list[Path]]:
    """(directories to search, directories to write) for ``wal push`` into a local repository:
    it writes only under ``wal/`` (creating it, or the root, in the nearest existing parent)."""
    wal = root / "wal"
    existing = wal
    while not existing.exists():
        existing = existing.parent
    ancestors = list(reversed(existing.parents))
    if existing != wal:
        return ancestors, [existing]
    return ancestors, [wal] + [Path(d) / n for d, names, _ in os.walk(wal) for n in names]


def _probe_as(uid: int, gid: int, groups: list[int], paths: Iterable[Path], modes: Sequence[int]) -> str | None:
    """Run by root: in a child process that becomes ``uid`` (so ACLs count too), the first of
    ``paths`` that user cannot access with the matching ``modes``, or None."""
    paths = list(paths)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_fd)
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            blocked = next((str(p) for p, m in zip(paths, modes, strict=True) if not os.access(p, m)), "")
            os.write(write_fd, blocked.encode() or b"\0")
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the parent reads an empty pipe as "could not test"
            os._exit(1)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        answer = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not answer:
        raise OSError("could not switch to the server's user to test the repository")
    return None if answer == b"\0" else answer.decode()


def archiver_access_check(conn: Any, repo_url: str) -> Check | None:
    """Can ``archive_command`` — run by the server as the owner of its data directory — write
    into a local repository? ``check`` itself may run as root, for whom every directory is
    writable; the server's user may not be. None when it does not apply (S3, a remote server,
    archiving off, settings not readable)."""
    if repo_url.startswith("s3://"):
        return None
    row = conn.execute("SELECT current_setting('archive_mode'),"
                       " (SELECT setting FROM pg_settings WHERE name = 'data_directory'),"
                       " (SELECT system_identifier FROM pg_control_system())").fetchone()
    if row is None or row[0] not in ("on", "always") or not row[1]:
        return None  # archiving off, or a role that may not see data_directory
    try:
        owner = Path(row[1]).stat().st_uid
        if os.geteuid() == 0:  # a same-named directory on this machine is not the server's
            with open(Path(row[1]) / "global" / "pg_control", "rb") as fh:
                if int.from_bytes(fh.read(8), "little") != int(row[2]):
                    return None
    except OSError:
        return None  # the server runs on another machine (or its data directory is hidden from us)
    if owner == os.geteuid():
        return None  # the repository probe already ran as this user
    root = Path(repo_url.removeprefix("file://")).expanduser().absolute()
    try:
        user = pwd.getpwuid(owner)
        name, gid = user.pw_name, user.pw_gid
    except KeyError:
        name, gid = str(owner), owner
    groups = os.getgrouplist(name, gid) if name != str(owner) else [gid]
    ancestors, writable = repository_dirs(root)
    try:
        if os.geteuid() == 0:
            blocked = _probe_as(owner, gid, groups, [*ancestors, *writable],
                                [os.X_OK] * len(ancestors) + [os.W_OK | os.X_OK] * len(writable))
        else:
            hit = first_blocked([DirStat.of(p) for p in ancestors], [DirStat.of(p) for p in writable],
                                owner, frozenset(groups))
            blocked = hit.path if hit else None
    except OSError as exc:
        return Check("repository_archiver", False, f"cannot test whether {name} can write {root}: {exc}")
    if blocked is None:
        return Check("repository_archiver", True,
                     f"{root} writable by {name}, the user archive_command runs as")
    return Check("repository_archiver", False,
                 f"{blocked} is not {'searchable' if Path(blocked) in ancestors else 'writable'} by {name} "
                 f"(uid {owner}), the user PostgreSQL runs archive_command as, so every wal push fails "
                 f"(PostgreSQL retries about a minute later) — fix: {access_fix(Path(blocked), root, ancestors, name)}")


def access_fix(blocked: Path, root: Path, ancestors: Sequence[Path], user: str) -> str:
    """The command that lets ``user`` write the repository, for the directory that stopped it."""
    if blocked in ancestors:
        return f"chmod o+x {blocked} (or keep the repository where {user} can reach it)"
    if blocked == root or root in blocked.parents:
        return (f"chown -R {user}: {root} (shared with backups run as root: see README "
                "'A local repository shared by root and postgres')")
    return f"install -d -o {user} -g {user} -m 750 {root}"


def encryption_check(storage: Storage, key_ids: Iterable[str | None]) -> Check:
    """Which key new backups will use, and whether it is the one the repository's backups need
    (``key_ids``: the key id each backup is sealed with, None for a plaintext one)."""
    key = encryption_of(storage)
    used = sorted({k for k in key_ids if k})
    if key is None:
        if used:
            return Check("encryption", False, f"backups here are encrypted (key id {', '.join(used)}) but no key is "
                         f"configured: backups and 'wal push' refuse to write plaintext here and restores fail — {KEY_HINT}")
        return Check("encryption", True, "off: objects are stored unencrypted "
                                         "(set BACKUP_TOOL_ENCRYPTION_KEY_FILE to encrypt new backups)")
    others = [k for k in used if k != key.key_id]
    return Check("encryption", True, f"{ALGORITHM}, key id {key.key_id}" + (
        f"; older backups use key id {', '.join(others)}: keep that key in BACKUP_TOOL_PREVIOUS_KEYS_FILE until "
        "they expire" if others else ""))


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


@contextmanager
def _leave_local_dirs_as_found(repo_url: str) -> Iterator[None]:
    """The write probe of a local repository creates its root and ``tmp/`` when missing; remove
    what it created, so that ``check`` run as root leaves no root-owned directory where the
    server's archive_command must write."""
    if repo_url.startswith("s3://"):
        yield
        return
    root = Path(repo_url.removeprefix("file://")).expanduser().absolute()
    missing = [p for p in (root / "tmp", root, *root.parents) if not p.exists()]
    try:
        yield
    finally:
        for path in missing:
            try:
                path.rmdir()
            except FileNotFoundError:
                continue  # the probe's delete already pruned it
            except OSError:
                break


def run_checks(settings: Settings) -> ValidationReport:
    checks = [Check("policy", True, f"{settings.policy.name} ({settings.policy.source})")]
    storage: Storage | None = None
    uses_pitr = False
    try:
        storage = open_storage(settings.repo_url)
        with _leave_local_dirs_as_found(settings.repo_url):
            storage.check_writable()
        entries, problems = Catalog(storage).entries()
        uses_pitr = any(e.record.get("kind") == BackupKind.BASE for e in entries) or any(
            True for _ in storage.list("wal/"))
        if problems:
            checks.append(Check("repository", False, problems[0].message))
        else:
            checks.append(Check("repository", True, f"{storage.url} writable by {_user_name(os.geteuid())}, "
                                                    f"{len(entries)} backups"))

        ok, detail = check_object_lock(storage, settings.policy)
        checks.append(Check("object_lock", ok, detail))
        checks.append(encryption_check(storage, [e.key_id for e in entries]))
    except BackupToolError as exc:
        checks.append(Check("repository", False, str(exc)))
    conninfo = ConnInfo(settings.dsn)
    try:
        with conninfo.connect() as conn:
            info = postgres.server_info(conn)
            checks.append(Check("database", True, f"{conninfo.redacted()}: PostgreSQL {info['server_version']}"))
            checks.append(check_restore_finished(conn))
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE NOT has_table_privilege(c.oid, 'SELECT'))"
                "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                f" WHERE c.relkind IN ('r', 'p', 'S') AND {postgres.SYSTEM_SCHEMA_FILTER}").fetchone()
            unreadable = row[0] if row else 0
            checks.append(Check("privileges", not unreadable,
                                "can read every table" if not unreadable else
                                f"{unreadable} tables/sequences not readable by this user: grant SELECT or use the owner"))
            checks.append(tools_check(info["server_version_num"] // 10000, uses_pitr))
            if storage is not None:
                access = archiver_access_check(conn, settings.repo_url)
                if access is not None:
                    checks.append(access)
                checks.extend(archive_checks(conn, storage, settings, uses_pitr))
    except BackupToolError as exc:
        checks.append(Check("database", False, str(exc)))
    return ValidationReport(conninfo.redacted(), None, tuple(checks))
