"""One side of the compare screen: a feature's top contexts (or any list of contexts), each
line shaded by the activation and cut to the pane's width."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.widget import Widget

from saetui.tui.model import Context
from saetui.tui.render import context_line, format_value


class SidePreview(Widget):
    """Contexts of one feature of one side; ``border_title`` says which."""

    DEFAULT_CSS = """
    SidePreview { width: 1fr; height: 1fr; border: round $panel; padding: 0 0; }
    SidePreview.-chosen { border: round $accent; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.heading: Text = Text("")
        self.contexts: list[Context] = []
        self.note = ""
        self.feature: int | None = None

    def show_contexts(
        self, title: str, heading: Text, contexts: list[Context], feature: int | None = None
    ) -> None:
        """``contexts`` under one ``heading`` line; ``feature`` is what Enter opens."""
        self.border_title = title
        self.heading, self.contexts, self.note = heading, contexts, ""
        self.feature = feature
        self.refresh()

    def show_message(self, title: str, text: str) -> None:
        self.border_title = title
        self.heading, self.contexts, self.note = Text(""), [], text
        self.feature = None
        self.refresh()

    def lines(self, width: int) -> list[Text]:
        """The lines drawn at ``width`` cells (also what tests read)."""
        if self.note:
            return [Text(self.note, style="dim italic")]
        heading = self.heading.copy()
        heading.truncate(width, overflow="ellipsis")
        rows = [heading] if heading.plain else []
        top = max((c.value for c in self.contexts), default=0.0)
        for context in self.contexts:
            value = f"{format_value(context.value):>5} "
            line = context_line(
                context.tokens, context.values, context.position, width - len(value), max_value=top
            )
            rows.append(Text.assemble((value, "bold"), line))
        if not self.contexts and rows:
            rows.append(Text("no contexts", style="dim italic"))
        return rows

    def render(self) -> RenderableType:
        width = max(10, self.content_size.width)
        height = max(1, self.content_size.height)
        return Text("\n").join(self.lines(width)[:height])
