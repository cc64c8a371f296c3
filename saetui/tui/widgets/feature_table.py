"""The feature table: a virtual list (Line API) over every feature, fed in pages.

Only the pages on screen (plus one ahead) are ever fetched, in thread workers; rows not
loaded yet draw as placeholders, so scrolling 131072 rows never waits on the index. A live
refresh keeps the old pages on screen until their replacements arrive: no flicker, and the
cursor and scroll position stay where they are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from saetui.tui.bindings import bindings
from saetui.tui.messages import OpenFeature
from saetui.tui.model import FILTERS, SORT_COLUMNS, FeatureRow, TablePage, TableQuery
from saetui.tui.render import format_density, format_value, show_token

PAGE_SIZE = 128
MAX_PAGES = 64  # LRU of pages kept


def column_widths(width: int) -> list[int]:
    """id, label, density, mean, max, top tokens: fixed numbers, label and tokens share the
    rest."""
    fixed = 7 + 8 + 7 + 7
    rest = max(10, width - fixed - 5)
    label = max(8, min(40, int(rest * 0.45)))
    return [7, label, 8, 7, 7, max(4, rest - label)]


HEADERS = ("id", "label", "density", "mean", "max", "top tokens")
SORT_OF_HEADER = {"id": "id", "label": "label", "density": "density", "mean": "mean", "max": "max"}
HEADER_OF_SORT = {"score": "label"}  # scores are shown in the label column


def _cell(text: str, width: int, right: bool = False) -> str:
    if len(text) > width:
        return text[: max(0, width - 1)] + "…"
    return text.rjust(width) if right else text.ljust(width)


def format_row(row: FeatureRow | None, index: int, width: int) -> str:
    widths = column_widths(width)
    if row is None:
        cells = [_cell("", widths[0]), _cell("…", widths[1])] + [_cell("", w) for w in widths[2:]]
    else:
        label = ("★ " if row.bookmarked else "") + (row.label or "")
        if row.score is not None:  # an imported explanation score leads the label
            label = f"[{row.score:.2f}] {label}"
        cells = [
            _cell(str(row.feature), widths[0], right=True),
            _cell(label, widths[1]),
            _cell(format_density(row.density) if row.count else "dead", widths[2], right=True),
            _cell(format_value(row.mean), widths[3], right=True),
            _cell(format_value(row.max), widths[4], right=True),
            _cell(show_token(row.top_tokens), widths[5]),
        ]
    return " ".join(cells)[:width].ljust(width)


def format_header(width: int, query: TableQuery) -> str:
    widths = column_widths(width)
    cells = []
    by_relevance = bool(query.search) and query.sort == "id" and not query.descending
    for header, w, right in zip(HEADERS, widths, (1, 0, 1, 1, 1, 0), strict=True):
        name = header
        if by_relevance and header == HEADERS[0]:
            name = "best↓"  # search results in relevance order, not by id
        elif SORT_OF_HEADER.get(header) == query.sort:
            name += "↓" if query.descending else "↑"
        elif HEADER_OF_SORT.get(query.sort) == header:
            name = f"[{query.sort}]{'↓' if query.descending else '↑'} {header}"
        cells.append(_cell(name, w, right=bool(right)))
    return " ".join(cells)[:width].ljust(width)


class FeatureTable(ScrollView, can_focus=True):
    """Every feature of the index; Enter posts :class:`saetui.tui.messages.OpenFeature`."""

    BINDINGS = bindings("table")
    COMPONENT_CLASSES: ClassVar[set[str]] = {"feature-table--cursor", "feature-table--placeholder"}
    DEFAULT_CSS = """
    FeatureTable { height: 1fr; }
    FeatureTable > .feature-table--cursor { background: $primary 35%; text-style: bold; }
    FeatureTable:focus > .feature-table--cursor { background: $primary 70%; color: $text; }
    FeatureTable > .feature-table--placeholder { color: $text-muted; }
    """

    cursor: reactive[int] = reactive(0, always_update=True, repaint=False)

    class Highlighted(Message):
        def __init__(self, row: FeatureRow | None, index: int, total: int) -> None:
            super().__init__()
            self.row = row
            self.index = index
            self.total = total

    class _PageLoaded(Message):
        def __init__(self, token: tuple[TableQuery, int], page_no: int, page: TablePage):
            super().__init__()
            self.token = token
            self.page_no = page_no
            self.page = page

    class _PageFailed(Message):
        def __init__(self, token: tuple[TableQuery, int], page_no: int, error: str):
            super().__init__()
            self.token = token
            self.page_no = page_no
            self.error = error

    def __init__(
        self,
        fetch: Callable[[TableQuery, int, int], TablePage] | None = None,
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.fetch = fetch
        self.query_state = TableQuery()
        self.total: int | None = None
        self.error: str | None = None
        self._generation = 0  # bumps on query change or data refresh
        self._pages: OrderedDict[int, TablePage] = OrderedDict()
        self._fresh: set[int] = set()  # pages loaded for the current generation
        self._pending: set[int] = set()

    # ------------------------------------------------------------------ data

    @property
    def _token(self) -> tuple[TableQuery, int]:
        return (self.query_state, self._generation)

    def set_query(self, query: TableQuery) -> None:
        """Show features matching ``query``; the cursor goes to the first row."""
        if query == self.query_state and self.total is not None:
            return
        self.query_state = query
        self._generation += 1
        self._pages.clear()
        self._fresh.clear()
        self._pending.clear()
        self.total = None
        self.error = None
        self.cursor = 0
        self.scroll_to(y=0, animate=False)
        self._ensure_pages()
        self.refresh()

    def reload(self) -> None:
        """New data committed: fetch visible pages again, keep showing the old ones (and the
        cursor and scroll offset) until they arrive."""
        self._generation += 1
        self._fresh.clear()
        self._pending.clear()
        self._ensure_pages()

    def row_at(self, index: int) -> FeatureRow | None:
        page = self._pages.get(index // PAGE_SIZE)
        if page is None:
            return None
        offset = index - page.offset
        return page.rows[offset] if 0 <= offset < len(page.rows) else None

    @property
    def current_row(self) -> FeatureRow | None:
        return self.row_at(self.cursor)

    def _visible_pages(self) -> list[int]:
        top = int(self.scroll_offset.y)
        height = max(1, self.scrollable_content_region.height)
        first = top // PAGE_SIZE
        last = (top + height + PAGE_SIZE // 2) // PAGE_SIZE
        pages = list(range(first, last + 1))
        if self.cursor // PAGE_SIZE not in pages:
            pages.append(self.cursor // PAGE_SIZE)
        if self.total is not None:
            pages = [p for p in pages if p * PAGE_SIZE < max(self.total, 1)]
        return pages

    def _ensure_pages(self) -> None:
        if self.fetch is None or not self.is_mounted:
            return
        for page_no in self._visible_pages():
            if page_no in self._fresh or page_no in self._pending:
                continue
            self._pending.add(page_no)
            self._request(page_no)

    def _request(self, page_no: int) -> None:
        token = self._token
        fetch = self.fetch
        assert fetch is not None

        def load() -> None:
            try:
                page = fetch(token[0], page_no * PAGE_SIZE, PAGE_SIZE)
            except Exception as error:  # shown in the table, never a crash
                self.post_message(self._PageFailed(token, page_no, str(error)))
                return
            self.post_message(self._PageLoaded(token, page_no, page))

        self.run_worker(load, thread=True, group="table-pages", exit_on_error=False)

    def on_feature_table__page_loaded(self, message: _PageLoaded) -> None:
        message.stop()
        if message.token != self._token:
            return
        self._pending.discard(message.page_no)
        self._pages[message.page_no] = message.page
        self._pages.move_to_end(message.page_no)
        self._fresh.add(message.page_no)
        while len(self._pages) > MAX_PAGES:
            old, _ = self._pages.popitem(last=False)
            self._fresh.discard(old)
        self.error = None
        if self.total != message.page.total:
            self.total = message.page.total
            self.cursor = min(self.cursor, max(0, self.total - 1))
            self._update_virtual_size()
        self.refresh()
        self._post_highlight()
        self._ensure_pages()

    def on_feature_table__page_failed(self, message: _PageFailed) -> None:
        message.stop()
        if message.token != self._token:
            return
        self._pending.discard(message.page_no)
        self.error = message.error
        self.refresh()

    # ------------------------------------------------------------------ layout

    def _update_virtual_size(self) -> None:
        self.virtual_size = Size(self.scrollable_content_region.width, self.total or 0)

    def on_resize(self, event: events.Resize) -> None:
        self._update_virtual_size()
        self._ensure_pages()

    def on_mount(self) -> None:
        super().on_mount()
        self._ensure_pages()

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if round(old_value) != round(new_value):
            self._ensure_pages()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        index = int(self.scroll_offset.y) + y
        base = self.rich_style
        if self.total is None or index >= self.total:
            if y == 0 and self.total == 0:
                return Strip([Segment("no features match".ljust(width), base)], width)
            if y == 0 and self.error:
                return Strip([Segment(self.error[:width].ljust(width), base)], width)
            if y == 0 and self.total is None:
                return Strip([Segment("loading…".ljust(width), base)], width)
            return Strip.blank(width, base)
        row = self.row_at(index)
        text = format_row(row, index, width)
        if index == self.cursor:
            style = self.get_component_rich_style("feature-table--cursor")
        elif row is None:
            style = self.get_component_rich_style("feature-table--placeholder")
        else:
            style = base + Style() if base else Style()
        return Strip([Segment(text, style)], width)

    # ------------------------------------------------------------------ cursor

    def watch_cursor(self, old: int, new: int) -> None:
        self.refresh()
        self._scroll_to_cursor()
        self._ensure_pages()
        self._post_highlight()

    def _post_highlight(self) -> None:
        self.post_message(self.Highlighted(self.current_row, self.cursor, self.total or 0))

    def _scroll_to_cursor(self) -> None:
        height = max(1, self.scrollable_content_region.height)
        top = int(self.scroll_offset.y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False)

    def move_cursor(self, index: int) -> None:
        last = max(0, (self.total or 0) - 1)
        self.cursor = max(0, min(last, index))

    def action_cursor_down(self) -> None:
        self.move_cursor(self.cursor + 1)

    def action_cursor_up(self) -> None:
        self.move_cursor(self.cursor - 1)

    def action_cursor_top(self) -> None:
        self.move_cursor(0)

    def action_cursor_bottom(self) -> None:
        self.move_cursor((self.total or 1) - 1)

    def action_page_down(self) -> None:
        self.move_cursor(self.cursor + max(1, self.scrollable_content_region.height - 1))

    def action_page_up(self) -> None:
        self.move_cursor(self.cursor - max(1, self.scrollable_content_region.height - 1))

    def action_open(self) -> None:
        row = self.current_row
        if row is not None:
            self.post_message(OpenFeature(row.feature))

    async def _on_click(self, event: events.Click) -> None:
        self.move_cursor(int(self.scroll_offset.y) + event.y)
        if event.chain >= 2:
            self.action_open()

    # ------------------------------------------------------------------ sort, filter

    class QueryChanged(Message):
        def __init__(self, query: TableQuery) -> None:
            super().__init__()
            self.query = query

    def apply_query(self, query: TableQuery) -> None:
        self.set_query(query)
        self.post_message(self.QueryChanged(query))

    def action_next_sort(self) -> None:
        order = list(SORT_COLUMNS)
        current = order.index(self.query_state.sort) if self.query_state.sort in order else 0
        sort = order[(current + 1) % len(order)]
        # numbers read best largest-first, id and label in natural order
        self.apply_query(
            replace(self.query_state, sort=sort, descending=sort not in ("id", "label"))
        )

    def action_reverse_sort(self) -> None:
        self.apply_query(replace(self.query_state, descending=not self.query_state.descending))

    def action_next_filter(self) -> None:
        current = (
            FILTERS.index(self.query_state.filter) if self.query_state.filter in FILTERS else 0
        )
        self.apply_query(replace(self.query_state, filter=FILTERS[(current + 1) % len(FILTERS)]))

    def action_bookmark(self) -> None:
        row = self.current_row
        if row is not None:
            self.app.action_toggle_bookmark(row.feature)  # type: ignore[attr-defined]

    def action_edit_label(self) -> None:
        row = self.current_row
        if row is not None:
            self.app.action_edit_label(row.feature)  # type: ignore[attr-defined]
