"""The spool beside ``pg_wal``: acknowledgements of segments pushed ahead, segments fetched
ahead.

PostgreSQL starts ``archive_command`` and ``restore_command`` once per 16 MiB segment, so
the calls answered from the spool must cost little more than starting the interpreter.
This module therefore imports only the standard library (and :mod:`backup_tool.core.walnames`), and the executable's entry
point consults it before loading the command line, psycopg or boto3. An entry is trusted
only for the very same file (inode, size, modification time) and the same repository;
fetched files enter the read-ahead directory only after their sha256 matched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from backup_tool.config.locations import default_repo
from backup_tool.core.walnames import is_segment

SPOOL_DIR = "backup-tool-spool"


def spool_dir(wal_path: Path) -> Path:
    return wal_path.parent / SPOOL_DIR


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def repo_identity(url: str) -> str:
    """The repository URL as spool entries record it (without opening the repository)."""
    if url.startswith("s3://"):
        return url.rstrip("/")
    return str(Path(url.removeprefix("file://")).expanduser().absolute())


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    raw_size: int
    stored_size: int
    sha256: str
    already_archived: bool
    ahead: tuple[str, ...] = ()
    from_spool: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "raw_size": self.raw_size,
                "stored_size": self.stored_size, "sha256": self.sha256,
                "already_archived": self.already_archived, "pushed_ahead": list(self.ahead),
                "from_spool": self.from_spool}


def write_marker(path: Path, repo_url: str, result: PushResult) -> None:
    spool = spool_dir(path)
    spool.mkdir(mode=0o700, exist_ok=True)
    marker = spool / f"{path.name}.pushed"
    tmp = spool / f".{path.name}.pushed.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"repo": repo_url, "key": result.key, "sha256": result.sha256,
                               **_identity(path)}))
    os.replace(tmp, marker)


def fast_ack(wal_path: str | Path, repo_url: str) -> bool:
    """True (and the spool entry consumed) if this exact file was already pushed ahead to
    ``repo_url`` by an earlier batched call; False means: push it normally."""
    path = Path(wal_path)
    repo_url = repo_identity(repo_url)
    marker = spool_dir(path) / f"{path.name}.pushed"
    try:
        data = json.loads(marker.read_text())
        same = data.get("repo") == repo_url and all(data.get(k) == v for k, v in _identity(path).items())
    except (OSError, ValueError):
        return False
    marker.unlink(missing_ok=True)
    return bool(same)


def try_fast_push(argv: list[str], environ: dict[str, str] | None = None) -> bool:
    """Acknowledge ``backup-tool wal push WAL_PATH [--repo URL] [--batch N]`` from the spool
    without loading the command line framework or the S3 client.

    Meant to be called first thing by the executable's entry point with ``sys.argv[1:]``:
    True means the segment is durable in the repository and the process may exit 0; False
    (any other command line, no spool entry) means: run the command normally.
    """
    env = os.environ if environ is None else environ
    if argv[:2] != ["wal", "push"]:
        return False
    rest = argv[2:]
    repo = None
    path = None
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--repo", "--batch") and i + 1 < len(rest):
            if arg == "--repo":
                repo = rest[i + 1]
            i += 2
            continue
        if arg.startswith("--repo="):
            repo = arg[len("--repo="):]
        elif arg.startswith("--batch="):
            pass
        elif arg.startswith("-") or path is not None:
            return False
        else:
            path = arg
        i += 1
    if path is None:
        return False
    if repo is None:
        repo = env.get("BACKUP_TOOL_REPO")
    if not repo:
        repo = default_repo()
    return fast_ack(path, repo)


class FetchArgs(NamedTuple):
    name: str
    dest: str
    repo: str | None
    prefetch: int | None


def parse_fetch(argv: list[str]) -> FetchArgs | None:
    """The arguments of a plain ``wal fetch NAME DEST [--repo URL] [--prefetch N]
    [--abort-on-error]`` command line; None for anything else."""
    if argv[:2] != ["wal", "fetch"]:
        return None
    positional: list[str] = []
    options: dict[str, str] = {}
    rest = argv[2:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--repo", "--prefetch") and i + 1 < len(rest):
            options[arg] = rest[i + 1]
            i += 2
            continue
        if arg.startswith(("--repo=", "--prefetch=")):
            key, _, value = arg.partition("=")
            options[key] = value
        elif arg.startswith("-"):
            if arg != "--abort-on-error":
                return None
        else:
            positional.append(arg)
        i += 1
    prefetch = options.get("--prefetch")
    if len(positional) != 2 or (prefetch is not None and not prefetch.isdigit()):
        return None
    return FetchArgs(positional[0], positional[1], options.get("--repo"),
                     int(prefetch) if prefetch is not None else None)


def try_fast_fetch(argv: list[str]) -> bool:
    """``backup-tool wal fetch NAME DEST`` answered from the read-ahead directory without
    loading the command line framework or the repository client (see :func:`try_fast_push`)."""
    parsed = parse_fetch(argv)
    return parsed is not None and take_prefetched(parsed.name, parsed.dest)


def never_archived(name: str) -> bool:
    """Files no archive can hold: timeline 1 has no history file (PostgreSQL still asks for
    it when it writes the history of the timeline it promotes to)."""
    return name == "00000001.history"


def prefetch_dir(destination: Path) -> Path:
    return destination.parent / SPOOL_DIR / "prefetch"


def take_prefetched(name: str, destination: str | Path) -> bool:
    """Put ``name`` in place if a read-ahead (or an earlier fetch) already downloaded and
    verified it.

    Files reach the read-ahead directory only after their sha256 matched (renamed into it
    complete), so using one is as safe as fetching it. The file is linked, not moved: at the
    end of the archive PostgreSQL asks again for the last segment it replayed. Segments of
    the same timeline older than one taken are dropped: recovery has moved past them.
    """
    dest = Path(destination)
    folder = prefetch_dir(dest)
    if not folder.is_dir():
        return False
    if not keep_fetched(folder / name, dest):
        return False
    drop_older(folder, name)
    return True


def drop_older(folder: Path, name: str) -> None:
    """Remove the read-ahead directory's segments of ``name``'s timeline older than ``name``:
    recovery asked for ``name``, so it has moved past them."""
    if is_segment(name):
        for entry in os.scandir(folder):
            if is_segment(entry.name) and entry.name[:8] == name[:8] and entry.name < name:
                Path(entry.path).unlink(missing_ok=True)


def keep_fetched(source: Path, dest: Path) -> bool:
    """Make ``dest`` a verified copy of ``source`` (a hard link, renamed into place) while
    ``source`` stays; False if ``source`` is not there."""
    tmp = dest.with_name(f".{dest.name}.backup-tool-{os.getpid()}")
    try:
        os.link(source, tmp)
    except FileNotFoundError:
        return False
    except OSError:
        import shutil

        try:
            shutil.copyfile(source, tmp)
        except FileNotFoundError:
            return False
    try:
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return True
