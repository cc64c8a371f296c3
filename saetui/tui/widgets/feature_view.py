"""The feature view: one scrolling list of everything about a feature.

Sections (top contexts, interval samples, histogram, top tokens, logit effects, neighbours)
are headings in one list, so j/k walks through all of them and Enter acts on the row: a
context opens the context view, a neighbour opens that feature.

Drawn with the Line API: :meth:`FeatureView.show` only records what each row is (a cheap
list of painters, made by :mod:`saetui.tui.widgets.feature_rows`); a row becomes segments
when it is first painted, and the strip is cached until the next feature or resize.
Switching features therefore costs the rows on screen, not the ~120 rows of the whole view.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from saetui.tui.bindings import bindings
from saetui.tui.messages import OpenFeature
from saetui.tui.model import Context, FeatureDetail
from saetui.tui.widgets.feature_rows import Row, Target, feature_rows

CACHED_STRIPS = 512


class FeatureView(ScrollView, can_focus=True):
    """Shows a :class:`FeatureDetail`; posts OpenFeature / OpenContext."""

    BINDINGS = bindings("feature")
    COMPONENT_CLASSES: ClassVar[set[str]] = {"feature-view--cursor"}
    DEFAULT_CSS = """
    FeatureView { height: 1fr; }
    FeatureView > .feature-view--cursor { background: $primary 35%; }
    FeatureView:focus > .feature-view--cursor { background: $primary 70%; }
    """

    class OpenContext(Message):
        def __init__(self, feature: int, context: Context) -> None:
            super().__init__()
            self.feature = feature
            self.context = context

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.detail: FeatureDetail | None = None
        self.targets: list[Target | None] = []
        self._painters: list[Row] = []
        self._strips: LRUCache[tuple[int, int], Strip] = LRUCache(CACHED_STRIPS)
        self._highlighted: int | None = None
        self._base_style = Style()
        self._cursor_style = Style()
        self.message_text = "Choose a feature in the table (2) or search with /."
        # (window, window position) -> loss change when the feature is ablated there
        self.ablations: dict[tuple[int, int], float] = {}
        self.ablation_note = ""
        self.ablation_effects: dict[tuple[int, int], Any] = {}

    # ------------------------------------------------------------------ content

    @property
    def option_count(self) -> int:
        return len(self._painters)

    @property
    def highlighted(self) -> int | None:
        """The row under the cursor (None when no row can be acted on)."""
        return self._highlighted

    @highlighted.setter
    def highlighted(self, index: int | None) -> None:
        if index is not None and not 0 <= index < len(self._painters):
            index = None
        self._highlighted = index
        self._scroll_to_cursor()
        self.refresh()

    def _set_rows(self, painters: list[Row], targets: list[Target | None]) -> None:
        self._painters = painters
        self.targets = targets
        self._strips.clear()
        self.virtual_size = Size(self.scrollable_content_region.width, len(painters))

    def show_message(self, text: str) -> None:
        self.detail = None
        self.message_text = text
        self._set_rows([Text(text, style="italic")], [None])
        self._highlighted = None
        self.scroll_to(y=0, animate=False)
        self.refresh()

    def show(
        self,
        detail: FeatureDetail,
        keep_position: bool = False,
        restore: tuple[int | None, float] | None = None,
    ) -> None:
        """Display ``detail``; with ``keep_position`` (a live refresh of the same feature)
        the highlighted row and scroll offset stay put; ``restore`` (row, scroll) puts them
        back where a history entry left them."""
        highlighted, scroll_y = self.highlighted, self.scroll_y
        if restore is not None:
            highlighted, scroll_y = restore
            keep_position = True
            self.detail = None  # not "the same feature": restore even across features
        same = restore is not None or (
            keep_position
            and self.detail is not None
            and self.detail.row.feature == detail.row.feature
        )
        new_feature = self.detail is None or self.detail.row.feature != detail.row.feature
        if new_feature and not (restore is None and keep_position and self.detail is None):
            self.ablations, self.ablation_note = {}, ""
            self.ablation_effects = {}
        self.detail = detail
        self._build(detail)
        if same:
            if highlighted is not None and highlighted < self.option_count:
                self._highlighted = highlighted
            self.scroll_to(y=scroll_y, animate=False)
        else:
            self._highlighted = self._first_enabled()
            self.scroll_to(y=0, animate=False)
        self.refresh()

    def _first_enabled(self) -> int | None:
        for index, target in enumerate(self.targets):
            if target is not None:
                return index
        return None

    def _build(self, detail: FeatureDetail) -> None:
        self._set_rows(
            *feature_rows(detail, self.ablations, self.ablation_note, self.ablation_effects)
        )

    # ------------------------------------------------------------------ drawing

    def line_text(self, index: int) -> str:
        """The plain text of row ``index`` as drawn at the current width (for tests)."""
        width = max(20, self.scrollable_content_region.width or 80)
        return "".join(segment.text for segment in self._strip(index, width)._segments)

    def _strip(self, index: int, width: int) -> Strip:
        key = (index, width)
        strip = self._strips.get(key)
        if strip is None:
            row = self._painters[index]
            segments = list(row.render(self.app.console)) if isinstance(row, Text) else row(width)
            strip = Strip(Segment.adjust_line_length(segments, width), width)
            self._strips.set(key, strip)
        return strip

    def render_lines(self, crop: Region) -> list[Strip]:
        # the widget's style, looked up once per paint instead of once per line
        self._base_style = self.rich_style
        self._cursor_style = self.get_component_rich_style("feature-view--cursor")
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        index = int(self.scroll_offset.y) + y
        base = self._base_style
        if index >= len(self._painters) or width <= 0:
            return Strip.blank(width, base)
        strip = self._strip(index, width)
        if index == self._highlighted:
            strip = strip.apply_style(self._cursor_style)
        return strip.apply_style(base)

    def on_resize(self, event: events.Resize) -> None:
        self._strips.clear()
        self.virtual_size = Size(self.scrollable_content_region.width, len(self._painters))
        self._scroll_to_cursor()

    # ------------------------------------------------------------------ cursor

    def _scroll_to_cursor(self) -> None:
        index = self._highlighted
        if index is None:
            return
        height = max(1, self.scrollable_content_region.height)
        top = int(self.scroll_offset.y)
        if index < top:
            self.scroll_to(y=index, animate=False)
        elif index >= top + height:
            self.scroll_to(y=index - height + 1, animate=False)

    def _move(self, start: int, step: int) -> None:
        """Highlight the first row acted on from ``start`` in direction ``step``; at an
        end, scroll so the last headings and notes show too."""
        index = start
        while 0 <= index < len(self.targets):
            if self.targets[index] is not None:
                self.highlighted = index
                return
            index += step
        self.scroll_to(y=0 if step < 0 else self.max_scroll_y, animate=False)

    def action_cursor_down(self) -> None:
        self._move((self._highlighted if self._highlighted is not None else -1) + 1, 1)

    def action_cursor_up(self) -> None:
        current = self._highlighted if self._highlighted is not None else len(self.targets)
        self._move(current - 1, -1)

    def action_first(self) -> None:
        self._move(0, 1)
        self.scroll_to(y=0, animate=False)

    def action_last(self) -> None:
        self._move(len(self.targets) - 1, -1)
        self.scroll_to(y=self.max_scroll_y, animate=False)

    def action_page_down(self) -> None:
        page = max(1, self.scrollable_content_region.height - 1)
        current = self._highlighted if self._highlighted is not None else 0
        target = min(len(self.targets) - 1, current + page)
        if any(self.targets[target:]):
            self._move(target, 1)
        else:
            self.action_last()

    def action_page_up(self) -> None:
        page = max(1, self.scrollable_content_region.height - 1)
        current = self._highlighted if self._highlighted is not None else 0
        target = max(0, current - page)
        if any(self.targets[: target + 1]):
            self._move(target, -1)
        else:
            self.action_first()

    async def _on_click(self, event: events.Click) -> None:
        index = int(self.scroll_offset.y) + event.y
        if 0 <= index < len(self.targets) and self.targets[index] is not None:
            self.highlighted = index
            if event.chain >= 2:
                self.action_open()

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
            self.post_message(OpenFeature(target.feature))
        elif target.context is not None:
            self.post_message(self.OpenContext(target.feature, target.context))

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

    class Step(Message):
        """Open the feature ``delta`` rows away in the table's current order."""

        def __init__(self, feature: int, delta: int) -> None:
            super().__init__()
            self.feature = feature
            self.delta = delta

    class ProbeFeature(Message):
        """Shade the probe's text by this feature."""

        def __init__(self, feature: int) -> None:
            super().__init__()
            self.feature = feature

    def show_ablations(
        self,
        feature: int,
        ablations: dict[tuple[int, int], float],
        note: str,
        effects: dict[tuple[int, int], Any] | None = None,
    ) -> None:
        """Loss changes of ablating ``feature`` on its contexts (shown while it is open), and
        per context the logits it moved at the firing token."""
        if self.detail is None or self.detail.row.feature != feature:
            return
        self.ablations, self.ablation_note = dict(ablations), note
        self.ablation_effects = dict(effects or {})
        self.show(self.detail, keep_position=True)

    class Ablate(Message):
        def __init__(self, feature: int) -> None:
            super().__init__()
            self.feature = feature

    def action_ablate(self) -> None:
        if self.detail is not None:
            self.post_message(self.Ablate(self.detail.row.feature))

    def action_step(self, delta: int) -> None:
        if self.detail is not None:
            self.post_message(self.Step(self.detail.row.feature, delta))

    def action_probe(self) -> None:
        if self.detail is not None:
            self.post_message(self.ProbeFeature(self.detail.row.feature))

    def action_copy_reference(self) -> None:
        if self.detail is not None:
            self.app.action_copy_reference(self.detail.row.feature)  # type: ignore[attr-defined]
