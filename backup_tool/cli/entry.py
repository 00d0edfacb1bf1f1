"""Process entry point, kept light: ``wal push``/``wal fetch`` called by PostgreSQL's
archiver and recovery once per file are answered from the spool before the CLI (Typer,
psycopg, boto3) is even imported, when the segment is already known to be durable in the
repository or already fetched; a plain ``wal fetch`` otherwise runs without the CLI.
``--version`` (and ``version``) alone is answered here too, as the CLI would answer it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backup_tool.physical.walspool import FetchArgs


def main() -> None:
    if sys.argv[1:] in (["--version"], ["version"]):
        from backup_tool import __version__

        print(f"backup-tool {__version__}")
        sys.exit(0)
    if sys.argv[1:3] in (["wal", "push"], ["wal", "fetch"]):
        from backup_tool.physical.walspool import never_archived, parse_fetch, try_fast_fetch, try_fast_push

        if try_fast_push(sys.argv[1:]) or try_fast_fetch(sys.argv[1:]):
            sys.exit(0)
        fetch = parse_fetch(sys.argv[1:])
        if fetch is not None:
            _quick_fetch(fetch, never_archived(fetch.name))
    from backup_tool.cli.program import main as cli_main

    cli_main()


def _quick_fetch(fetch: FetchArgs, never: bool) -> None:
    """``restore_command`` without the command line framework: exit 0 once the file is in
    place, 1 when it is not archived. Any other outcome returns, and the full command runs
    again to report it exactly as usual (the destination is only ever renamed into place)."""
    if not never:
        from backup_tool.physical import wal

        try:
            wal.quick_fetch(fetch.name, fetch.dest, fetch.repo, fetch.prefetch)
            sys.exit(0)
        except wal.WalMissingError:
            pass
        except Exception:  # noqa: BLE001 - the full command reports it
            return
    print(f"backup-tool: {fetch.name} is not in the archive (end of archive)", file=sys.stderr)
    sys.exit(1)
