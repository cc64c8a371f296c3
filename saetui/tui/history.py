"""Browser-like back/forward history of visited features (plain Python, no Textual)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class History:
    """Visited feature ids; visiting a new one after going back drops the forward tail."""

    limit: int = 500
    _items: list[int] = field(default_factory=list)
    _index: int = -1

    @property
    def current(self) -> int | None:
        return self._items[self._index] if self._index >= 0 else None

    def visit(self, feature: int) -> None:
        if self.current == feature:
            return
        del self._items[self._index + 1 :]
        self._items.append(feature)
        if len(self._items) > self.limit:
            del self._items[0]
        self._index = len(self._items) - 1

    def back(self) -> int | None:
        """Move back; None (and no move) at the start."""
        if self._index <= 0:
            return None
        self._index -= 1
        return self._items[self._index]

    def forward(self) -> int | None:
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
