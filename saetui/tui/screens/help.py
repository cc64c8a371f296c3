"""Help: every binding of the registry, grouped by where it works."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from saetui.tui.bindings import REGISTRY, SCOPE_TITLES, effective_key, key_label


def help_table(keymap: dict[str, str] | None = None) -> Table:
    """The registry as one table (also used by the README's key list), with the user's
    remapped keys."""
    table = Table(box=None, show_header=False, padding=(0, 1), expand=True)
    table.add_column("key", style="bold cyan", no_wrap=True, min_width=10)
    table.add_column("action")
    for scope, title in SCOPE_TITLES.items():
        entries = [e for e in REGISTRY if e.scope == scope]
        if not entries:
            continue
        table.add_row(Text(title, style="bold underline"), "")
        for entry in entries:
            table.add_row(key_label(effective_key(entry, keymap)), entry.description)
    table.add_row(Text("Command palette", style="bold underline"), "")
    table.add_row("ctrl+p", "feature N · sort by … · filter … · export … · every action above")
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "dismiss", "Close", id="help.close"),
        Binding("j,down", "scroll('down')", show=False),
        Binding("k,up", "scroll('up')", show=False),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 76; max-width: 100%; height: 90%; border: round $accent; background: $surface;
        padding: 0 1;
    }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(Text("saetui keys  (esc closes)", style="bold"))
            yield Static(help_table(getattr(self.app, "user_keymap", None)))

    def action_scroll(self, direction: str) -> None:
        scroll = self.query_one(VerticalScroll)
        if direction == "down":
            scroll.scroll_down(animate=False)
        else:
            scroll.scroll_up(animate=False)
