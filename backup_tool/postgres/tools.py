"""Which PostgreSQL programs run against which server.

A ``pg_dump`` older than the server refuses to dump it, and one older than a restore's
target may not know what the target needs; a base backup only starts under the very
major's server. So every program is chosen for a major: client tools (``pg_dump``,
``pg_restore``, ``psql``, ``pg_dumpall``) of that major or newer, physical programs
(``pg_basebackup``, ``pg_waldump``, ``pg_ctl``, ``postgres``, ``initdb``) of exactly it.

Where to look, first fit wins: an explicit directory (``--pg-bin DIR`` or
``BACKUP_TOOL_PG_BIN``; the older ``BACKUP_TOOL_PG_BINDIR`` too), the connected server's
own bin directory when it runs on this machine, Debian's ``/usr/lib/postgresql/<major>/bin``
(the server's major first, then newer ones), then ``PATH``. An explicit directory is
authoritative: a program there that does not fit is refused, not passed over. A program
found nowhere, or only too old, is one :class:`ToolError` naming the major needed and how
to get it.

Guaranteed: :func:`choose` is pure (the candidates and their versions are its input);
:func:`find` only adds probing (``--version``, cached per path). Server bin directories
learnt from connections (:func:`note_server_bindir`) are remembered for the process, keyed
by major, the way ``PATH`` is: a fact about this machine, not a decision.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from backup_tool.errors import DatabaseError

PG_BIN_ENV = "BACKUP_TOOL_PG_BIN"
LEGACY_PG_BIN_ENV = "BACKUP_TOOL_PG_BINDIR"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
CLIENT_TOOLS = ("pg_dump", "pg_restore", "psql", "pg_dumpall")
EXACT_PROGRAMS = frozenset({"pg_basebackup", "pg_waldump", "pg_ctl", "postgres", "initdb", "pg_controldata"})
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class ToolError(DatabaseError):
    """No program of a fitting major could be found."""


class Match(Enum):
    AT_LEAST = "at least"
    EXACT = "exactly"


class Source(Enum):
    EXPLICIT = "--pg-bin / BACKUP_TOOL_PG_BIN"
    SERVER = "the server's own bin directory"
    DEBIAN = "Debian's /usr/lib/postgresql"
    PATH = "PATH"


@dataclass(frozen=True)
class Candidate:
    """A program file that exists, where it was found, and its version (None: unreadable)."""

    path: Path
    source: Source
    version: str | None

    @property
    def major(self) -> int | None:
        return int(self.version.split(".")[0]) if self.version else None


@dataclass(frozen=True)
class Tool:
    """The program chosen: its path, version (``17.10``) and where it came from."""

    name: str
    path: Path
    version: str
    source: Source

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "version": self.version, "source": self.source.name.lower()}


def match_for(name: str) -> Match:
    return Match.EXACT if name in EXACT_PROGRAMS else Match.AT_LEAST


def fits(major: int | None, need: int, match: Match) -> bool:
    if major is None:
        return False
    return major == need if match is Match.EXACT else major >= need


def parse_version(text: str) -> str | None:
    """``17.10`` from ``pg_dump (PostgreSQL) 17.10 (Debian 17.10-1)``; None if absent."""
    found = _VERSION_RE.search(text)
    if not found:
        return None
    return found.group(1) + (f".{found.group(2)}" if found.group(2) else "")


def search_dirs(need: int, explicit: Path | None, server_bindir: Path | None,
                debian_majors: Sequence[int], path_env: str) -> list[tuple[Source, Path]]:
    """The directories to look in, in order (see the module docstring)."""
    dirs: list[tuple[Source, Path]] = []
    if explicit is not None:
        return [(Source.EXPLICIT, explicit)]
    if server_bindir is not None:
        dirs.append((Source.SERVER, server_bindir))
    for major in sorted((m for m in debian_majors if m >= need), key=lambda m: (m != need, m)):
        dirs.append((Source.DEBIAN, DEBIAN_ROOT / str(major) / "bin"))
    dirs += [(Source.PATH, Path(p)) for p in path_env.split(os.pathsep) if p]
    return dirs


def install_hint(name: str, need: int, match: Match) -> str:
    which = f"PostgreSQL {need}" if match is Match.EXACT else f"PostgreSQL {need} or newer"
    package = f"postgresql-{need}" if name in EXACT_PROGRAMS else f"postgresql-client-{need}"
    return (f"install {which} ({package} from the PGDG apt repository on Debian/Ubuntu), "
            f"or point --pg-bin / {PG_BIN_ENV} at its bin directory")


def choose(name: str, need: int, match: Match, candidates: Sequence[Candidate]) -> Tool:
    """The first candidate of a fitting major (only explicit ones count when there are any);
    a ToolError naming the major needed otherwise."""
    explicit = [c for c in candidates if c.source is Source.EXPLICIT]
    for cand in explicit or candidates:
        if cand.version is not None and fits(cand.major, need, match):
            return Tool(name, cand.path, cand.version, cand.source)
    wanted = f"PostgreSQL {need}" if match is Match.EXACT else f"PostgreSQL {need} or newer"
    if explicit:
        c = explicit[0]
        found = f"is PostgreSQL {c.version}" if c.version else "does not run"
        raise ToolError(f"{name} in {c.path.parent} {found}; the server needs {wanted}",
                        install_hint(name, need, match))
    seen = sorted({c.version for c in candidates if c.version}, key=lambda v: [int(x) for x in v.split(".")])
    also = f" (found only {', '.join(seen)})" if seen else ""
    raise ToolError(f"{name} of {wanted} not found{also}", install_hint(name, need, match))


_server_bindirs: dict[int, Path] = {}
_versions: dict[Path, str | None] = {}


def note_server_bindir(major: int, bindir: Path) -> None:
    """Remember that this machine's server of ``major`` runs from ``bindir``."""
    _server_bindirs[major] = bindir


def server_bindir(major: int) -> Path | None:
    return _server_bindirs.get(major)


def program_version(path: Path) -> str | None:
    """The version a program reports (cached per path); None if it does not run."""
    if path not in _versions:
        try:
            done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30, check=False,
                                  stdin=subprocess.DEVNULL)
            _versions[path] = parse_version(done.stdout) if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            _versions[path] = None
    return _versions[path]


def explicit_dir(env: Mapping[str, str]) -> Path | None:
    value = env.get(PG_BIN_ENV) or env.get(LEGACY_PG_BIN_ENV)
    return Path(value).expanduser() if value else None


def _debian_majors() -> list[int]:
    try:
        return sorted(int(p.name) for p in DEBIAN_ROOT.iterdir() if p.name.isdigit())
    except OSError:
        return []


def candidates(name: str, need: int, env: Mapping[str, str] | None = None) -> list[Candidate]:
    """Every existing ``name`` along the search order, with its version."""
    env = os.environ if env is None else env
    dirs = search_dirs(need, explicit_dir(env), server_bindir(need), _debian_majors(), env.get("PATH", ""))
    found: list[Candidate] = []
    seen: set[Path] = set()
    for source, directory in dirs:
        path = directory / name
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        usable = os.access(path, os.X_OK)
        found.append(Candidate(path, source, program_version(path) if usable else None))
        if source is Source.EXPLICIT or fits(found[-1].major, need, match_for(name)):
            break
    if not found and explicit_dir(env) is not None:
        explicit = explicit_dir(env)
        assert explicit is not None
        raise ToolError(f"{name} is not in {explicit} (--pg-bin / {PG_BIN_ENV})",
                        f"point it at a PostgreSQL {need} bin directory")
    return found


def find(name: str, need: int, env: Mapping[str, str] | None = None) -> Tool:
    """The ``name`` to run against a server of major ``need`` (see the module docstring)."""
    return choose(name, need, match_for(name), candidates(name, need, env))
