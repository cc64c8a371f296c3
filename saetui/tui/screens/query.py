"""Query bar: type an expression (f:1 & !f:2, tok:" the", re:/get/, doc:17), see the count,
PMI and the first matches in their windows; Enter opens a match in the context view, ``d``
its whole document (across windows)."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from saetui.tui.bindings import bindings
from saetui.tui.model import Context, QueryMatch, QueryResult
from saetui.tui.render import format_value, show_token
from saetui.tui.screens.context import ContextScreen

RADIUS = 10  # tokens shown either side of a match


class QueryScreen(Screen[int | None]):
    """Dismisses with a feature id to open (chosen in a match's context view), or None."""

    BINDINGS = bindings("query")
    DEFAULT_CSS = """
    QueryScreen #query-input { margin: 0 1; }
    QueryScreen #query-status { height: auto; padding: 0 1; }
    QueryScreen OptionList { height: 1fr; border: none; }
    """

    def __init__(self, expression: str = "") -> None:
        super().__init__()
        self.expression = expression
        self.result: QueryResult | None = None

    def compose(self) -> ComposeResult:
        yield Input(
            self.expression,
            placeholder='f:123  f:1 & !f:2  f:3 > 2.5  tok:" the"  re:/get/  doc:17',
            id="query-input",
        )
        yield Static(Text("⏎ runs the query", style="dim"), id="query-status")
        yield OptionList(id="query-results")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted, "#query-input")
    def submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.expression = event.value
        self.query_one("#query-status", Static).update(Text("searching…", style="dim"))
        self.run_query(event.value)

    @work(thread=True, exclusive=True, exit_on_error=False, group="query")
    def run_query(self, expression: str) -> None:
        source = self.app.source  # type: ignore[attr-defined]
        try:
            result = source.query(expression)
        except Exception as error:  # input errors are sentences; show any failure here
            if not get_current_worker().is_cancelled:
                self.app.call_from_thread(self.show_error, str(error))
            return
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self.show_result, result)

    def show_error(self, text: str) -> None:
        self.result = None
        self.query_one("#query-status", Static).update(Text(text, style="red"))
        self.query_one(OptionList).clear_options()

    def show_result(self, result: QueryResult) -> None:
        self.result = result
        counts = ", ".join(f"{k}: {v:,}" for k, v in result.counts.items())
        pmi = "" if result.pmi is None else f" · PMI {result.pmi:.3f}"
        shown = len(result.matches)
        self.query_one("#query-status", Static).update(
            Text.assemble(
                (f"{result.total:,} matches", "bold"),
                f" ({counts}){pmi}",
                (f" · first {shown} by value · ⏎ opens one", "dim"),
            )
        )
        options = self.query_one(OptionList)
        options.set_options([Option(self._row(result, i)) for i in range(shown)])
        if shown:
            options.highlighted = 0
            options.focus()

    @staticmethod
    def _row(result: QueryResult, i: int) -> Text:
        match = result.matches[i]
        ctx = match.context
        values = " ".join(
            f"#{f}={format_value(v)}" for f, v in zip(result.features, match.values, strict=True)
        )
        text = Text(f"w{match.window}:{match.position} {values}  ", style="dim")
        lo, hi = max(0, ctx.position - RADIUS), min(len(ctx.tokens), ctx.position + RADIUS + 1)
        for p in range(lo, hi):
            token = show_token(ctx.tokens[p])
            if p == ctx.position:
                text.append(token, style="bold reverse")
            elif ctx.values[p] > 0:
                text.append(token, style="bold yellow")
            else:
                text.append(token)
        return text

    @on(OptionList.OptionSelected, "#query-results")
    def selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if self.result is None or event.option_index >= len(self.result.matches):
            return
        match = self.result.matches[event.option_index]
        feature = self.result.features[0] if self.result.features else -1
        self._open_context(feature, match.context)

    def action_document(self) -> None:
        """The highlighted match's whole document, shaded by the query's first feature."""
        options = self.query_one(OptionList)
        if self.result is None or options.highlighted is None:
            return
        match = self.result.matches[options.highlighted]
        feature = self.result.features[0] if self.result.features else -1
        self.load_document(match, feature)

    @work(thread=True, exclusive=True, exit_on_error=False, group="query-document")
    def load_document(self, match: QueryMatch, feature: int) -> None:
        source = self.app.source  # type: ignore[attr-defined]
        try:
            context = source.document(match, feature)
        except Exception as error:
            self.app.call_from_thread(self.notify, str(error), severity="error")
            return
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._open_context, feature, context)

    def _open_context(self, feature: int, context: Context) -> None:
        def opened(chosen: int | None) -> None:
            if chosen is not None:
                self.dismiss(chosen)

        self.app.push_screen(ContextScreen(feature, context), opened)

    def action_edit(self) -> None:
        self.query_one(Input).focus()

    def action_close(self) -> None:
        self.dismiss(None)
