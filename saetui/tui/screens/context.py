"""Context view: a whole window with the current feature's activations; moving over the
tokens lists every feature active at the token under the cursor, Enter opens one."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from saetui.tui.bindings import bindings
from saetui.tui.model import ActiveFeature, Context
from saetui.tui.render import feature_ref, format_value, show_token
from saetui.tui.widgets.tokens import TokenStrip


class ContextScreen(Screen[int | None]):
    """Dismisses with the feature id to open, or None."""

    BINDINGS = bindings("context")
    DEFAULT_CSS = """
    ContextScreen #context-title { height: 1; background: $panel; padding: 0 1; }
    ContextScreen TokenStrip { max-height: 60%; border-bottom: solid $panel; }
    ContextScreen #token-title { height: 1; padding: 0 1; color: $text-muted; }
    ContextScreen OptionList { height: 1fr; border: none; }
    """

    def __init__(self, feature: int, context: Context) -> None:
        super().__init__()
        self.feature = feature
        self.context = context
        self.active: list[ActiveFeature] = []

    def compose(self) -> ComposeResult:
        ctx = self.context
        yield Static(
            Text.assemble(
                (f" #{self.feature} ", "bold reverse"),
                f" {self._where(ctx.position)} · act {format_value(ctx.value)}",
                (f"  (window {ctx.window}) · h/l move, ⏎ open", "dim"),
            ),
            id="context-title",
        )
        with Vertical():
            yield TokenStrip(id="context-tokens")
            yield Static("", id="token-title")
            yield OptionList(id="token-features")
        yield Footer()

    def on_mount(self) -> None:
        strip = self.query_one(TokenStrip)
        strip.set_tokens(
            self.context.tokens,
            self.context.values,
            mark=self.context.position,
            cursor=self.context.position,
        )
        strip.focus()

    def on_token_strip_cursor_moved(self, message: TokenStrip.CursorMoved) -> None:
        position = message.position
        tokens = self.context.tokens
        if not tokens:
            return
        value = self.context.values[position] if position < len(self.context.values) else 0.0
        self.query_one("#token-title", Static).update(
            Text.assemble(
                ("token ", "dim"),
                (repr(show_token(tokens[position])), "bold"),
                (f"  {self._where(position)}   #{self.feature} = {format_value(value)}   ", "dim"),
                ("features active here:", "dim"),
            )
        )
        if self.context.locations is not None:  # a whole document, across windows
            self.load_token(*self.context.locations[position])
            return
        window_position = self.context.window_position - self.context.position + position
        self.load_token(self.context.window, window_position)

    def _where(self, position: int) -> str:
        """One way to say where token ``position`` of the context is: its place in its
        document when known, else in the window."""
        ctx = self.context
        if ctx.document >= 0 and ctx.document_offset >= 0:
            return f"document {ctx.document}, token {ctx.document_offset - ctx.position + position}"
        return f"window token {ctx.window_position - ctx.position + position}"

    @work(thread=True, exclusive=True, exit_on_error=False, group="context-token")
    def load_token(self, window: int, position: int) -> None:
        source = self.app.source  # type: ignore[attr-defined]
        try:
            active = source.token_features(window, position)
        except Exception as error:
            self.app.call_from_thread(self._show_error, str(error))
            return
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show_active, active)

    def _show_error(self, text: str) -> None:
        options = self.query_one(OptionList)
        options.set_options([Option(Text(text, style="red"), disabled=True)])

    def _show_active(self, active: list[ActiveFeature]) -> None:
        self.active = active
        options = self.query_one(OptionList)
        if not active:
            options.set_options([Option(Text("no feature fires here", style="dim"), disabled=True)])
            return
        rows = [
            Option(
                feature_ref(
                    entry.feature,
                    entry.label,
                    entry.top_tokens,
                    entry.value,
                    bold=entry.feature == self.feature,
                )
            )
            for entry in active
        ]
        options.set_options(rows)
        options.highlighted = 0

    def action_move(self, delta: int) -> None:
        self.query_one(TokenStrip).move(delta)

    def action_list_down(self) -> None:
        self.query_one(OptionList).action_cursor_down()

    def action_list_up(self) -> None:
        self.query_one(OptionList).action_cursor_up()

    def action_open(self) -> None:
        index = self.query_one(OptionList).highlighted
        if index is not None and index < len(self.active):
            self.dismiss(self.active[index].feature)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_open()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard("".join(self.context.tokens))
        self.notify("Window copied (OSC 52)")

    def action_close(self) -> None:
        self.dismiss(None)
