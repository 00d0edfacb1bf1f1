"""``--help`` at 80 columns: piped (COLUMNS=80) and on an 80-column pseudo-terminal, every
command's help wraps its text and never truncates it ("--schema-from-migra…"), a flag shows
no metavar ("<bool>"), and the main verbs come first in the command list."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from typing import Any

import pytest
import typer
from support.paths import REPO_ROOT

ROOT = REPO_ROOT
TYPE_DISPLAY = re.compile(r"<(bool|str|int|float|int range|float range|path)>")


def _commands() -> list[tuple[list[str], Any]]:
    from backup_tool.cli.program import app

    found: list[tuple[list[str], Any]] = []

    def walk(path: list[str], cmd: Any) -> None:
        found.append((path, cmd))
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk([*path, name], sub)

    walk([], typer.main.get_command(app))
    return found


def _help(path: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from backup_tool.cli.program import app

    assert app([*path, "--help"], prog_name="backup-tool", standalone_mode=False) in (0, None)
    return capsys.readouterr().out


def _squeezed(text: str) -> str:
    return "".join(text.split())


def test_every_help_wraps_at_80_columns_without_truncating(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    commands = _commands()
    assert len(commands) > 20
    for path, cmd in commands:
        text = _help(path, capsys)
        where = " ".join(path) or "backup-tool"
        assert "…" not in text, where
        assert not TYPE_DISPLAY.search(text), (where, TYPE_DISPLAY.search(text))
        assert max(len(line) for line in text.splitlines()) <= 80, where
        squeezed = _squeezed(text)
        for param in cmd.params:
            for opt in param.opts if param.param_type_name == "option" else []:
                assert re.search(rf"(^|[\s,]){re.escape(opt)}([\s,]|$)", text, re.M), (where, opt)
            if getattr(param, "help", None):
                assert _squeezed(param.help) in squeezed, (where, param.help)
            if param.param_type_name == "option" and param.is_flag:
                names = " / ".join(", ".join(sorted(o, key=len)) for o in (param.opts, param.secondary_opts) if o)
                options = text.split("\nOptions:\n", 1)[1].splitlines()
                row = next(ln.strip() for ln in options if ln.strip().startswith(names + " ") or ln.strip() == names)
                assert row == names or row[len(names):].startswith("  "), (where, row)
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                first_sentence = re.split(r"\.\s", sub.help or "")[0]
                assert _squeezed(first_sentence) in squeezed, (where, name)


def test_main_verbs_first_and_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = _help([], capsys)
    listed = [ln.split()[0] for ln in text.split("Commands:")[1].splitlines() if ln.startswith("  ") and
              not ln.startswith("   ")]
    assert listed[:6] == ["backup", "restore", "list", "show", "verify", "validate"]
    from backup_tool import __version__

    proc = subprocess.run([sys.executable, "-m", "backup_tool", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"backup-tool {__version__}\n", "")


def test_restore_full_help_on_an_80_column_terminal() -> None:
    """Through a real pseudo-terminal (no COLUMNS: the width comes from the tty)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "backup_tool", "restore", "full", "--help"], cwd=ROOT,
                            stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode()).replace("\r\n", "\n")
    lines = text.splitlines()
    assert "…" not in text and not TYPE_DISPLAY.search(text)
    assert max(len(line) for line in lines) <= 80
    assert any(line.startswith("  --schema-from-migrations DIR ") for line in lines)
    assert "PGHOST/PGPORT/PGUSER" not in text  # restore's --dsn says what it is for instead
    assert any(line.strip() == "--create" or line.startswith("  --create  ") for line in lines)
    dsn_help = " ".join(text.split("--dsn DSN", 1)[1].split("--policy")[0].split())
    assert "The restore goes to --target-dsn" in dsn_help and "'latest'" in dsn_help


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_incident_index_links_to_distinct_walkthroughs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = [ln.lstrip("#").strip() for ln in readme.splitlines() if re.match(r"#{1,4} ", ln)]
    anchors = {_github_anchor(h) for h in headings}
    top = headings[:4]
    assert "In an incident" in top and "Back up your own database in three commands" in top
    index = readme.split("## In an incident\n", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\(#([^)]+)\)", index)
    assert len(links) >= 6
    assert [a for a in links if a not in anchors] == []
    incidents = [h for h in headings if h.startswith("Incident")]
    assert len(incidents) == len(set(incidents)) >= 4
    assert all(_github_anchor(h) in links for h in incidents), incidents
    three = readme.split("## Back up your own database in three commands\n", 1)[1].split("```bash\n", 1)[1]
    commands = [ln for ln in three.split("```", 1)[0].splitlines() if ln.strip()]
    assert len(commands) == 3 and commands[1].startswith("backup-tool check") \
        and commands[2].startswith("backup-tool backup full")


COMMON_OPTIONS = {"--repo", "--dsn", "--policy", "--json", "--debug", "--pg-bin", "--help", "-h"}


def _readme_command_lines() -> dict[tuple[str, ...], str]:
    """README's command list: each command's words -> the options its lines write."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Commands\n", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    found: dict[tuple[str, ...], str] = {}
    current: tuple[str, ...] = ()
    for line in block.splitlines():
        if line.startswith("backup-tool "):
            words = line.split()[1:]
            current = tuple(w for w in words[:2] if re.fullmatch(r"[a-z-]+", w) and not w.startswith("-"))
            if len(current) == 2 and current[0] not in ("backup", "restore", "wal", "retention", "schema"):
                current = current[:1]
            found[current] = found.get(current, "") + " " + line
        elif line.startswith(" ") and current:
            found[current] += " " + line
    return found


def test_readme_command_list_and_help_name_the_same_options() -> None:
    """README's command list is the contract (DESIGN.md): every option it writes exists, and
    every option of a command (but the common ones, in the Configuration table) is in it."""
    readme = _readme_command_lines()
    commands = {tuple(path): cmd for path, cmd in _commands() if path and not hasattr(cmd, "commands")}
    assert set(readme) == set(commands) - {("version",)}, set(readme) ^ set(commands)
    for path, line in readme.items():
        written = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line))
        params = {o for p in commands[path].params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
        assert written - params == set(), (path, written - params)
        assert params - COMMON_OPTIONS - written == set(), (path, params - COMMON_OPTIONS - written)


def test_readme_contents_links_resolve() -> None:
    """The contents at the top of README link only to headings that exist."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = [ln.lstrip("#").strip() for ln in readme.splitlines() if re.match(r"#{1,4} ", ln)]
    anchors = {_github_anchor(h) for h in headings}
    contents = readme.split("**Contents.**", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\(#([^)]+)\)", contents)
    assert len(links) >= 20 and [a for a in links if a not in anchors] == []
    for anchor in ("set-up-the-two-commands", "exit-codes", "not-carried-by-design"):
        assert anchor in links, anchor


def test_every_command_help_ends_with_its_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """An operator reading one command's --help learns what its exit code means without the
    top-level help (status and wal fetch have codes of their own)."""
    for path, cmd in _commands():
        if hasattr(cmd, "commands") or path == ["version"]:
            continue
        text = _squeezed(_help(path, capsys))
        assert "Exitcodes" in text, path
        if path == ["status"]:
            assert "0OK,1WARNING,2CRITICAL,3UNKNOWN" in text.split("Exitcodes", 1)[1]
        elif path == ["wal", "fetch"]:
            assert "1notinthearchive" in text and "255" in text.split("Exitcodes", 1)[1]
        else:
            assert "0ok,1failed,2usageerror,3verification/validationfoundaproblem" in text, path


def test_every_command_help_names_the_default_repository(capsys: pytest.CaptureFixture[str]) -> None:
    """--repo's help says where the embedded default is, not only the top-level help."""
    from backup_tool.config.locations import default_repo

    for path, cmd in _commands():
        if hasattr(cmd, "commands") or path == ["version"]:
            continue
        assert _squeezed(str(default_repo())) in _squeezed(_help(path, capsys)), path
