"""The Textual app (only arranges and displays; data through saetui.index's reader)."""

from saetui.tui.app import SaetuiApp, run_app

__all__ = ["SaetuiApp", "run_app"]
