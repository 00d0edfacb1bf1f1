"""Process entry point, kept light: ``wal push``/``wal fetch`` called by PostgreSQL's
archiver and recovery are answered from the spool before the CLI (Typer, psycopg, boto3)
is even imported, when the segment is already known to be durable in the repository."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:3] in (["wal", "push"], ["wal", "fetch"]):
        from backup_tool.walspool import never_archived, parse_fetch, try_fast_fetch, try_fast_push

        if try_fast_push(sys.argv[1:]) or try_fast_fetch(sys.argv[1:]):
            sys.exit(0)
        fetch = parse_fetch(sys.argv[1:])
        if fetch is not None and never_archived(fetch[0]):
            print(f"backup-tool: {fetch[0]} is not in the archive (end of archive)", file=sys.stderr)
            sys.exit(1)
    from backup_tool.cli import main as cli_main

    cli_main()
