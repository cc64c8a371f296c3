"""Moving around the app: tabs and their focus, opening a feature (loaded in a thread
worker), back/forward through the history, the search box, the query bar and help."""

from __future__ import annotations

import contextlib

from rich.text import Text
from textual import events, work
from textual.widget import Widget
from textual.widgets import Input, Static, TabbedContent
from textual.worker import get_current_worker

from saetui.errors import SaetuiInputError
from saetui.tui.actions.base import AppPart
from saetui.tui.history import Visit
from saetui.tui.model import FeatureDetail
from saetui.tui.render import format_density, format_value
from saetui.tui.screens.context import ContextScreen
from saetui.tui.screens.help import HelpScreen
from saetui.tui.screens.query import QueryScreen
from saetui.tui.source import IndexNotReady
from saetui.tui.widgets.feature_table import FeatureTable
from saetui.tui.widgets.feature_view import FeatureView
from saetui.tui.widgets.probe_pane import ProbePane
from saetui.tui.widgets.run_pane import RunPane

TAB_ORDER = ("run", "features", "feature", "probe")


class NavigationActions(AppPart):
    """Tabs, features opened, history, search and help."""

    # ------------------------------------------------------------------ tabs

    def focus_tab(self, tab: str) -> None:
        """Focus what a pane's keys act on."""
        widget: Widget
        if tab == "run":
            widget = self.query_one(RunPane)
        elif tab == "features":
            widget = self.query_one(FeatureTable)
        elif tab == "feature":
            widget = self.query_one(FeatureView)
        else:
            # back on the probe with a result: keys act on it (i edits the text), so j/t/l
            # never overwrite the text box
            pane = self.query_one(ProbePane)
            if pane.result is not None:
                widget = pane.query_one("#probe-tokens")
            else:
                widget = self.query_one("#probe-input", Input)
        widget.focus()

    def action_show_tab(self, tab: str) -> None:
        if isinstance(self.screen, ContextScreen):
            self.pop_screen()
        self.query_one(TabbedContent).active = tab
        self.focus_tab(tab)
        self.call_after_refresh(self.focus_tab, tab)  # once the pane is visible

    def action_next_tab(self, delta: int) -> None:
        """Tab / shift+tab: the next / previous pane."""
        if self.screen is not self.screen_stack[0]:
            return
        current = self.query_one(TabbedContent).active
        index = TAB_ORDER.index(current) if current in TAB_ORDER else 0
        self.action_show_tab(TAB_ORDER[(index + delta) % len(TAB_ORDER)])

    def tab_activated(self, event: TabbedContent.TabActivated) -> None:
        focused = self.focused
        if focused is not None and event.pane in focused.ancestors:
            return  # e.g. "/" focused the search box before the tab switch landed
        if event.pane.id:
            self.focus_tab(event.pane.id)

    # ------------------------------------------------------------------ a feature

    def open_feature(
        self, feature: int, remember: bool = True, restore: Visit | None = None
    ) -> None:
        """Show a feature in the feature view (loaded in a worker); ``restore`` puts the
        view back on the row and scroll offset a history entry remembered."""
        if isinstance(self.screen, ContextScreen):
            self.pop_screen()
        if remember:  # a new visit; back and forward remember before they move
            view = self.query_one(FeatureView)
            if view.detail is not None and view.detail.row.feature == self.current_feature:
                self.history.remember(view.highlighted, view.scroll_y)
            self.history.visit(feature)
        self.current_feature = feature
        self.query_one(TabbedContent).active = "feature"
        self.query_one(FeatureView).focus()
        self.query_one("#feature-header", Static).update(
            Text(f" #{feature}  loading…", style="bold")
        )
        self.load_feature(feature, restore=restore)

    @work(thread=True, exclusive=True, exit_on_error=False, group="feature")
    def load_feature(
        self, feature: int, keep_position: bool = False, restore: Visit | None = None
    ) -> None:
        try:
            detail = self.source.feature(feature)
        except IndexNotReady:
            self.call_from_thread(self._feature_error, feature, "the index has no data yet")
            return
        except Exception as error:
            self.call_from_thread(self._feature_error, feature, str(error))
            return
        service = self._probe
        if service is not None and service.ready and not (detail.promoted or detail.suppressed):
            with contextlib.suppress(SaetuiInputError):  # logit effects are optional decoration
                detail.promoted, detail.suppressed = service.logit_effects(feature)
        if not get_current_worker().is_cancelled:
            self.call_from_thread(self._show_feature, detail, keep_position, restore)

    def _feature_error(self, feature: int, text: str) -> None:
        self.current_detail = None
        self.query_one("#feature-header", Static).update(Text(f" #{feature}", style="bold"))
        self.query_one(FeatureView).show_message(text)
        self.notify(text, severity="warning")

    def _show_feature(
        self, detail: FeatureDetail, keep_position: bool, restore: Visit | None = None
    ) -> None:
        if detail.row.feature != self.current_feature:
            return
        self.current_detail = detail
        row = detail.row
        header = Text.assemble(
            (f" #{row.feature} ", "bold reverse"),
            ("★ " if row.bookmarked else " ", "yellow"),
            (row.label or "(no label)", "bold" if row.label else "dim italic"),
            ("   density ", "dim"),
            format_density(row.density) if row.count else "never fired",
            ("  max ", "dim"),
            format_value(row.max),
            ("  mean ", "dim"),
            format_value(row.mean),
            ("  n ", "dim"),
            f"{row.count:,}",
        )
        if row.score is not None:
            header.append("  explanation score ", "dim")
            header.append(f"{row.score:.2f}", "bold")
        if detail.notes:
            header.append(f"\n {detail.notes}", style="italic")
        self.query_one("#feature-header", Static).update(header)
        position = (restore.row, restore.scroll) if restore is not None else None
        self.query_one(FeatureView).show(detail, keep_position=keep_position, restore=position)

    # ------------------------------------------------------------------ history

    async def action_back(self) -> None:
        """b / backspace: close the context view, else the previous feature, else up one
        pane (replaces Textual's "pop the screen")."""
        if isinstance(self.screen, ContextScreen):
            self.pop_screen()
            return
        if self.screen is not self.screen_stack[0]:
            return
        tabs = self.query_one(TabbedContent)
        if tabs.active == "feature":
            view = self.query_one(FeatureView)
            if view.detail is not None:
                self.history.remember(view.highlighted, view.scroll_y)
            previous = self.history.back()
            if previous is not None:
                self.open_feature(previous.feature, remember=False, restore=previous)
            else:
                self.action_show_tab("features")
        elif tabs.active in ("run", "probe") and self.current_feature is not None:
            self.action_show_tab("feature")

    def action_forward(self) -> None:
        view = self.query_one(FeatureView)
        if view.detail is not None:
            self.history.remember(view.highlighted, view.scroll_y)
        following = self.history.forward()
        if following is not None:
            self.open_feature(following.feature, remember=False, restore=following)

    # ------------------------------------------------------------------ search, query, help

    def action_search(self) -> None:
        if isinstance(self.screen, ContextScreen):
            self.pop_screen()
        self.query_one(TabbedContent).active = "features"
        search = self.query_one("#search", Input)
        search.focus()
        # typing replaces the previous search
        search.select_all()

    def action_query(self) -> None:
        """The query bar: matches of an expression over the whole corpus (needs postings)."""
        if isinstance(self.screen, QueryScreen):
            return

        def opened(feature: int | None) -> None:
            if feature is not None:
                self.open_feature(feature)

        self.push_screen(QueryScreen(), opened)

    def action_compare(self) -> None:
        """The compare screen of this index against the second one (C)."""
        from saetui.tui.screens.compare import show_comparison

        if self.compare_path is None:
            self.notify("No second index: saetui open A --compare B compares two indexes.")
            return
        show_comparison(self, self.index_path, self.compare_path)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def on_key(self, event: events.Key) -> None:
        if event.key != "escape" or not isinstance(self.focused, Input):
            return
        if self.focused.id in ("search", "density"):
            self.query_one("#density", Input).display = False
            self.query_one(FeatureTable).focus()
            event.stop()
        elif self.focused.id == "probe-input":  # leave the text box: keys act again
            self.query_one("#probe-tokens").focus()
            event.stop()
