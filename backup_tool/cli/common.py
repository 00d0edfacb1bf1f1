"""Shared machinery of the ``backup-tool`` command line: the Typer apps, the common
options every command takes, error-to-exit-code mapping and text rendering helpers.

Every command accepts the common options after its own name (``--repo``, ``--dsn``,
``--policy``, ``--json``, ``--debug``). Errors become one line on stderr and the exit code
of the CLI contract (0 ok, 1 failed, 2 usage, 3 verification/validation problem, 4 lock
held); tracebacks only with ``--debug``. Known passwords are scrubbed from everything
printed.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import signal
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, Sequence

import typer
from typer.core import TyperCommand, TyperGroup

from backup_tool.config.locations import default_repo
from backup_tool.config.settings import Settings, resolve_settings
from backup_tool.core.report import LOG_ENV, Reporter
from backup_tool.core.units import human_size
from backup_tool.errors import EXIT_FAILED, BackupToolError, ValidationFailed

# The reader closed stdout (`| head`): the shell's code for a program killed by SIGPIPE.
EXIT_PIPE_CLOSED = 141

if TYPE_CHECKING:
    from typer._click import Context, HelpFormatter

    from backup_tool.repository.catalog import DatabaseHint

HELP = f"""PostgreSQL backup and disaster recovery: full backups to S3 or a local directory,
restores that end with integrity validation.

Repository: --repo / BACKUP_TOOL_REPO, s3://BUCKET/PREFIX or a directory; default
{default_repo()}. Database: --dsn / DATABASE_URL, else libpq's PG* variables as psql uses
them. S3 credentials and endpoint: boto3's standard chain (AWS_PROFILE, AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL_S3...).

Exit codes: 0 ok, 1 failed, 2 usage error, 3 verification/validation found a problem,
4 another backup/restore holds the lock.
"""

EXIT_CODES = ("Exit codes: 0 ok, 1 failed, 2 usage error, 3 verification/validation found a problem, "
              "4 another backup/restore holds the lock.")
"""The end of every command's ``--help`` unless the command says otherwise (``status``'s
Nagios codes, ``wal fetch``'s restore_command ones)."""

# The main verbs first in 'backup-tool --help', then the rest in registration order.
MAIN_COMMANDS = ("backup", "restore", "list", "show", "verify", "validate")


class WrappedGroup(TyperGroup):
    """A command group whose listing gives each command's whole first sentence, wrapped, where
    click would cut it to the space left on one line ("Check configuration, database...")."""

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class HelpCommand(TyperCommand):
    """A command whose help names a positional argument by its metavar alone ("ID"), where
    typer would add its Python type ("ID <str>")."""

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((param.metavar or record[0], record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class MainVerbsFirst(WrappedGroup):
    """The top-level group, listing the commands an operator reaches for first at the top."""

    def list_commands(self, ctx: Context) -> list[str]:
        names = super().list_commands(ctx)
        return [n for n in MAIN_COMMANDS if n in names] + [n for n in names if n not in MAIN_COMMANDS]


# Help is click's plain formatter (rich_markup_mode=None): it wraps every line at the terminal
# width (COLUMNS when piped) and never truncates an option name or its help with "…", and a
# flag shows no metavar. max_content_width lets a wide terminal use its width.
_HELP_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


def _group(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, cls=WrappedGroup,
                       context_settings=_HELP_SETTINGS)


app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  cls=MainVerbsFirst, context_settings=_HELP_SETTINGS)
backup_app = _group("Take a backup now.")
restore_app = _group("Restore from the repository (never overwrites unless told to).")
wal_app = _group("WAL archiving for point-in-time recovery (archive_command / restore_command).")
retention_app = _group("Expire backups and WAL per the policy.")
schema_app = _group("Schema reconstruction from migrations and drift checks.")
app.add_typer(backup_app, name="backup")
app.add_typer(restore_app, name="restore")
app.add_typer(wal_app, name="wal")
app.add_typer(retention_app, name="retention")
app.add_typer(schema_app, name="schema")


@dataclass(frozen=True)
class Common:
    repo: Optional[str]
    dsn: Optional[str]
    policy: Optional[str]
    json: bool
    debug: bool
    pg_bin: Optional[str] = None

    def settings(self, on_bad_policy: Callable[[BackupToolError], None] | None = None) -> Settings:
        return resolve_settings(self.repo, self.dsn, self.policy, on_bad_policy)


DSN_HELP = ("Source database (postgresql://user@host:port/db or key=value) "
            "(env DATABASE_URL; else PGHOST/PGPORT/PGUSER/PGDATABASE/PGPASSWORD)")


def common_params(dsn_help: str = DSN_HELP) -> list[inspect.Parameter]:
    """The common options, with ``--dsn`` explained for what this command uses it for."""
    dsn = inspect.Parameter("dsn", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option("--dsn", metavar="DSN", help=dsn_help)])
    return [dsn if p.name == "dsn" else p for p in COMMON_PARAMS]


COMMON_PARAMS = [
    inspect.Parameter("repo", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option("--repo", metavar="URL",
                                    help="Repository: s3://BUCKET/PREFIX or a directory (env BACKUP_TOOL_REPO; "
                                         f"default: the local directory {default_repo()})")]),
    inspect.Parameter("dsn", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option("--dsn", metavar="DSN",
                                    help="Source database (postgresql://user@host:port/db or key=value) "
                                         "(env DATABASE_URL; else PGHOST/PGPORT/PGUSER/PGDATABASE/PGPASSWORD)")]),
    inspect.Parameter("policy", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option("--policy", metavar="NAME|PATH",
                                    help="Policy: policies/NAME.toml or a path (env BACKUP_TOOL_POLICY; "
                                         "default 'default')")]),
    inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")]),
    inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--debug", help="Show tracebacks on errors.")]),
    inspect.Parameter("pg_bin", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option("--pg-bin", metavar="DIR",
                                    help="Run PostgreSQL's programs (pg_dump, pg_restore, psql, pg_basebackup, "
                                         "pg_ctl...) from this directory only (env BACKUP_TOOL_PG_BIN; default: "
                                         "the server's own, /usr/lib/postgresql/<major>/bin, then PATH)")]),
]

DatabaseOption = Annotated[Optional[str], typer.Option(
    "--database", metavar="NAME",
    help="Which database 'latest' means when the repository holds several (default: the one named "
         "by --dsn / DATABASE_URL, or the repository's only database)")]


def secrets_from(common: Common, extra: list[str]) -> list[str]:
    """Passwords and keys known to this invocation, to be scrubbed from anything printed."""
    found = []
    for dsn in [common.dsn, os.environ.get("DATABASE_URL"), *extra]:
        if not dsn:
            continue
        from psycopg.conninfo import conninfo_to_dict

        try:
            password = conninfo_to_dict(dsn).get("password")
        except Exception:  # noqa: BLE001 - an unparsable DSN is refused with its own error where it is used
            continue
        if password:
            found.append(str(password))
    for var in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(var):
            found.append(os.environ[var])
    from backup_tool.repository.storage.encrypted import secret_texts

    found += secret_texts()
    return [s for s in found if len(s) >= 4]


def make_redactor(secrets: list[str]) -> Callable[[str], str]:
    def redact(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text
    return redact


@dataclass
class Invocation:
    """What a command body gets: settings, a reporter, and output helpers."""

    common: Common
    reporter: Reporter
    redact: Callable[[str], str]
    needs_policy: bool = True
    end_progress: Callable[[], None] = lambda: None

    @functools.cached_property
    def settings(self) -> Settings:
        """Loaded once. A command that only takes defaults from the policy (``needs_policy``
        false) runs on the built-in defaults, with a warning, when the policy file is broken:
        a typo there must not stand between an operator and ``list`` or a restore."""
        if self.needs_policy:
            return self.common.settings()

        def warn(exc: BackupToolError) -> None:
            self.reporter.warning(f"{one_line(str(exc))} — ignored: this command runs on the built-in "
                                  "policy defaults; fix the policy file before the next backup")

        return self.common.settings(warn)

    def database(self, option: str | None) -> DatabaseHint:
        """Which database ``latest`` means: ``--database``, else the one the DSN names (a
        malformed DSN names none; the commands that connect with it report it)."""
        from backup_tool.errors import ConfigError
        from backup_tool.postgres.connection import ConnInfo
        from backup_tool.repository.catalog import DatabaseHint

        try:
            named = ConnInfo(self.settings.dsn).dbname
        except ConfigError:
            named = None
        return DatabaseHint(option, named)

    def out(self, data: Any, text: str | Callable[[], str]) -> None:
        """Print the result: one JSON line with ``--json``, else text; the progress display
        stops first, so no bar is redrawn below it."""
        self.end_progress()
        if self.common.json:
            print(self.redact(json.dumps(data, default=str, ensure_ascii=False)))
        else:
            print(self.redact(text() if callable(text) else text))


def command(group: typer.Typer, name: str, secret_params: tuple[str, ...] = (),
            dsn_help: str = DSN_HELP, needs_policy: bool = True,
            exit_codes: str = EXIT_CODES) -> Callable[..., Any]:
    """Register ``fn(inv, **options)`` as a command that also takes the common options
    (``dsn_help`` says what ``--dsn`` is for where it is not the database the command reads;
    ``needs_policy=False``: a broken policy file is a warning, see :attr:`Invocation.settings`;
    ``exit_codes`` ends its ``--help``)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "inv"]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> None:
            common = Common(kwargs.pop("repo"), kwargs.pop("dsn"), kwargs.pop("policy"),
                            kwargs.pop("json_output"), kwargs.pop("debug"), kwargs.pop("pg_bin"))
            if common.pg_bin:
                os.environ["BACKUP_TOOL_PG_BIN"] = common.pg_bin
            extra = [kwargs[p] for p in secret_params if kwargs.get(p)]
            redact = make_redactor(secrets_from(common, extra))
            raise typer.Exit(invoke(fn, common, redact, kwargs, needs_policy))

        wrapper.__signature__ = sig.replace(parameters=own + common_params(dsn_help))  # type: ignore[attr-defined]  # typer reads __signature__
        group.command(name, cls=HelpCommand, epilog=exit_codes)(wrapper)
        return fn

    return decorate


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so every cleanup handler runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _quiet_library_logs(debug: bool) -> None:
    """Libraries (psycopg, botocore, urllib3) log warnings about conditions the tool already
    reports in its own one line, e.g. psycopg's "error ignored terminating Copy" when a
    damaged object aborts a COPY: keep them off stderr unless --debug."""
    root = logging.getLogger()
    if debug:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    elif not root.handlers:
        root.addHandler(logging.NullHandler())


def _nothing() -> None:
    return None


def invoke(fn: Callable[..., Any], common: Common, redact: Callable[[str], str], kwargs: dict[str, Any],
           needs_policy: bool = True) -> int:
    from backup_tool.render.log import log_reporter, progress_wanted
    from backup_tool.streams import pipeline

    signal.signal(signal.SIGTERM, _raise_terminated)
    _quiet_library_logs(common.debug)

    reporter: Reporter
    close: Callable[[], None] = _nothing
    if progress_wanted(common.json):
        from backup_tool.render.console import RichReporter  # rich loads only for a terminal

        reporter = RichReporter(redact)
        close = reporter.close
    else:
        reporter = log_reporter(redact)
    inv = Invocation(common, reporter, redact, needs_policy, close)
    try:
        try:
            return fn(inv, **kwargs) or 0
        finally:
            inv.end_progress()
    except ValidationFailed as exc:
        report = exc.report
        data = report.to_dict() if report is not None and hasattr(report, "to_dict") else None
        if data is not None and not common.json:
            inv.out(data, lambda: render_report(report))
        return fail(exc, common, redact, data)
    except BackupToolError as exc:
        return fail(exc, common, redact)
    except (KeyboardInterrupt, Terminated, pipeline.Cancelled) as exc:
        pipeline.cancel()
        if common.debug:
            print_traceback(redact)
        code = 130 if isinstance(exc, KeyboardInterrupt) else EXIT_FAILED
        report_error(common.json, code, "interrupted; partial work was discarded or rolled back",
                     "run the command again", redact)
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except Exception as exc:  # a bug: still one line unless --debug
        if common.debug:
            print_traceback(redact)
        diag = getattr(exc, "diag", None)
        if type(exc).__module__.startswith("psycopg") and diag is not None and diag.message_primary:
            report_error(common.json, EXIT_FAILED, f"PostgreSQL: {one_line(diag.message_primary)}",
                         diag.message_hint or "rerun with --debug for details", redact)
        else:
            report_error(common.json, EXIT_FAILED, f"unexpected {type(exc).__name__}: {one_line(str(exc))}",
                         "rerun with --debug for details", redact)
        return EXIT_FAILED
    finally:
        close()


def print_traceback(redact: Callable[[str], str]) -> None:
    """The current exception's traceback on stderr (``--debug``), with known secrets scrubbed."""
    print(redact(traceback.format_exc()), file=sys.stderr, end="")


def one_line(text: str) -> str:
    """``text`` on one line: a PostgreSQL error's DETAIL and HINT lines joined with "; "."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(exc: BackupToolError, common: Common, redact: Callable[[str], str],
         data: dict[str, Any] | None = None) -> int:
    if common.debug:
        print_traceback(redact)
    report_error(common.json, exc.exit_code, one_line(exc.message), one_line(exc.hint) if exc.hint else None,
                 redact, data)
    return exc.exit_code


def report_error(json_output: bool, exit_code: int, message: str, hint: str | None,
                 redact: Callable[[str], str], data: dict[str, Any] | None = None) -> None:
    """A failure, said once per stream: with ``--json`` stdout carries the one document
    (``data``, e.g. the failed validation report, with ``ok`` false, ``exit_code``, ``error``
    and ``hint``); stderr carries the one error line, itself a JSON line when
    ``BACKUP_TOOL_LOG=json`` asks stderr for logs (so ``--json >> log 2>&1`` is JSON lines)."""
    if json_output:
        doc = {**(data or {}), "ok": False, "exit_code": exit_code, "error": message, "hint": hint}
        print(redact(json.dumps(doc, default=str, ensure_ascii=False)), flush=True)
    print(redact(error_line(message, hint, exit_code)), file=sys.stderr, flush=True)


def error_line(message: str, hint: str | None, exit_code: int) -> str:
    """The one line a failure prints on stderr: ``backup-tool: error: what — what to do``, or,
    when ``BACKUP_TOOL_LOG=json`` makes stderr a JSON-lines log, the same as a log record
    (``{"ts", "level": "error", "event", "hint", "exit_code"}``)."""
    if os.environ.get(LOG_ENV, "").lower() == "json":
        return json.dumps({"ts": datetime.now(timezone.utc).isoformat(timespec="seconds"), "level": "error",
                           "event": message, "hint": hint, "exit_code": exit_code}, ensure_ascii=False)
    return f"backup-tool: error: {message}{f' — {hint}' if hint else ''}"


UNCOMPARED = "consistent in itself; compared with no backup (--against ID|latest compares its contents)"
"""The verdict of ``validate`` without ``--against``: its checks find a database broken in
itself, never one that lacks what a backup holds, so it must not read as a restore's."""


def render_report(report: Any, uncompared: bool = False) -> str:
    """Text for a validation/verification report or a restore result carrying one;
    ``uncompared``: ``validate`` without ``--against`` (see :data:`UNCOMPARED`)."""
    validation = getattr(report, "validation", None)
    lines = []
    if hasattr(report, "backup_id"):
        if hasattr(report, "tables"):
            tables = report.tables if isinstance(report.tables, int) else len(report.tables)
            where = f" into schema {report.into_schema}" if getattr(report, "into_schema", None) else ""
            from backup_tool.repository.manifest import utc_iso

            source = getattr(report, "source", None)
            origin = (f"database {source.database} from backup {report.backup_id} (snapshot of "
                      f"{human_time(utc_iso(source.snapshot_at))}, finished {human_time(utc_iso(source.finished_at))})"
                      if source is not None else report.backup_id)
            if source is not None and getattr(report, "recovered_to", None) is not None:
                origin = f"{', '.join(report.tables)} {as_of(report.recovered_to, source.snapshot_at)}"
            lines.append(f"restored {origin} into {report.target}{where}: {tables} tables, "
                         f"{report.rows} rows, {human_size(report.bytes_read)} read in {report.seconds:.1f}s")
        report = validation
    if report is None:
        return "\n".join(lines + ["validation skipped"])
    width = max((len(c.name) for c in report.checks), default=10)
    for c in report.checks:
        lines.append(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    if not report.ok:
        lines.append(f"verdict: FAILED — {len(report.failed)} check(s) failed")
    elif uncompared:
        lines.append(f"verdict: OK — {UNCOMPARED}")
    else:
        lines.append("verdict: OK — complete and consistent")
    return "\n".join(lines)


NONE_SHOWN = "—"


def as_of(recovered: datetime, target: datetime) -> str:
    """The moment a point-in-time restore brought back, as an operator reads it: ``as of
    2026-11-26 21:38:07.95 UTC (last commit before 21:38:10)``. The target's date is shown
    only when it differs from the commit's."""
    def clock(ts: datetime, hundredths: bool) -> str:
        ts = ts.astimezone(timezone.utc)
        text = ts.strftime("%H:%M:%S")
        if hundredths:
            text += f".{ts.microsecond // 10000:02d}"
        elif ts.microsecond:
            text += f".{ts.microsecond:06d}".rstrip("0")
        return text

    day = recovered.astimezone(timezone.utc).date()
    target_day = target.astimezone(timezone.utc).date()
    before = clock(target, False) if target_day == day else f"{target_day} {clock(target, False)}"
    return f"as of {day} {clock(recovered, True)} UTC (last commit before {before})"


_ISO_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.\d+)?(?:Z|\+00:00)")


def human_time(value: str | None) -> str:
    """An ISO UTC timestamp as people read it: to the second, with "Z" ("—" for none)."""
    if not value:
        return NONE_SHOWN
    return _ISO_TIME.sub(r"\1Z", value)


def human_times(text: str) -> str:
    """Every ISO UTC timestamp inside ``text`` (a reason, a note) cut to the second."""
    return _ISO_TIME.sub(r"\1Z", text)


def render_table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]], right: frozenset[int] = frozenset()) -> str:
    """Columns as wide as their widest cell, header included; ``right`` columns right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _entry_database(entry: dict[str, Any]) -> str:
    return "(cluster)" if entry["kind"] == "base" else entry["database"] or NONE_SHOWN


def render_entries(entries: list[dict[str, Any]]) -> str:
    """The ``list`` table: one row per backup, columns aligned under their header."""
    rows = [(e["id"], e["kind"], _entry_database(e), human_time(e["started_at"]),
             human_size(e["size_bytes"]), human_time(e["expires_at"])) for e in entries]
    return render_table(("ID", "KIND", "DATABASE", "STARTED", "SIZE", "EXPIRES"), rows, frozenset({4}))


def render_show(data: dict[str, Any]) -> str:
    """``show``: what an operator needs of one backup, with absent facts left out (never
    "None") and a base backup described as the cluster it is: WAL start/stop LSN, timeline,
    system identifier, the databases it holds."""
    base = data["kind"] == "base"
    fields: list[tuple[str, Any]] = [("id", data["id"]), ("kind", data["kind"]),
                                     ("parent", data.get("parent_id"))]
    if base:
        fields += [("cluster", f"system identifier {data['system_identifier']}"),
                   ("databases", ", ".join(data.get("databases") or ()) or None)]
    else:
        fields += [("database", data["database"]),
                   ("cluster", f"system identifier {data['system_identifier']}" if data.get("system_identifier")
                    else None)]
    tools = data.get("client_tools") or {}
    fields += [("server version", data.get("server_version")),
               ("taken with", ", ".join(f"{k} {v}" for k, v in tools.items()) or None),
               ("started", human_time(data["started_at"])), ("finished", human_time(data["finished_at"])),
               ("expires", human_time(data["expires_at"])), ("size", human_size(data["size_bytes"]))]
    if base:
        fields += [("WAL start", f"{data['start_lsn']} (timeline {data['timeline']})"),
                   ("WAL stop", data["stop_lsn"]), ("checkpoint", data.get("checkpoint"))]
    else:
        fields += [("snapshot LSN", data.get("snapshot_lsn")), ("schema fingerprint", data.get("schema_fingerprint"))]
    fields += [("policy", data.get("policy")), ("encryption key", data.get("encryption_key_id"))]
    inventory = ", ".join(f"{k} {v}" for k, v in (data.get("inventory") or {}).items() if v)
    fields.append(("inventory", inventory or None))
    shown = [(k, v) for k, v in fields if v not in (None, "", (), [])]
    width = max(len(k) for k, _ in shown) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in shown]
    tables = data.get("tables") or []
    if tables:
        lines.append(f"tables ({len(tables)}):")
        rows = [("  " + t["table"], f"{t['rows']} rows", human_size(t["size_bytes"])) for t in tables]
        lines.append(render_table(("", "", ""), rows, frozenset({1, 2})).split("\n", 1)[1])
    elif not base:
        lines.append("tables: none")
    return "\n".join(lines)
