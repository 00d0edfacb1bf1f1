"""``health``: the seed's health checks on the live database (see :mod:`backup_tool.jobs.health`)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from backup_tool.cli.common import Invocation, app, command
from backup_tool.errors import EXIT_VALIDATION


def render_health(data: dict[str, Any]) -> str:
    width = max((len(c["name"]) for c in data["checks"]), default=10)
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    lines = [f"{marks[c['level']]}  {c['name']:<{width}}  {c['detail']}" for c in data["checks"]]
    failed = sum(1 for c in data["checks"] if not c["ok"])
    if data.get("record"):
        lines.append(f"recorded as {data['record']}")
    lines.append("verdict: OK" if data["ok"] else f"verdict: FAILED — {failed} check(s) failed")
    return "\n".join(lines)


@command(app, "health")
def health_cmd(
    inv: Invocation,
    check: Annotated[Optional[list[str]], typer.Option(
        "--check", metavar="NAME", help="Run only this check (repeatable): schema, rls, foreign_keys, "
                                        "index_performance, function_execution")] = None,
    full: Annotated[bool, typer.Option("--full", help="Scan every row for orphans (default: tables above "
                                                      "health.fk_sample_rows rows are sampled)")] = False,
    record: Annotated[bool, typer.Option("--record", help="Also record this run in the repository's "
                                                          "health-log/ (as run-due does)")] = False,
) -> int:
    """Run the seed's health checks on the live --dsn database: schema, RLS, foreign keys,
    index performance, function execution. Each check says ok, warn or FAIL with what it
    measured; exit 3 when one fails."""
    from backup_tool.jobs.health import run_health, write_record
    from backup_tool.repository.storage import open_storage

    settings = inv.settings
    report = run_health(settings, check, full=full, reporter=inv.reporter)
    data = report.to_dict()
    if record:
        data["record"] = write_record(open_storage(settings.repo_url), report, "health")
    inv.out(data, lambda: render_health(data))
    return 0 if report.ok else EXIT_VALIDATION
