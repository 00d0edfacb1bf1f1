"""The audit report as JSON, Markdown, or one self-contained HTML page (inline CSS and an SVG
timeline, no external assets)."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Sequence

from backup_tool.core.timestamps import iso_seconds as iso
from backup_tool.core.timestamps import parse_utc, seconds_in
from backup_tool.governance.audit import NOT_RECORDED, AuditReport

if TYPE_CHECKING:
    pass

UTC = timezone.utc
FORMATS = ("json", "markdown", "html")



SIDECAR_SUFFIX = ".sha256"


def _ts(text: str | None) -> datetime | None:
    return parse_utc(text) if text else None


def render(report: AuditReport, fmt: str, output_name: str | None = None) -> str:
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    if fmt == "markdown":
        return render_markdown(report, output_name)
    return render_html(report, output_name)


# ----------------------------------------------------------------------------- Markdown


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _d(ts: datetime | None) -> str:
    return iso(ts) or "—"


def _ok(flag: bool | None, ts: datetime | None) -> str:
    if ts is None:
        return "never"
    return f"{_d(ts)} {'ok' if flag else 'FAILED'}"


def _policy_lines(report: AuditReport) -> list[tuple[str, str]]:
    p = report.policy
    s, r, lock = p["schedule"], p["retention"], p["object_lock"]
    return [
        ("policy", f"{p['name']} ({p['source']})"),
        ("full backups", f"cron `{s['full']}` ({s['timezone']}), kept {r['full_days']} days, at least {r['min_fulls']}"),
        ("incremental backups", f"cron `{s['incremental']}`, kept {r['incremental_days']} days, chains of at most "
                                f"{r['max_chain_length']}" if s["incremental"] else "not scheduled"),
        ("base backups / PITR", (f"cron `{s['base']}`, " if s.get("base") else "") + f"PITR window {r['pitr_days']} days"),
        ("grace", f"{s['grace_minutes']} minutes"),
        ("object lock", lock["mode"]),
    ]


@dataclass(frozen=True)
class Table:
    """A table of a report section; without rows it renders as "none"."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    row_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Items:
    """A bulleted list; empty, it renders as "none"."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Section:
    """One section, the same in Markdown and HTML: both renderers draw :func:`sections`."""

    title: str
    blocks: tuple[Table | Items | Para, ...]


NONE = "none"


def _retention_text(state: str, reasons: Sequence[str]) -> str:
    """The backup's retention state and why, without saying the state twice
    ("retained until …", not "retained: retained until …")."""
    why = "; ".join(reasons)
    if not why:
        return state
    return why if why.startswith(state) else f"{state}: {why}"


def _restore_test_text(at: datetime | None, ok: bool | None, seconds: float | None) -> str:
    if at is None:
        return "never"
    took = f" in {seconds:.1f} s" if seconds is not None else " (duration not recorded)"
    return f"{_d(at)} {'ok' if ok else 'FAILED'}{took}"


def _drills(report: AuditReport) -> list[tuple[str, str, str, str]]:
    """Every restore test in the report's verification runs: backup, when, result, duration."""
    rows = []
    for v in report.verifications:
        seconds = {t.backup: t for t in v.restore_tests or ()}
        for c in v.checks:
            kind, _, backup_id = str(c.get("name", "")).partition(" ")
            if kind != "restore_test" or not backup_id:
                continue
            t = seconds.get(backup_id)
            rows.append((backup_id, _d(v.at), "ok" if c.get("ok") else "FAILED",
                         f"{t.seconds:.1f} s" if t else NOT_RECORDED))
    return rows


def sections(report: AuditReport, output_name: str | None = None) -> list[Section]:
    """The report's sections in order; ``output_name`` is the file the report is written to
    (its hash is then in ``<output_name>.sha256``)."""
    state = report.repository_state
    meta = Items((
        f"Repository: {report.repository}",
        f"Evaluated at: {_d(report.now)} (generated {_d(report.generated_at)})",
        f"Audit window: {_d(report.window_start)} → {_d(report.window_end)}",
        f"Tool: backup-tool {report.tool_version or NOT_RECORDED}",
        (f"Repository state read: sha256 {state.sha256} of {state.manifests} manifest(s) (the sorted lines "
         "'manifests/<id>.json <manifest_sha256>')") if state else "Repository state read: not computed",
        (f"Report SHA-256: in {output_name}{SIDECAR_SUFFIX} beside this file ('sha256sum -c "
         f"{output_name}{SIDECAR_SUFFIX}' checks it)") if output_name else
        f"Report SHA-256: not kept (written to standard output; --output FILE keeps it in FILE{SIDECAR_SUFFIX})",
    ))
    out = [Section("Report", (meta,))]
    out.append(Section("Scope", (Table(
        ("database", "host", "cluster (system identifier)", "backups", "first", "last"),
        tuple((s.database, s.host or NOT_RECORDED, s.system_identifier or NOT_RECORDED, str(s.backups),
               _d(s.first), _d(s.last)) for s in report.scope)),)))
    findings: list[Table | Items | Para] = [Table(
        ("severity", "area", "finding"),
        tuple((f.severity.upper(), f.area, f.message) for f in report.findings),
        tuple("crit" if f.severity == "critical" else "warn" for f in report.findings))]
    if report.facts:
        findings += [Para("Notes:"), Items(report.facts)]
    if report.schema_drift:
        findings.append(Para(str(report.schema_drift.get("line", ""))))
    out.append(Section("Findings", tuple(findings)))
    out.append(Section("Policy in force", (Table(("setting", "value"), tuple(_policy_lines(report))),)))
    counts = report.slot_counts()
    out.append(Section("Schedule adherence", (
        Table(("schedule", "met", "late", "missed", "pending"),
              tuple((k, str(v["met"]), str(v["late"]), str(v["missed"]), str(v["pending"])) for k, v in counts.items())),
        Para(f"{sum(1 for s in report.slots if s.status in ('missed', 'late'))} slot(s) missed or late; every slot:"),
        Table(("slot", "schedule", "status", "backup", "taken"),
              tuple((_d(s.slot), s.schedule, s.status if s.status in ("met", "pending") else s.status.upper(),
                     (s.backup_id + (" (since deleted per retention)" if s.backup_deleted else "")) if s.backup_id
                     else "—", _d(s.backup_at)) for s in report.slots),
              tuple(s.status if s.status in ("missed", "late") else "" for s in report.slots)))))
    out.append(Section("Backups", (Table(
        ("id", "kind", "database", "taken", "size", "expires", "encryption at rest", "Object Lock",
         "checksums verified", "restore test", "retention"),
        tuple((b.id, b.kind, b.database, _d(b.started_at), _size(b.size_bytes), _d(b.expires_at),
               b.encryption_text(), b.lock_text(), _ok(b.last_verified_ok, b.last_verified),
               _restore_test_text(b.last_restore_test, b.last_restore_test_ok, b.last_restore_test_seconds),
               _retention_text(b.retention, b.reasons)) for b in report.backups)),)))
    past = [b for b in report.backups if b.retention != "retained"]
    out.append(Section("Retention adherence", (
        Para(f"Retention runs recorded: {report.retention_runs}, last {_d(report.last_retention_run)}."),
        Para("Kept past expiry:"),
        Items(tuple(f"{b.id} ({b.kind}, expired {_d(b.expires_at)}): {b.retention} — {'; '.join(b.reasons)}"
                    for b in past)),
        Para("Deletions (append-only log):"),
        Table(("id", "kind", "taken", "deleted", "expired", "why"),
              tuple((d.id, d.kind, _d(d.started_at),
                     _d(d.at) + (" EARLY" if d.expires_at and d.at < d.expires_at else ""), _d(d.expires_at),
                     "; ".join(d.reasons) + ("" if d.completed else " (failed)")) for d in report.deletions),
              tuple("missed" if d.expires_at and d.at < d.expires_at else "" for d in report.deletions)))))
    p = report.pitr
    out.append(Section("Point-in-time recovery", (Items((
        f"PITR window: {_d(p.window_start)} → {_d(report.now)}",
        f"Recoverable: {_d(p.recoverable_from)} → {_d(p.recoverable_to)}",
        f"Base backups: {', '.join(p.bases) or NONE}",
        f"WAL: {p.wal_segments} segments, {p.wal_first or '—'} … {p.wal_last or '—'}, newest archived "
        f"{_d(p.newest_wal_at)}",
        f"Gaps: {', '.join(f'{a}..{b}' for a, b in p.gaps) or NONE}") if p.in_use else ()),
        *(() if p.in_use else (Para("No base backups and no archived WAL."),)))))
    drills = _drills(report)
    timed = [float(r[3].split()[0]) for r in drills if r[3] != NOT_RECORDED]
    out.append(Section("Restore tests (recovery-time evidence)", (
        *((Para(f"{len(drills)} restore test(s); restore and validation took at most {max(timed):.1f} s"),)
          if timed else ()),
        Table(("backup", "tested at", "result", "restore + validation time"), tuple(drills)))))
    out.append(Section("Verification runs", (Table(
        ("at", "result", "backups covered", "restore test"),
        tuple((_d(v.at), "ok" if v.ok else "FAILED", ", ".join(v.backups) or NONE, "yes" if v.restore_test else "no")
              for v in report.verifications),
        tuple("" if v.ok else "missed" for v in report.verifications)),)))
    health = report.health
    out.append(Section("Health checks", (
        Table(("check", "frequency", "last status", "last run", "next check"),
              tuple((r["title"], r["frequency"], r["last_status"], _d(_ts(r["last_run"])), _d(_ts(r["next_check"])))
                    for r in (health or {}).get("checks", ())),
              tuple("missed" if r["last_status"] == "FAILED" else "" for r in (health or {}).get("checks", ()))),
        Para("Failed runs in the audit window:"),
        Items(tuple(f"{_d(_ts(f['at']))} {f['check']}: {f['detail']}" for f in (health or {}).get("failures", [])[:50])))))
    return out


def _md_cell(text: str) -> str:
    return seconds_in(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: AuditReport, output_name: str | None = None) -> str:
    out = [f"# Backup compliance audit — {report.verdict}"]
    for section in sections(report, output_name):
        out += ["", f"## {section.title}"]
        for block in section.blocks:
            out.append("")
            if isinstance(block, Para):
                out.append(seconds_in(block.text))
            elif isinstance(block, Items):
                out += [f"- {seconds_in(i)}" for i in block.items] or [f"- {NONE}"]
            elif block.rows:
                out += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            else:
                out.append(NONE)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- HTML


COLORS = {"full": "#1f5fbf", "incremental": "#46a0e0", "base": "#7a4cc2", "met": "#2e7d32", "late": "#e0a100",
          "missed": "#c62828", "pending": "#9e9e9e", "wal": "#2e7d32", "pitr": "#e3f0ff"}

CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1d2330;margin:0;background:#f4f6f9}
main{max-width:1320px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d8dde6;padding-bottom:4px}
.meta{color:#5a6475;margin-bottom:16px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:12px 16px;min-width:150px}
.card b{display:block;font-size:22px}
.verdict{color:#fff;border:none}
.v-ok{background:#2e7d32}.v-warn{background:#b57f00}.v-bad{background:#c62828}
table{border-collapse:collapse;width:100%;background:#fff;font-size:12.5px}
th,td{border:1px solid #e1e5ec;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#eef1f6}
.crit{color:#c62828;font-weight:600}.warn{color:#9a6b00;font-weight:600}
tr.crit td+td,tr.warn td+td{color:inherit;font-weight:normal}
.missed{background:#fdecec}.late{background:#fff6db}
.tl{background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:8px}
details summary{cursor:pointer;color:#1f5fbf}
code{background:#eef1f6;padding:0 3px;border-radius:3px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


TICK_SPACING = 64
LEGEND_CHAR = 7.5  # px per character of an 11px label, wider than any common sans-serif face's average


def timeline_svg(report: AuditReport, width: int = 1260) -> str:
    """The timeline picture: slots, backups, retention spans, the PITR window and WAL coverage.
    Below the lanes, one row each: the date axis, the "now" label, then the legend (wrapped to
    the width), so no label can be drawn over another."""
    start, end = report.window_start, report.now
    span = max((end - start).total_seconds(), 3600.0)
    left, right = 130, 20
    plot = width - left - right
    lanes = [("Full slots", "slots-full"), ("Full backups", "full"), ("Incremental slots", "slots-incremental"),
             ("Incrementals", "incremental")]
    if report.policy["schedule"].get("base") or report.pitr.in_use:
        lanes += [("Base backups", "base"), ("WAL archive", "wal")]
    lane_h, top = 34, 34
    bottom = top + lane_h * len(lanes)
    legend = [("met", "slot met", "circle"), ("late", "slot late", "circle"), ("missed", "slot missed", "x"),
              ("pending", "pending", "circle"), ("full", "full (bar: kept until expiry)", "rect"),
              ("incremental", "incremental", "rect")] + ([("base", "base", "rect")] if any(k == "base" for _, k in lanes) else [])
    legend_at: list[tuple[float, float]] = []
    lx, ly = 8.0, bottom + 62.0
    for _, text, _ in legend:
        item = 14 + LEGEND_CHAR * len(text)
        if lx > 8 and lx + item > width - right:
            lx, ly = 8.0, ly + 18
        legend_at.append((lx, ly))
        lx += item + 18
    height = int(ly + 8)

    def x(ts: datetime) -> float:
        return left + plot * min(max((ts - start).total_seconds() / span, 0.0), 1.0)

    row = {key: top + i * lane_h for i, (_, key) in enumerate(lanes)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="backup timeline">',
             '<style>text{font:11px sans-serif;fill:#333}.lbl{font-weight:600}</style>']
    pitr_x = x(max(report.pitr.window_start, start))
    parts.append(f'<rect x="{pitr_x:.1f}" y="{top - 8}" width="{x(end) - pitr_x:.1f}" '
                 f'height="{lane_h * len(lanes) + 4}" fill="{COLORS["pitr"]}"/>')
    parts.append(f'<text x="{min(pitr_x + 4, width - right - 140):.1f}" y="{top - 12}" fill="#1f5fbf">PITR window '
                 f'({report.policy["retention"]["pitr_days"]} days)</text>')
    days = int(span // 86400) + 1
    step = max(1, math.ceil(TICK_SPACING / (plot * 86400 / span)))  # day labels at least TICK_SPACING px apart
    day0 = datetime(start.year, start.month, start.day, tzinfo=UTC)
    for i in range(0, days + 2, step):
        t = day0 + timedelta(days=i)
        if start <= t <= end:
            parts.append(f'<line x1="{x(t):.1f}" y1="{top - 8}" x2="{x(t):.1f}" y2="{bottom + 10}" '
                         'stroke="#e3e6eb"/>')
            parts.append(f'<text x="{x(t):.1f}" y="{bottom + 24}" text-anchor="middle">{t:%b %d}</text>')
    for label, key in lanes:
        y = row[key]
        parts.append(f'<text class="lbl" x="8" y="{y + 16}">{_e(label)}</text>')
        parts.append(f'<line x1="{left}" y1="{y + lane_h - 4}" x2="{width - right}" y2="{y + lane_h - 4}" '
                     'stroke="#eef0f3"/>')
    for s in report.slots:
        key = f"slots-{s.schedule}" if s.schedule != "base" else "base"
        if key not in row:
            continue
        cx, cy = x(s.slot), row[key] + 13
        color = COLORS[s.status]
        title = f"<title>{_e(s.schedule)} slot {_e(_d(s.slot))}: {_e(s.status)}" \
                f"{' — ' + _e(s.backup_id) if s.backup_id else ''}</title>"
        if s.status == "missed":
            parts.append(f'<g stroke="{color}" stroke-width="2.5">{title}<line x1="{cx - 5:.1f}" y1="{cy - 5}" '
                         f'x2="{cx + 5:.1f}" y2="{cy + 5}"/><line x1="{cx - 5:.1f}" y1="{cy + 5}" '
                         f'x2="{cx + 5:.1f}" y2="{cy - 5}"/></g>')
        else:
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy}" r="4.5" fill="{color}">{title}</circle>')
    for b in report.backups:
        if b.kind not in row or b.started_at < start:
            continue
        bx = x(b.started_at)
        y = row[b.kind] + 4
        ex = x(min(b.expires_at, end))
        parts.append(f'<rect x="{bx:.1f}" y="{y + 9}" width="{max(ex - bx, 0):.1f}" height="4" '
                     f'fill="{COLORS[b.kind]}" opacity="0.25"/>')
        parts.append(f'<rect x="{bx - 2:.1f}" y="{y}" width="5" height="22" rx="1.5" fill="{COLORS[b.kind]}">'
                     f'<title>{_e(b.id)} ({_e(b.kind)}) {_e(_d(b.started_at))}, {_e(_size(b.size_bytes))}, '
                     f'expires {_e(_d(b.expires_at))}</title></rect>')
    for d in report.deletions:
        if d.kind in row and d.started_at and d.started_at >= start:
            bx = x(d.started_at)
            parts.append(f'<rect x="{bx - 2:.1f}" y="{row[d.kind] + 4}" width="5" height="22" rx="1.5" fill="none" '
                         f'stroke="{COLORS.get(d.kind, "#888")}" stroke-dasharray="2,2"><title>{_e(d.id)} '
                         f'deleted {_e(_d(d.at))}</title></rect>')
    if "wal" in row and report.pitr.recoverable_from:
        y = row["wal"] + 8
        x0, x1 = x(max(report.pitr.recoverable_from, start)), x(min(report.pitr.recoverable_to or end, end))
        parts.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 2):.1f}" height="12" rx="3" '
                     f'fill="{COLORS["wal"]}" opacity="0.8"><title>recoverable {_e(_d(report.pitr.recoverable_from))}'
                     f' to {_e(_d(report.pitr.recoverable_to))}</title></rect>')
    if "wal" in row and report.pitr.gaps:
        parts.append(f'<text x="{left + 4}" y="{row["wal"] + 30}" fill="{COLORS["missed"]}">'
                     f'{len(report.pitr.gaps)} WAL gap(s)</text>')
    nx = x(end)
    parts.append(f'<line x1="{nx:.1f}" y1="{top - 8}" x2="{nx:.1f}" y2="{bottom + 10}" stroke="#c62828" '
                 'stroke-dasharray="4,3"/>')
    parts.append(f'<text x="{nx - 4:.1f}" y="{bottom + 40}" text-anchor="end" fill="#c62828">now {_e(_d(end))}</text>')
    for (key, text, shape), (lx, ly) in zip(legend, legend_at, strict=False):
        c = COLORS[key]
        if shape == "circle":
            parts.append(f'<circle cx="{lx + 5:.1f}" cy="{ly - 4:.1f}" r="4" fill="{c}"/>')
        elif shape == "x":
            parts.append(f'<g stroke="{c}" stroke-width="2"><line x1="{lx + 1:.1f}" y1="{ly - 8:.1f}" '
                         f'x2="{lx + 9:.1f}" y2="{ly:.1f}"/><line x1="{lx + 1:.1f}" y1="{ly:.1f}" x2="{lx + 9:.1f}" '
                         f'y2="{ly - 8:.1f}"/></g>')
        else:
            parts.append(f'<rect x="{lx + 2:.1f}" y="{ly - 10:.1f}" width="5" height="11" fill="{c}"/>')
        parts.append(f'<text x="{lx + 14:.1f}" y="{ly:.1f}">{_e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _html_block(block: Table | Items | Para) -> str:
    if isinstance(block, Para):
        return f"<p>{_e(seconds_in(block.text))}</p>"
    if isinstance(block, Items):
        return "<ul>" + ("".join(f"<li>{_e(seconds_in(i))}</li>" for i in block.items)
                         or f'<li class="none">{NONE}</li>') + "</ul>"
    if not block.rows:
        return f'<p class="none">{NONE}</p>'
    classes = block.row_classes or ("",) * len(block.rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in block.header)
    body = "".join((f'<tr class="{c}">' if c else "<tr>") + "".join(f"<td>{_e(seconds_in(cell))}</td>" for cell in row)
                   + "</tr>" for row, c in zip(block.rows, classes, strict=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: AuditReport, output_name: str | None = None) -> str:
    counts = report.slot_counts()
    verdict_class = {"COMPLIANT": "v-ok", "COMPLIANT WITH WARNINGS": "v-warn"}.get(report.verdict, "v-bad")
    crit = sum(1 for f in report.findings if f.severity == "critical")
    warn = sum(1 for f in report.findings if f.severity == "warning")
    met = sum(c["met"] for c in counts.values())
    total = sum(c["met"] + c["late"] + c["missed"] for c in counts.values())
    cards = [f'<div class="card verdict {verdict_class}">verdict<b>{_e(report.verdict)}</b></div>',
             f'<div class="card">slots met<b>{met} / {total}</b></div>',
             f'<div class="card">missed / late<b>{sum(c["missed"] for c in counts.values())} / '
             f'{sum(c["late"] for c in counts.values())}</b></div>',
             f'<div class="card">backups kept<b>{len(report.backups)}</b></div>',
             f'<div class="card">deleted (log)<b>{len(report.deletions)}</b></div>',
             f'<div class="card">findings<b>{crit} critical, {warn} warn</b></div>']
    body = ["<h1>Backup compliance audit</h1>", f'<div class="cards">{"".join(cards)}</div>']
    for i, section in enumerate(sections(report, output_name)):
        body.append(f'<section><h2>{_e(section.title)}</h2>{"".join(_html_block(b) for b in section.blocks)}</section>')
        if i == 0:
            body.append(f'<section><h2>Timeline</h2><div class="tl">{timeline_svg(report)}</div></section>')
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Backup audit — {_e(report.verdict)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")
