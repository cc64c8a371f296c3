"""Probe pane: type text, the model and SAE run in a worker; per token the top features and
for the whole text the features ranked by max activation; Enter opens a feature."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from saetui.tui.bindings import bindings
from saetui.tui.render import format_value, show_token
from saetui.tui.widgets.tokens import TokenStrip

RANKED_SHOWN = 200


class ProbePane(Vertical):
    BINDINGS = bindings("probe")
    DEFAULT_CSS = """
    ProbePane #probe-input { border: none; height: 1; padding: 0 1; background: $boost; }
    ProbePane #probe-input:focus { background: $accent 30%; }
    ProbePane #probe-status { height: 1; padding: 0 1; color: $text-muted; }
    ProbePane #probe-lists { height: 1fr; }
    ProbePane OptionList { width: 1fr; height: 1fr; border: round $panel; }
    ProbePane OptionList:focus { border: round $accent; }
    """

    class OpenFeature(Message):
        def __init__(self, feature: int) -> None:
            super().__init__()
            self.feature = feature

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.result: Any = None  # saetui.analysis.probe.ProbeResult
        self._token_features: list[int] = []
        self._ranked: list[int] = []

    def compose(self) -> ComposeResult:
        yield Input(placeholder="type text and press Enter to probe", id="probe-input")
        yield Static("the model loads on the first probe", id="probe-status")
        yield TokenStrip(id="probe-tokens")
        with Horizontal(id="probe-lists"):
            yield OptionList(id="probe-at-token")
            yield OptionList(id="probe-ranked")

    def on_mount(self) -> None:
        self.query_one("#probe-at-token", OptionList).border_title = "at token"
        self.query_one("#probe-ranked", OptionList).border_title = "ranked by max"

    def status(self, text: str | Text) -> None:
        self.query_one("#probe-status", Static).update(text)

    # ------------------------------------------------------------------ running

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value
        if not text.strip():
            self.status(Text("type some text first", style="yellow"))
            return
        self.status(Text("running… (loading the model the first time)", style="italic"))
        self.run_probe(text)

    @work(thread=True, exclusive=True, exit_on_error=False, group="probe")
    def run_probe(self, text: str) -> None:
        app: Any = self.app

        def status(message: str) -> None:
            if not get_current_worker().is_cancelled:
                app.call_from_thread(self.status, Text(message, style="italic"))

        try:
            result = app.probe_service().probe(text, status=status)
        except Exception as error:  # a model that cannot load is a message, not a crash
            if get_current_worker().is_cancelled:
                return  # the app is quitting (it killed the model process)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            app.call_from_thread(self.status, Text(f"probe failed: {message}", style="red"))
            return
        if not get_current_worker().is_cancelled:
            app.call_from_thread(self.show_result, result)

    def show_result(self, result: Any) -> None:
        self.result = result
        self._ranked = [entry.feature for entry in result.ranked[:RANKED_SHOWN]]
        ranked = self.query_one("#probe-ranked", OptionList)
        ranked.set_options(
            [
                Option(
                    Text(
                        f"#{entry.feature:<7} {format_value(entry.max_value):>6} "
                        f"@{show_token(result.tokens[entry.position])!r} ×{entry.n_tokens}"
                    )
                )
                for entry in result.ranked[:RANKED_SHOWN]
            ]
            or [Option(Text("no feature fired", style="dim"), disabled=True)]
        )
        if self._ranked:
            ranked.highlighted = 0
        n = len(result.tokens)
        truncated = " (truncated)" if result.truncated else ""
        self.status(
            f"{n} tokens{truncated}, {len(result.ranked)} features fired · "
            "h/l move over tokens · t switches list · Enter opens"
        )
        strip = self.query_one(TokenStrip)
        maxima = [top[0][1] if top else 0.0 for top in result.per_token]
        strip.set_tokens(result.tokens, maxima, cursor=0)
        strip.focus()

    def on_token_strip_cursor_moved(self, message: TokenStrip.CursorMoved) -> None:
        if self.result is None or not self.result.per_token:
            return
        position = min(message.position, len(self.result.per_token) - 1)
        top = self.result.per_token[position]
        self._token_features = [f for f, _ in top]
        at_token = self.query_one("#probe-at-token", OptionList)
        at_token.border_title = f"at {show_token(self.result.tokens[position])!r}"
        labels = getattr(self.app, "label_cache", {})
        at_token.set_options(
            [Option(Text(f"#{f:<7} {format_value(v):>6}  {labels.get(f, '')}")) for f, v in top]
            or [Option(Text("no feature fires here", style="dim"), disabled=True)]
        )
        if top:
            at_token.highlighted = 0

    # ------------------------------------------------------------------ actions

    def _focused_list(self) -> OptionList:
        focused = self.screen.focused
        if isinstance(focused, OptionList) and focused.id in ("probe-at-token", "probe-ranked"):
            return focused
        return self.query_one("#probe-at-token", OptionList)

    def action_focus_input(self) -> None:
        text_box = self.query_one(Input)
        text_box.focus()
        text_box.select_all()

    def action_move(self, delta: int) -> None:
        self.query_one(TokenStrip).move(delta)

    def action_list_down(self) -> None:
        self._focused_list().action_cursor_down()

    def action_list_up(self) -> None:
        self._focused_list().action_cursor_up()

    def action_switch_list(self) -> None:
        current = self._focused_list()
        other = "#probe-ranked" if current.id == "probe-at-token" else "#probe-at-token"
        self.query_one(other, OptionList).focus()

    def action_open(self) -> None:
        options = self._focused_list()
        features = self._ranked if options.id == "probe-ranked" else self._token_features
        index = options.highlighted
        if index is not None and index < len(features):
            self.post_message(self.OpenFeature(features[index]))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        event.option_list.focus()
        self.action_open()
