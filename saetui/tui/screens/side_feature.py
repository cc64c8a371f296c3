"""One side of the comparison opened full-screen: the feature view (and its context view)
over that side's index, with a heading naming the side; esc goes back to the compare screen."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import BindingType
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import get_current_worker

from saetui.tui.bindings import entry
from saetui.tui.messages import OpenFeature
from saetui.tui.model import Context, FeatureDetail
from saetui.tui.render import format_density, format_value
from saetui.tui.screens.context import ContextScreen
from saetui.tui.source import IndexSource
from saetui.tui.widgets.feature_view import FeatureView
from saetui.tui.widgets.side_feature_view import SideFeatureView


def feature_heading(detail: FeatureDetail) -> Text:
    row = detail.row
    return Text.assemble(
        (row.label or row.top_tokens or "(no label)", "bold" if row.label else "dim"),
        ("  density ", "dim"),
        format_density(row.density) if row.count else "never fired",
        ("  max ", "dim"),
        format_value(row.max),
    )


class SideContextScreen(ContextScreen):
    """The context view over one side's index."""

    def __init__(self, source: IndexSource, feature: int, context: Context) -> None:
        super().__init__(feature, context)
        self.source = source

    @work(thread=True, exclusive=True, exit_on_error=False, group="context-token")
    def load_token(self, window: int, position: int) -> None:
        try:
            active = self.source.token_features(window, position)
        except Exception as error:
            self.app.call_from_thread(self._show_error, str(error))
            return
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show_active, active)


class SideFeatureScreen(Screen[None]):
    """A full feature view of one side of the comparison; esc goes back to it."""

    BINDINGS: ClassVar[list[BindingType]] = [entry("compare.close").binding()]
    DEFAULT_CSS = """
    SideFeatureScreen #side-header { height: 1; background: $panel; padding: 0 1; }
    """

    def __init__(self, source: IndexSource, side: str, feature: int) -> None:
        super().__init__()
        self.source = source
        self.side = side
        self.feature = feature

    def compose(self) -> ComposeResult:
        yield Static("", id="side-header")
        yield SideFeatureView(self.source, id="side-view")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(SideFeatureView).focus()
        self.open(self.feature)

    def open(self, feature: int) -> None:
        self.feature = feature
        self.query_one("#side-header", Static).update(
            Text(f" {self.side} #{feature}  loading…  ({self.source.path.name})", style="bold")
        )
        self.load(feature)

    @work(thread=True, exclusive=True, exit_on_error=False, group="side-feature")
    def load(self, feature: int) -> None:
        try:
            detail = self.source.feature(feature)
        except Exception as error:
            self.app.call_from_thread(self._show_error, str(error))
            return
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show, detail)

    def _show_error(self, text: str) -> None:
        self.query_one(SideFeatureView).show_message(text)

    def _show(self, detail: FeatureDetail) -> None:
        if detail.row.feature != self.feature:
            return
        self.query_one("#side-header", Static).update(
            Text.assemble(
                (f" {self.side} #{detail.row.feature} ", "bold reverse"),
                " ",
                feature_heading(detail),
                (f"  · {self.source.path.name} · esc back to the comparison", "dim"),
            )
        )
        self.query_one(SideFeatureView).show(detail)

    def on_open_feature(self, message: OpenFeature) -> None:
        message.stop()
        self.open(message.feature)

    def on_feature_view_open_context(self, message: FeatureView.OpenContext) -> None:
        message.stop()

        def opened(feature: int | None) -> None:
            if feature is not None:
                self.open(feature)

        self.app.push_screen(
            SideContextScreen(self.source, message.feature, message.context), opened
        )

    def action_close(self) -> None:
        self.dismiss(None)
