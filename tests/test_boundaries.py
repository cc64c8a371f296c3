"""The package's boundaries, checked rather than promised: domain packages never import
Textual or Rich's UI modules, and the TUI reaches the index only through its public API."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import saetui

PACKAGE = Path(saetui.__file__).parent
DOMAIN = ("analysis", "collect", "commands", "corpus", "export", "index", "lm", "sae")
UI_MODULES = ("textual", "rich.console", "rich.live", "rich.progress", "textual_plotext")


def _domain_modules() -> list[str]:
    names = ["saetui", "saetui.errors", "saetui.cli"]
    for package in DOMAIN:
        names.append(f"saetui.{package}")
        names.extend(
            f"saetui.{package}.{info.name}"
            for info in pkgutil.iter_modules([str(PACKAGE / package)])
        )
    return names


def test_domain_modules_import_no_ui():
    """Import every domain module in one fresh interpreter, in turn; a UI module that
    appears after an import is charged to that module."""
    script = (
        "import importlib, json, sys\n"
        f"ui = {UI_MODULES!r}\n"
        "blamed = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module(name)\n"
        "    new = [m for m in set(sys.modules) - before if m.startswith(ui)]\n"
        "    if new: blamed[name] = sorted(new)[:3]\n"
        "print(json.dumps(blamed))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(_domain_modules())],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def test_the_tui_uses_only_the_index_package_api():
    """saetui.tui imports `saetui.index` (its public names), never its modules."""
    offenders = []
    for path in (PACKAGE / "tui").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            offenders += [
                f"{path.relative_to(PACKAGE)}: {name}"
                for name in names
                if name.startswith("saetui.index.")
            ]
    assert offenders == []


def test_the_index_reader_needs_no_torch():
    """Reading an index (the TUI's whole job) loads no torch."""
    done = subprocess.run(
        [sys.executable, "-c", ("import sys, saetui.index, saetui.tui.app; "
                                "print('torch' in sys.modules)")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
