"""The feature table's side of the app: the search and density boxes, the header and status
lines, the palette's sort/filter commands, and labels and bookmarks (saved in workers)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.text import Text
from textual import work
from textual.css.query import NoMatches
from textual.widgets import Input, Static

from saetui.errors import SaetuiInputError
from saetui.tui.actions.base import AppPart
from saetui.tui.model import parse_density_range
from saetui.tui.screens.label import LabelScreen
from saetui.tui.widgets.feature_table import FeatureTable, format_header


class TableActions(AppPart):
    """Search, density range, the table's header and status, labels and bookmarks."""

    # ------------------------------------------------------------------ search and filters

    def search_submitted(self, event: Input.Submitted) -> None:
        text = event.value  # not stripped: '" the"' in quotes searches the raw token
        table = self.query_one(FeatureTable)
        number = text.strip().lstrip("#")
        if number.isdigit():
            if table.query_state.search:  # the table no longer shows an old search
                table.apply_query(replace(table.query_state, search=""))
            event.input.value = ""
            self.open_feature(int(number))
            return
        table.apply_query(replace(table.query_state, search=text if text.strip() else ""))
        table.focus()

    def action_density_filter(self) -> None:
        """Show the density-range box under the search box, filled with the current range."""
        table = self.query_one(FeatureTable)
        query = table.query_state
        box = self.query_one("#density", Input)
        low = "" if query.density_min is None else f"{query.density_min:g}"
        high = "" if query.density_max is None else f"{query.density_max:g}"
        box.value = f"{low}..{high}" if low or high else ""
        box.display = True
        box.focus()
        box.select_all()

    def density_submitted(self, event: Input.Submitted) -> None:
        try:
            low, high = parse_density_range(event.value)
        except SaetuiInputError as error:
            self.notify(str(error), severity="warning")
            return
        event.input.display = False
        table = self.query_one(FeatureTable)
        table.apply_query(replace(table.query_state, density_min=low, density_max=high))
        table.focus()

    def set_table_query(self, **changes: Any) -> None:
        """Sort, filter or search the table (the palette's commands), and show it."""
        table = self.query_one(FeatureTable)
        table.apply_query(replace(table.query_state, **changes))
        self.action_show_tab("features")

    # ------------------------------------------------------------------ header and status

    def on_feature_table_query_changed(self, message: FeatureTable.QueryChanged) -> None:
        self.update_table_header()

    def on_feature_table_highlighted(self, message: FeatureTable.Highlighted) -> None:
        try:
            table = self.query_one(FeatureTable)
        except NoMatches:  # a page that arrived while the app closed
            return
        # the rows' width is known only once a page is laid out (a scrollbar may appear)
        self.call_after_refresh(self.update_table_header)
        status = Text.assemble(
            (f" {message.index + 1 if message.total else 0:,}/{message.total:,}", "bold"),
            ("  " + table.query_state.describe(), "dim"),
            ("   s sort · S reverse · x filter · m bookmark · e label", "dim"),
        )
        self.query_one("#table-status", Static).update(status)

    def update_table_header(self) -> None:
        try:
            table = self.query_one(FeatureTable)
        except NoMatches:  # called after a refresh that came after the app closed
            return
        width = max(20, table.scrollable_content_region.width or self.size.width)
        self.query_one("#table-header", Static).update(
            Text(format_header(width, table.query_state), style="bold")
        )

    def on_resize(self) -> None:
        self.call_after_refresh(self.update_table_header)

    # ------------------------------------------------------------------ labels, bookmarks

    def action_toggle_bookmark(self, feature: int) -> None:
        self._toggle_bookmark(feature)

    @work(thread=True, exit_on_error=False, group="user")
    def _toggle_bookmark(self, feature: int) -> None:
        try:
            marked = not self.source.is_bookmarked(feature)
            self.source.set_bookmark(feature, marked)
        except Exception as error:
            self.call_from_thread(self.notify, f"Bookmark failed: {error}", severity="error")
            return
        self.call_from_thread(
            self.notify, f"#{feature} {'bookmarked' if marked else 'bookmark removed'}"
        )
        self.call_from_thread(self._user_data_changed)

    def action_edit_label(self, feature: int) -> None:
        detail = self.current_detail
        label = notes = ""
        if detail is not None and detail.row.feature == feature:
            label, notes = detail.row.label, detail.notes
        else:
            label = self.label_cache.get(feature, "")

        def saved(result: tuple[str, str] | None) -> None:
            if result is not None:
                self._save_label(feature, *result)

        self.push_screen(LabelScreen(feature, label, notes), saved)

    @work(thread=True, exit_on_error=False, group="user")
    def _save_label(self, feature: int, label: str, notes: str) -> None:
        try:
            self.source.set_label(feature, label, notes)
        except Exception as error:
            self.call_from_thread(
                self.notify, f"Saving the label failed: {error}", severity="error"
            )
            return
        self.call_from_thread(self.notify, f"Label of #{feature} saved")
        self.call_from_thread(self._user_data_changed)

    def _user_data_changed(self) -> None:
        self.query_one(FeatureTable).reload()
        if self.current_feature is not None:
            self.load_feature(self.current_feature, keep_position=True)
        self.poll()
