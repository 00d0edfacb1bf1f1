"""The spool beside ``pg_wal``: segments fetched ahead for recovery, and the result of a push.

PostgreSQL starts ``restore_command`` once per 16 MiB segment, so the calls answered from
the spool must cost little more than starting the interpreter. This module therefore
imports only the standard library (and :mod:`backup_tool.core.walnames`), and the
executable's entry point consults it before loading the command line, psycopg or boto3.
Fetched files enter the read-ahead directory only after their sha256 matched. The pushing
side of the spool (acknowledgements of segments pushed ahead) is
:mod:`backup_tool.physical.walack`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from backup_tool.core.walnames import is_segment
from backup_tool.physical import walack

SPOOL_DIR = walack.SPOOL_DIR


def spool_dir(wal_path: Path) -> Path:
    return wal_path.parent / SPOOL_DIR


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
