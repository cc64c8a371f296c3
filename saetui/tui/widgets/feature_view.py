"""The feature view: one scrolling list of everything about a feature.

Sections (top contexts, interval samples, histogram, top tokens, logit effects, neighbours)
are headings in one OptionList, so j/k walks through all of them and Enter acts on the row:
a context opens the context view, a neighbour opens that feature.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from saetui.tui.bindings import bindings
from saetui.tui.model import Context, FeatureDetail
from saetui.tui.render import context_line, format_value, show_token, sparkline

NEIGHBOUR_TITLES = {
    "cosine": "Nearest features by decoder cosine",
    "decoder_cosine": "Nearest features by decoder cosine",
    "jaccard": "Co-occurring features (Jaccard)",
    "npmi": "Co-occurring features (NPMI)",
    "p_g_given_f": "Co-occurring features (P(g|f))",
}
HEADING = Style(bold=True, color="bright_cyan")


@dataclass(frozen=True)
class Target:
    """What Enter on a row does."""

    kind: str  # "context" or "feature"
    feature: int = -1
    context: Context | None = None


class FeatureView(OptionList):
    """Shows a :class:`FeatureDetail`; posts OpenFeature / OpenContext."""

    BINDINGS = bindings("feature")
    DEFAULT_CSS = """
    FeatureView { height: 1fr; border: none; padding: 0; }
    FeatureView:focus { border: none; }
    """

    class OpenFeature(Message):
        def __init__(self, feature: int) -> None:
            super().__init__()
            self.feature = feature

    class OpenContext(Message):
        def __init__(self, feature: int, context: Context) -> None:
            super().__init__()
            self.feature = feature
            self.context = context

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.detail: FeatureDetail | None = None
        self.targets: list[Target | None] = []
        self._built_width = 0
        self.message_text = "Choose a feature in the table (2) or search with /."

    # ------------------------------------------------------------------ content

    def show_message(self, text: str) -> None:
        self.detail = None
        self.message_text = text
        self.targets = [None]
        self.set_options([Option(Text(text, style="italic"), disabled=True)])

    def show(self, detail: FeatureDetail, keep_position: bool = False) -> None:
        """Display ``detail``; with ``keep_position`` (a live refresh of the same feature)
        the highlighted row and scroll offset stay put."""
        highlighted, scroll_y = self.highlighted, self.scroll_y
        same = (
            keep_position
            and self.detail is not None
            and self.detail.row.feature == detail.row.feature
        )
        self.detail = detail
        self._build()
        if same:
            if highlighted is not None and highlighted < self.option_count:
                self.highlighted = highlighted
            self.scroll_to(y=scroll_y, animate=False)
        else:
            self.highlighted = self._first_enabled()
            self.scroll_to(y=0, animate=False)

    def _first_enabled(self) -> int | None:
        for index, target in enumerate(self.targets):
            if target is not None:
                return index
        return None

    def _build(self) -> None:
        detail = self.detail
        if detail is None:
            return
        width = max(20, self.scrollable_content_region.width or self.size.width or 80)
        self._built_width = width
        options: list[Option] = []
        targets: list[Target | None] = []
        feature = detail.row.feature

        def heading(text: str) -> None:
            options.append(Option(Text(text, style=HEADING), disabled=True))
            targets.append(None)

        def note(text: str | Text) -> None:
            line = text if isinstance(text, Text) else Text(text, style="dim")
            options.append(Option(line, disabled=True))
            targets.append(None)

        def context_row(context: Context, top: float) -> None:
            value = Text(f"{format_value(context.value):>6} ", style="bold")
            line = context_line(
                context.tokens, context.values, context.position, width - 8, max_value=top
            )
            options.append(Option(value + line))
            targets.append(Target("context", feature, context))

        top = detail.row.max or max((c.value for c in detail.contexts), default=0.0)
        if detail.row.count == 0:
            note(
                Text(
                    "This feature never fired in the tokens collected so far"
                    f" ({detail.tokens_seen:,} tokens).",
                    style="yellow",
                )
            )
        heading(f"Top activations ({len(detail.contexts)})")
        if not detail.contexts:
            note("  none yet")
        for context in detail.contexts:
            context_row(context, top)
        if detail.samples:
            heading("Activation intervals (samples from high to low)")
            for interval, contexts in detail.samples:
                note(Text(f"  {interval}", style="italic"))
                for context in contexts:
                    context_row(context, top)
        if detail.histogram:
            heading("Activation histogram (log-spaced bins)")
            counts = [c for _, c in detail.histogram]
            lo, hi = detail.histogram[0][0], detail.histogram[-1][0]
            note(Text(sparkline(counts, width - 2), style="green"))
            note(f"{format_value(lo)} … {format_value(hi)}   peak {max(counts):,} tokens")
        if detail.top_tokens:
            heading("Top tokens (in the top activations)")
            shown = "  ".join(f"{show_token(t)}×{c}" for t, c in detail.top_tokens[:30])
            note(Text(shown))
        heading("Logit effects")
        if detail.promoted or detail.suppressed:
            note(
                Text("  ↑ ", style="green")
                + Text("  ".join(f"{show_token(t)} {v:+.2f}" for t, v in detail.promoted))
            )
            note(
                Text("  ↓ ", style="red")
                + Text("  ".join(f"{show_token(t)} {v:+.2f}" for t, v in detail.suppressed))
            )
        else:
            note("  not stored in this index; computed once the model is loaded (tab 4)")
        if not detail.neighbours:
            heading("Related features")
            note("  no neighbours stored in this index yet")
        for metric, entries in detail.neighbours.items():
            heading(NEIGHBOUR_TITLES.get(metric, f"Related features ({metric})"))
            for entry in entries:
                label = f"  {entry.label}" if entry.label else ""
                options.append(Option(Text(f"  #{entry.feature:<7} {entry.value:7.3f}{label}")))
                targets.append(Target("feature", entry.feature))
        self.targets = targets
        self.set_options(options)

    def on_resize(self) -> None:
        width = self.scrollable_content_region.width
        if self.detail is not None and width and abs(width - self._built_width) > 0:
            self.show(self.detail, keep_position=True)

    # ------------------------------------------------------------------ actions

    @property
    def current_target(self) -> Target | None:
        index = self.highlighted
        if index is None or index >= len(self.targets):
            return None
        return self.targets[index]

    def action_open(self) -> None:
        target = self.current_target
        if target is None:
            return
        if target.kind == "feature":
            self.post_message(self.OpenFeature(target.feature))
        elif target.context is not None:
            self.post_message(self.OpenContext(target.feature, target.context))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_open()

    def action_copy(self) -> None:
        target = self.current_target
        if target is not None and target.context is not None:
            self.app.copy_to_clipboard("".join(target.context.tokens))
            self.notify("Context copied (OSC 52)")

    def action_bookmark(self) -> None:
        if self.detail is not None:
            self.app.action_toggle_bookmark(self.detail.row.feature)  # type: ignore[attr-defined]

    def action_edit_label(self) -> None:
        if self.detail is not None:
            self.app.action_edit_label(self.detail.row.feature)  # type: ignore[attr-defined]

    def action_step(self, delta: int) -> None:
        if self.detail is not None:
            self.post_message(self.OpenFeature(self.detail.row.feature + delta))
