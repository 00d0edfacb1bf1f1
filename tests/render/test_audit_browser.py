"""The HTML audit as a browser draws it: headless Chromium (Debian's ``chromium``, which
scripts/test installs) loads the page with a small measuring script added to a copy (the
report itself carries no script), and the test reads back what was laid out: the section
titles and their text, and the box of every label in the timeline, so an overlap (the "now"
label over the legend) is a measured fact, not a guess from the SVG source."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from simhistory import record, ts

from backup_tool.config.policy import Policy
from backup_tool.core.walnames import segment_name
from backup_tool.governance.audit import AuditReport, build_report
from backup_tool.governance.status import WalState
from backup_tool.render.audit import render_html, timeline_svg

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (scripts/test installs Debian's "
                             "'chromium' with apt when run as root)")

MEASURE = """<script>
addEventListener('load', () => {
  const box = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
  const svgs = [...document.querySelectorAll('svg')].map(s => ({box: box(s),
    texts: [...s.querySelectorAll('text')].map(t => ({text: t.textContent, box: box(t)}))}));
  const sections = [...document.querySelectorAll('h2')].map(h => ({title: h.textContent,
    text: (h.closest('section') || h.parentElement).innerText}));
  const out = document.createElement('pre');
  out.id = 'measured';
  out.textContent = JSON.stringify({svgs, sections});
  document.body.appendChild(out);
});
</script>"""

SECTIONS = ["Report", "Timeline", "Scope", "Findings", "Policy in force", "Schedule adherence", "Backups",
            "Retention adherence", "Point-in-time recovery", "Restore tests (recovery-time evidence)",
            "Verification runs", "Health checks"]


def measure(page: str, tmp_path: Path, width: int = 1400) -> dict[str, Any]:
    """Load ``page`` in headless Chromium and return what the measuring script saw."""
    assert CHROMIUM is not None
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"page-{width}.html"
    path.write_text(page.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},1000",
                           "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="measured">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium exit {proc.returncode}: {proc.stderr[-2000:]}"
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    return json.loads(text)


def overlapping(texts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    found = []
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            (al, at, ar, ab), (bl, bt, br, bb) = a["box"], b["box"]
            if al < br and bl < ar and at < bb and bt < ab:
                found.append((a["text"], b["text"]))
    return found


def pitr_report() -> AuditReport:
    """Two weeks with a base backup, WAL, a missed slot: every lane and every legend entry drawn."""
    now = ts("2026-11-25T12:00Z")
    base = record("base", "2026-11-17T03:00Z", start_wal=segment_name(1, 100))
    fulls = [record("full", f"2026-11-{d:02d}T02:00Z") for d in range(12, 26) if d != 20]
    wal = WalState(tuple(segment_name(1, p) for p in range(100, 200)), ts("2026-11-25T11:59Z"))
    policy = replace(Policy(), schedule=replace(Policy().schedule, base="0 3 * * 0"))
    return build_report([base, *fulls], [], [], wal, policy, now)


@pytest.mark.parametrize("width", [1260, 800])
def test_timeline_labels_never_overlap(width: int, tmp_path: Path) -> None:
    svg = timeline_svg(pitr_report(), width=width)
    seen = measure(f"<!DOCTYPE html><html><body>{svg}</body></html>", tmp_path, width + 100)
    [drawn] = seen["svgs"]
    texts = drawn["texts"]
    now = [t for t in texts if t["text"].startswith("now ")]
    legend = [t for t in texts if t["text"] in ("slot met", "slot late", "slot missed", "pending", "incremental")]
    assert len(now) == 1 and len(legend) == 5, [t["text"] for t in texts]
    assert overlapping(texts) == []
    left, top, right, bottom = drawn["box"]
    outside = [t["text"] for t in texts if t["box"][0] < left or t["box"][2] > right + 0.5
               or t["box"][1] < top or t["box"][3] > bottom + 0.5]
    assert outside == []


def test_html_sections_and_none_for_empty_ones(tmp_path: Path) -> None:
    full = record("full", "2026-11-25T02:00Z")
    reports = {"empty": build_report([], [], [], None, Policy(), ts("2026-11-25T12:00Z")),
               "one backup": build_report([full], [], [], None, Policy(), ts("2026-11-25T12:00Z"))}
    texts: dict[str, dict[str, str]] = {}
    for name, report in reports.items():
        seen = measure(render_html(report), tmp_path / name.replace(" ", "-"))
        titles = [s["title"] for s in seen["sections"]]
        assert titles == SECTIONS, name
        text = texts[name] = {s["title"]: s["text"] for s in seen["sections"]}
        for empty in ("Restore tests (recovery-time evidence)", "Verification runs", "Health checks"):
            assert re.search(r"^none$", text[empty], re.M), (name, empty, text[empty])
        assert re.search(r"Deletions \(append-only log\):\s+none", text["Retention adherence"]), name
        assert re.search(r"Kept past expiry:\s+none", text["Retention adherence"]), name
        assert re.search(r"^none$", text["Point-in-time recovery"], re.M), name
        assert len(seen["svgs"]) == 1 and overlapping(seen["svgs"][0]["texts"]) == []
    for title in ("Scope", "Backups"):
        assert re.search(r"^none$", texts["empty"][title], re.M)
        assert not re.search(r"^none$", texts["one backup"][title], re.M)
    assert "20261125T020000Z" in texts["one backup"]["Backups"]
