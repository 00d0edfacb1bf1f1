"""The audit report as JSON, Markdown, or one self-contained HTML page (inline CSS and an SVG
timeline, no external assets)."""

from __future__ import annotations

import html
import json
from datetime import datetime, timedelta, timezone
from typing import Any

from backup_tool.governance.audit import AuditReport

UTC = timezone.utc
FORMATS = ("json", "markdown", "html")


def _ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def render(report: AuditReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    if fmt == "markdown":
        return render_markdown(report)
    return render_html(report)


# ----------------------------------------------------------------------------- Markdown


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _d(ts: datetime | None) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else "—"


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


def render_markdown(report: AuditReport) -> str:
    counts = report.slot_counts()
    out = [f"# Backup compliance audit — {report.verdict}", "",
           f"- Repository: `{report.repository}`",
           f"- Evaluated at: {_d(report.now)} (generated {_d(report.generated_at)})",
           f"- Audit window: {_d(report.window_start)} → {_d(report.window_end)}", "",
           "## Policy in force", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _policy_lines(report)]
    out += ["", "## Findings", ""]
    out += [f"- **{f.severity.upper()}** ({f.area}): {f.message}" for f in report.findings] or ["- none"]
    if report.facts:
        out += ["", "Notes:", ""] + [f"- {f}" for f in report.facts]
    if report.schema_drift:
        out += ["", str(report.schema_drift.get("line", ""))]
    out += ["", "## Schedule adherence", "", "| schedule | met | late | missed | pending |", "|---|---|---|---|---|"]
    out += [f"| {k} | {v['met']} | {v['late']} | {v['missed']} | {v['pending']} |" for k, v in counts.items()]
    out += ["", "| slot | schedule | status | backup |", "|---|---|---|---|"]
    for s in report.slots:
        who = f"{s.backup_id} at {_d(s.backup_at)}" + (" (since deleted per retention)" if s.backup_deleted else "") \
            if s.backup_id else "—"
        out.append(f"| {_d(s.slot)} | {s.schedule} | {s.status.upper() if s.status != 'met' else 'met'} | {who} |")
    out += ["", "## Backups", "", "| id | kind | taken | size | expires | lock | checksums verified | restore test | retention |",
            "|---|---|---|---|---|---|---|---|---|"]
    for b in report.backups:
        lock = f"{b.lock_mode} until {_d(b.lock_until)}" if b.lock_until else "none"
        out.append(f"| {b.id} | {b.kind} | {_d(b.started_at)} | {_size(b.size_bytes)} | {_d(b.expires_at)} | {lock} | "
                   f"{_ok(b.last_verified_ok, b.last_verified)} | {_ok(b.last_restore_test_ok, b.last_restore_test)} | "
                   f"{b.retention}: {'; '.join(b.reasons)} |")
    out += ["", "## Retention adherence", "",
            f"Retention runs recorded: {report.retention_runs}, last {_d(report.last_retention_run)}.", ""]
    past = [b for b in report.backups if b.retention != "retained"]
    out += ["Kept past expiry:", ""] + ([f"- {b.id} ({b.kind}, expired {_d(b.expires_at)}): {b.retention} — "
                                         f"{'; '.join(b.reasons)}" for b in past] or ["- none"])
    out += ["", "Deletions (append-only log):", "", "| id | kind | taken | deleted | expired | why |", "|---|---|---|---|---|---|"]
    for d in report.deletions:
        early = " **EARLY**" if d.expires_at and d.at < d.expires_at else ""
        out.append(f"| {d.id} | {d.kind} | {_d(d.started_at)} | {_d(d.at)}{early} | {_d(d.expires_at)} | "
                   f"{'; '.join(d.reasons)}{'' if d.completed else ' (failed)'} |")
    p = report.pitr
    out += ["", "## Point-in-time recovery", ""]
    if not p.in_use:
        out.append("Not in use: no base backups and no archived WAL.")
    else:
        out += [f"- PITR window: {_d(p.window_start)} → {_d(report.now)}",
                f"- Recoverable: {_d(p.recoverable_from)} → {_d(p.recoverable_to)}",
                f"- Base backups: {', '.join(p.bases) or 'none'}",
                f"- WAL: {p.wal_segments} segments, {p.wal_first or '—'} … {p.wal_last or '—'}, newest archived {_d(p.newest_wal_at)}",
                f"- Gaps: {', '.join(f'{a}..{b}' for a, b in p.gaps) or 'none'}"]
    out += ["", "## Verification runs", "", "| at | result | backups | restore test |", "|---|---|---|---|"]
    out += [f"| {_d(v.at)} | {'ok' if v.ok else 'FAILED'} | {len(v.backups)} | {'yes' if v.restore_test else 'no'} |"
            for v in report.verifications[-20:]]
    if report.health:
        out += _health_markdown(report.health)
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
.missed{background:#fdecec}.late{background:#fff6db}
.tl{background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:8px}
details summary{cursor:pointer;color:#1f5fbf}
code{background:#eef1f6;padding:0 3px;border-radius:3px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def timeline_svg(report: AuditReport, width: int = 1260) -> str:
    """The timeline picture: slots, backups, retention spans, the PITR window and WAL coverage."""
    start, end = report.window_start, report.now
    span = max((end - start).total_seconds(), 3600.0)
    left, right = 130, 20
    plot = width - left - right
    lanes = [("Full slots", "slots-full"), ("Full backups", "full"), ("Incremental slots", "slots-incremental"),
             ("Incrementals", "incremental")]
    if report.policy["schedule"].get("base") or report.pitr.in_use:
        lanes += [("Base backups", "base"), ("WAL archive", "wal")]
    lane_h, top = 34, 34
    height = top + lane_h * len(lanes) + 46

    def x(ts: datetime) -> float:
        return left + plot * min(max((ts - start).total_seconds() / span, 0.0), 1.0)

    row = {key: top + i * lane_h for i, (_, key) in enumerate(lanes)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="backup timeline">',
             '<style>text{font:11px sans-serif;fill:#333}.lbl{font-weight:600}</style>']
    pitr_x = x(max(report.pitr.window_start, start))
    parts.append(f'<rect x="{pitr_x:.1f}" y="{top - 8}" width="{x(end) - pitr_x:.1f}" '
                 f'height="{lane_h * len(lanes) + 4}" fill="{COLORS["pitr"]}"/>')
    parts.append(f'<text x="{pitr_x + 4:.1f}" y="{top - 12}" fill="#1f5fbf">PITR window '
                 f'({report.policy["retention"]["pitr_days"]} days)</text>')
    days = int(span // 86400) + 1
    step = max(1, days // 16)
    day0 = datetime(start.year, start.month, start.day, tzinfo=UTC)
    for i in range(0, days + 2, step):
        t = day0 + timedelta(days=i)
        if start <= t <= end:
            parts.append(f'<line x1="{x(t):.1f}" y1="{top - 8}" x2="{x(t):.1f}" y2="{height - 36}" '
                         'stroke="#e3e6eb"/>')
            parts.append(f'<text x="{x(t):.1f}" y="{height - 22}" text-anchor="middle">{t:%b %d}</text>')
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
    parts.append(f'<line x1="{nx:.1f}" y1="{top - 8}" x2="{nx:.1f}" y2="{height - 36}" stroke="#c62828" '
                 'stroke-dasharray="4,3"/>')
    parts.append(f'<text x="{nx - 4:.1f}" y="{height - 8}" text-anchor="end" fill="#c62828">now {_e(_d(end))}</text>')
    legend = [("met", "slot met", "circle"), ("late", "slot late", "circle"), ("missed", "slot missed", "x"),
              ("pending", "pending", "circle"), ("full", "full (bar: kept until expiry)", "rect"),
              ("incremental", "incremental", "rect")] + ([("base", "base", "rect")] if "base" in row else [])
    lx = left
    for key, text, shape in legend:
        c = COLORS[key]
        if shape == "circle":
            parts.append(f'<circle cx="{lx + 5}" cy="{height - 40 + 34}" r="4" fill="{c}"/>')
        elif shape == "x":
            parts.append(f'<g stroke="{c}" stroke-width="2"><line x1="{lx + 1}" y1="{height - 10}" x2="{lx + 9}" '
                         f'y2="{height - 2}"/><line x1="{lx + 1}" y1="{height - 2}" x2="{lx + 9}" y2="{height - 10}"/></g>')
        else:
            parts.append(f'<rect x="{lx + 2}" y="{height - 13}" width="5" height="13" fill="{c}"/>')
        parts.append(f'<text x="{lx + 14}" y="{height - 2}">{_e(text)}</text>')
        lx += 24 + 7 * len(text)
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: AuditReport) -> str:
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
    body = ["<h1>Backup compliance audit</h1>",
            f'<div class="meta">Repository <code>{_e(report.repository)}</code> · evaluated at {_e(_d(report.now))}'
            f" · window {_e(_d(report.window_start))} → {_e(_d(report.window_end))}"
            f" · generated {_e(_d(report.generated_at))}</div>",
            f'<div class="cards">{"".join(cards)}</div>',
            *([f'<div class="meta">{_e(str(report.schema_drift.get("line", "")))}</div>']
              if report.schema_drift else []),
            "<h2>Timeline</h2>", f'<div class="tl">{timeline_svg(report)}</div>',
            "<h2>Findings</h2>"]
    if report.findings:
        body.append("<table><tr><th>severity</th><th>area</th><th>finding</th></tr>" + "".join(
            f'<tr><td class="{"crit" if f.severity == "critical" else "warn"}">{_e(f.severity)}</td>'
            f"<td>{_e(f.area)}</td><td>{_e(f.message)}</td></tr>" for f in report.findings) + "</table>")
    else:
        body.append("<p>No findings: every promise of the policy is met.</p>")
    if report.facts:
        body.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in report.facts) + "</ul>")
    body.append("<h2>Policy in force</h2><table>" + "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in _policy_lines(report)) + "</table>")
    body.append("<h2>Schedule adherence</h2><table><tr><th>schedule</th><th>met</th><th>late</th><th>missed</th>"
                "<th>pending</th></tr>" + "".join(
                    f"<tr><td>{_e(k)}</td><td>{v['met']}</td><td>{v['late']}</td><td>{v['missed']}</td>"
                    f"<td>{v['pending']}</td></tr>" for k, v in counts.items()) + "</table>")
    problems = [s for s in report.slots if s.status in ("missed", "late")]
    rows = "".join(
        f'<tr class="{s.status}"><td>{_e(_d(s.slot))}</td><td>{_e(s.schedule)}</td><td>{_e(s.status)}</td>'
        f"<td>{_e(s.backup_id or '—')}{' (since deleted)' if s.backup_deleted else ''}</td>"
        f"<td>{_e(_d(s.backup_at))}</td></tr>" for s in report.slots)
    body.append(f"<p>{len(problems)} slot(s) missed or late.</p><details><summary>every slot ({len(report.slots)})"
                f"</summary><table><tr><th>slot</th><th>schedule</th><th>status</th><th>backup</th><th>taken</th></tr>"
                f"{rows}</table></details>")
    body.append("<h2>Backups</h2><table><tr><th>id</th><th>kind</th><th>taken</th><th>size</th><th>expires</th>"
                "<th>lock</th><th>checksums verified</th><th>restore test</th><th>retention</th></tr>" + "".join(
                    f"<tr><td>{_e(b.id)}</td><td>{_e(b.kind)}</td><td>{_e(_d(b.started_at))}</td>"
                    f"<td>{_e(_size(b.size_bytes))}</td><td>{_e(_d(b.expires_at))}</td>"
                    f"<td>{_e(f'{b.lock_mode} until {_d(b.lock_until)}' if b.lock_until else 'none')}</td>"
                    f"<td>{_e(_ok(b.last_verified_ok, b.last_verified))}</td>"
                    f"<td>{_e(_ok(b.last_restore_test_ok, b.last_restore_test))}</td>"
                    f"<td>{_e(b.retention)}: {_e('; '.join(b.reasons))}</td></tr>" for b in report.backups)
                + "</table>")
    body.append(f"<h2>Retention adherence</h2><p>Retention runs recorded: {report.retention_runs}, last "
                f"{_e(_d(report.last_retention_run))}.</p>")
    crit_cell = ' class="crit"'
    body.append("<table><tr><th>deleted backup</th><th>kind</th><th>taken</th><th>deleted</th><th>expired</th>"
                "<th>why</th></tr>" + "".join(
                    f"<tr><td>{_e(d.id)}</td><td>{_e(d.kind)}</td><td>{_e(_d(d.started_at))}</td>"
                    f"<td{crit_cell if d.expires_at and d.at < d.expires_at else ''}>{_e(_d(d.at))}</td>"
                    f"<td>{_e(_d(d.expires_at))}</td><td>{_e('; '.join(d.reasons))}</td></tr>"
                    for d in report.deletions) + "</table>")
    p = report.pitr
    body.append("<h2>Point-in-time recovery</h2>")
    if not p.in_use:
        body.append("<p>Not in use: no base backups and no archived WAL.</p>")
    else:
        body.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in [
            ("PITR window", f"{_d(p.window_start)} → {_d(report.now)}"),
            ("recoverable", f"{_d(p.recoverable_from)} → {_d(p.recoverable_to)}"),
            ("base backups", ", ".join(p.bases) or "none"),
            ("WAL", f"{p.wal_segments} segments {p.wal_first or '—'} … {p.wal_last or '—'}"),
            ("gaps", ", ".join(f"{a}..{b}" for a, b in p.gaps) or "none")]) + "</table>")
    body.append("<h2>Verification runs</h2><table><tr><th>at</th><th>result</th><th>backups</th><th>restore test</th>"
                "</tr>" + "".join(f"<tr><td>{_e(_d(v.at))}</td><td{'' if v.ok else crit_cell}>"
                                  f"{'ok' if v.ok else 'FAILED'}</td><td>{len(v.backups)}</td>"
                                  f"<td>{'yes' if v.restore_test else 'no'}</td></tr>"
                                  for v in report.verifications[-30:]) + "</table>")
    if report.health:
        body.append(_health_html(report.health))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Backup audit — {_e(report.verdict)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def _health_markdown(health: dict[str, Any]) -> list[str]:
    out = ["", "## Health checks", "", "| check | frequency | last status | last run | next check |",
           "|---|---|---|---|---|"]
    out += [f"| {r['title']} | {r['frequency']} | {r['last_status']} | {_d(_ts(r['last_run']))} | "
            f"{_d(_ts(r['next_check']))} |" for r in health["checks"]]
    out += ["", "Failed runs in the audit window:", ""]
    out += [f"- {_d(_ts(f['at']))} {f['check']}: {f['detail']}" for f in health["failures"][:50]] or ["- none"]
    return out


def _health_html(health: dict[str, Any]) -> str:
    crit = ' class="crit"'
    rows = "".join(f"<tr><td>{_e(r['title'])}</td><td>{_e(r['frequency'])}</td>"
                   f"<td{crit if r['last_status'] == 'FAILED' else ''}>{_e(r['last_status'])}</td>"
                   f"<td>{_e(_d(_ts(r['last_run'])))}</td><td>{_e(_d(_ts(r['next_check'])))}</td></tr>"
                   for r in health["checks"])
    failures = "".join(f"<li>{_e(_d(_ts(f['at'])))} {_e(f['check'])}: {_e(f['detail'])}</li>"
                       for f in health["failures"][:50]) or "<li>none</li>"
    return ("<h2>Health checks</h2><table><tr><th>check</th><th>frequency</th><th>last status</th>"
            f"<th>last run</th><th>next check</th></tr>{rows}</table>"
            f"<p>Failed runs in the audit window:</p><ul>{failures}</ul>")
