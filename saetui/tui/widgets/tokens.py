"""A wrapped run of tokens shaded by activation, with a token cursor (context view, probe)."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from saetui.tui.render import shaded_tokens

MAX_TOKENS = 4096


class TokenStrip(Widget, can_focus=True):
    """Tokens shaded by ``values``; ``cursor`` moves with :meth:`move`."""

    DEFAULT_CSS = """
    TokenStrip { height: auto; max-height: 12; padding: 0 1; overflow-y: auto; }
    TokenStrip:focus { background: $boost; }
    """

    cursor: reactive[int] = reactive(0)

    class CursorMoved(Message):
        def __init__(self, strip: TokenStrip, position: int) -> None:
            super().__init__()
            self.strip = strip
            self.position = position

        @property
        def control(self) -> TokenStrip:
            return self.strip

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.tokens: list[str] = []
        self.values: list[float] = []
        self.mark: int | None = None

    def set_tokens(
        self, tokens: list[str], values: list[float], mark: int | None = None, cursor: int = 0
    ) -> None:
        self.tokens = tokens[:MAX_TOKENS]
        self.values = values[:MAX_TOKENS]
        self.mark = mark
        self.set_reactive(TokenStrip.cursor, max(0, min(cursor, len(self.tokens) - 1)))
        self.refresh(layout=True)
        self.post_message(self.CursorMoved(self, self.cursor))

    def set_values(self, values: list[float]) -> None:
        self.values = values[:MAX_TOKENS]
        self.refresh()

    def render(self) -> Text:
        if not self.tokens:
            return Text("no tokens", style="dim italic")
        text = shaded_tokens(self.tokens, self.values, mark=self.mark, cursor=self.cursor)
        text.no_wrap = False
        text.overflow = "fold"
        return text

    def move(self, delta: int) -> None:
        if self.tokens:
            self.cursor = max(0, min(len(self.tokens) - 1, self.cursor + delta))

    def watch_cursor(self, position: int) -> None:
        self.post_message(self.CursorMoved(self, position))
