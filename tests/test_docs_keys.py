"""docs/TUI.md's key table is the one scripts/tui_captures.py generates from the binding
registry: a binding added or changed without regenerating the doc fails here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_documented_key_table_is_the_generated_one():
    spec = importlib.util.spec_from_file_location(
        "tui_captures", REPO / "scripts" / "tui_captures.py"
    )
    assert spec is not None and spec.loader is not None
    captures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(captures)
    doc = (REPO / "docs" / "TUI.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- keys:begin -->\n(.*?)\n<!-- keys:end -->", doc, re.S)
    assert block, "docs/TUI.md has no keys:begin ... keys:end block"
    assert block.group(1) == captures.key_table(), (
        "docs/TUI.md's key table is stale: run python scripts/tui_captures.py"
    )
