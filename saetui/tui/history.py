"""Browser-like back/forward history of visited features (plain Python, no Textual).

Each entry remembers where the user was in the feature view (highlighted row and scroll
offset), so going back returns to the same row, not to the top."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Visit:
    feature: int
    row: int | None = None  # the highlighted row when the user left the feature
    scroll: float = 0.0


@dataclass
class History:
    """Visited features; visiting a new one after going back drops the forward tail."""

    limit: int = 500
    _items: list[Visit] = field(default_factory=list)
    _index: int = -1

    @property
    def current(self) -> Visit | None:
        return self._items[self._index] if self._index >= 0 else None

    def visit(self, feature: int) -> None:
        if self.current is not None and self.current.feature == feature:
            return
        del self._items[self._index + 1 :]
        self._items.append(Visit(feature))
        if len(self._items) > self.limit:
            del self._items[0]
        self._index = len(self._items) - 1

    def remember(self, row: int | None, scroll: float) -> None:
        """Record the position in the current feature's view (before leaving it)."""
        if self.current is not None:
            self.current.row, self.current.scroll = row, scroll

    def back(self) -> Visit | None:
        """Move back; None (and no move) at the start."""
        if self._index <= 0:
            return None
        self._index -= 1
        return self._items[self._index]

    def forward(self) -> Visit | None:
        if self._index >= len(self._items) - 1:
            return None
        self._index += 1
        return self._items[self._index]

    @property
    def can_back(self) -> bool:
        return self._index > 0

    @property
    def can_forward(self) -> bool:
        return self._index < len(self._items) - 1
