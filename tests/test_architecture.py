"""The package's architecture, enforced: layers (import-linter's contract in pyproject.toml),
no import cycle between modules even counting deferred (function-local) imports, and deferred
imports only where they are deliberate."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "backup_tool"

# Deferred on purpose: the CLI imports each command's library module only when that command
# runs (so `--help` and the `wal push`/`wal fetch` fast path stay fast), the storage factory
# imports the S3 driver (boto3) only for s3:// repositories, and a direct base backup imports
# the page verifier (numpy) only for a cluster with data checksums.
DEFERRED_ALLOWED = ("backup_tool/cli/", "backup_tool/repository/storage/__init__.py",
                    "backup_tool/physical/basedirect.py")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for nxt in sorted(graph.find_modules_directly_imported_by(module)):
            if not nxt.startswith("backup_tool"):
                continue
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[module] = 2

    sys.setrecursionlimit(10000)
    for module in sorted(graph.modules):
        if module not in state:
            visit(module)
    return found


def test_no_import_cycle_between_modules() -> None:
    graph = grimp.build_graph("backup_tool", include_external_packages=False)
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    cycles = [c for c in _cycles(graph) if not any(b.startswith(a + ".") for a, b in zip(c, c[1:], strict=False))]
    assert cycles == []


def test_layers_contract_holds() -> None:
    run = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    result = subprocess.run([sys.executable, "-c", run],
                            cwd=ROOT, capture_output=True, text=True)
    if "No module named" in result.stderr:
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_deferred_imports_only_where_deliberate() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(DEFERRED_ALLOWED):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("backup_tool"):
                        found.append(f"{rel}:{node.lineno} from {node.module}")
                    if isinstance(node, ast.ImportFrom) and node.module is None and node.level:
                        found.append(f"{rel}:{node.lineno} relative import")
    assert found == []


def test_no_import_error_fallbacks() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers):
                if any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("backup_tool")
                       for n in ast.walk(node)):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
