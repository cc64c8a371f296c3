"""Edit a feature's label and notes (stored in the index by the app)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static, TextArea

from saetui.tui.bindings import bindings


class LabelScreen(ModalScreen[tuple[str, str] | None]):
    """Dismisses with (label, notes), or None when cancelled."""

    BINDINGS = bindings("label")
    DEFAULT_CSS = """
    LabelScreen { align: center middle; }
    LabelScreen > Vertical {
        width: 70; max-width: 100%; height: auto; max-height: 100%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    LabelScreen Input { margin: 0 0 1 0; }
    LabelScreen TextArea { height: 6; }
    """

    def __init__(self, feature: int, label: str, notes: str) -> None:
        super().__init__()
        self.feature = feature
        self.label = label
        self.notes = notes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"Feature #{self.feature}: label (Enter or ctrl+s saves, esc cancels)")
            yield Input(self.label, placeholder="short label, e.g. 'python keywords'", id="label")
            yield Static("notes")
            yield TextArea(self.notes, id="notes", soft_wrap=True)

    def on_mount(self) -> None:
        self.query_one("#label", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def action_save(self) -> None:
        label = self.query_one("#label", Input).value
        notes = self.query_one("#notes", TextArea).text
        self.dismiss((label, notes))

    def action_cancel(self) -> None:
        self.dismiss(None)
