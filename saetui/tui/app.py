"""The saetui Textual app: run & metrics, feature table, feature view, context view, probe.

The app only arranges and displays. This module composes the panes and owns the app's
life (mount, terminal loss, exit); what each pane does lives in a part of its own
(:mod:`saetui.tui.actions`), mixed into :class:`SaetuiApp`. Data comes from
:class:`saetui.tui.source.IndexSource` (the index reader); the collection runs in a child
process driven by :class:`saetui.collect.controller.CollectionController`; model work
(probe, logit effects, ablation) runs in thread workers: nothing slow ever runs on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from textual import on
from textual.app import App, ComposeResult
from textual.binding import BindingType
from textual.widgets import Footer, Input, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from saetui.collect.controller import STOP_GRACE_SECONDS, CollectionController
from saetui.collect.job import CollectConfig
from saetui.errors import SaetuiInputError
from saetui.tui.actions.exports import ExportActions
from saetui.tui.actions.feature import FeatureActions
from saetui.tui.actions.navigation import NavigationActions
from saetui.tui.actions.run import POLL_SECONDS, CollectionEvent, RunActions
from saetui.tui.actions.table import TableActions
from saetui.tui.bindings import bindings, entry, load_keymap
from saetui.tui.commands import SaetuiCommands
from saetui.tui.history import History
from saetui.tui.model import FeatureDetail, RunPlots, RunState
from saetui.tui.source import IndexSource
from saetui.tui.widgets.feature_table import FeatureTable
from saetui.tui.widgets.feature_view import FeatureView
from saetui.tui.widgets.probe_pane import ProbePane
from saetui.tui.widgets.run_pane import RunPane

__all__ = ["CollectionEvent", "SaetuiApp", "check_openable", "run_app"]


class SaetuiApp(
    RunActions, NavigationActions, TableActions, FeatureActions, ExportActions, App[int]
):
    """Browse an index (optionally while a collection fills it)."""

    TITLE = "saetui"
    CSS_PATH = "styles.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [*bindings("app"), entry("compare.show").binding()]
    COMMANDS = App.COMMANDS | {SaetuiCommands}

    def __init__(
        self,
        index_path: str | Path,
        collect: CollectConfig | None = None,
        model_loader: Callable[[], Any] | None = None,
        *,
        watch_terminal: bool = True,
        keys_path: Path | None = None,
        feature: int | None = None,
        compare: Path | None = None,
    ) -> None:
        super().__init__()
        self.initial_feature = feature
        self.compare_path = compare  # a second index of the same windows (screens/compare.py)
        self.index_path = Path(index_path)
        self.source = IndexSource(self.index_path)
        self.collection = CollectionController(collect, self._post_collection_message)
        self.model_loader = model_loader
        self.watch_terminal = watch_terminal
        self.history = History()
        self.run_state: RunState | None = None
        self.label_cache: dict[int, str] = {}
        self.current_feature: int | None = None
        self.current_detail: FeatureDetail | None = None
        self._generation: int | None = None
        self._last_plot = 0.0
        self._plot_generation: int | None = None
        self._plots: RunPlots | None = None
        self._probe_lock = threading.Lock()
        self._probe = None
        self.user_keymap: dict[str, str] = {}
        self._keymap_error: str | None = None
        try:
            self.user_keymap = load_keymap(keys_path)
        except SaetuiInputError as error:  # a bad config file is a message, not a crash
            self._keymap_error = str(error)

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static("saetui", id="status-line")
        initial = "run" if self.collect is not None else "features"
        with TabbedContent(initial=initial, id="tabs"):
            with TabPane("1 Run", id="run"):
                yield RunPane(id="run-pane")
            with TabPane("2 Features", id="features"):
                yield Input(placeholder="/ search: feature id, label text or token", id="search")
                yield Input(
                    placeholder="density range MIN..MAX, e.g. 1e-4..0.01 or 0.1%..5% "
                    "(empty clears, esc cancels)",
                    id="density",
                )
                yield Static("", id="table-header")
                yield FeatureTable(self.source.page, id="table")
                yield Static("", id="table-status")
            with TabPane("3 Feature", id="feature"):
                yield Static("no feature open", id="feature-header")
                yield FeatureView(id="feature-view")
            with TabPane("4 Probe", id="probe"):
                yield ProbePane(id="probe-pane")
        yield Footer()

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.tab_activated(event)

    @on(Input.Submitted, "#search")
    def _search(self, event: Input.Submitted) -> None:
        self.search_submitted(event)

    @on(Input.Submitted, "#density")
    def _density(self, event: Input.Submitted) -> None:
        self.density_submitted(event)

    def on_mount(self) -> None:
        if self.user_keymap:
            self.set_keymap(self.user_keymap)
        if self._keymap_error:
            self.notify(self._keymap_error, severity="error", timeout=15)
        self.query_one("#density", Input).display = False
        self.query_one(FeatureView).show_message(
            "Choose a feature in the table (2), search with /, or use ctrl+p → feature N."
        )
        self.update_table_header()
        self.set_interval(POLL_SECONDS, self.poll)
        self.poll()
        if self.collect is not None:
            self.start_collection()
        if self.watch_terminal and not self.is_headless:
            self.set_interval(1.0, self._check_terminal)
            with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._terminal_gone)
        self.call_after_refresh(self._focus_initial)
        if self.initial_feature is not None:
            self.call_after_refresh(self.open_feature, self.initial_feature)
        if self.compare_path is not None:
            self.call_after_refresh(self.action_compare)

    def _focus_initial(self) -> None:
        if self.focused is None or self.focused is self.query_one(TabbedContent).query_one("Tabs"):
            self.focus_tab(self.query_one(TabbedContent).active)

    # ------------------------------------------------------------------ terminal

    def _check_terminal(self) -> None:
        try:
            alive = os.isatty(sys.__stdin__.fileno()) if sys.__stdin__ else False
        except (ValueError, OSError):
            alive = False
        if not alive:
            self._terminal_gone()

    def _terminal_gone(self) -> None:
        """ssh dropped: stop the collector at a safe point (resumable; killed after the
        grace time), close the probe and the index, and end the process. Nothing can be
        drawn or restored any more, and Textual's own shutdown writes to the dead terminal:
        its output queue can block that write for good."""
        code = self.exit_code()
        self.shutdown()
        os._exit(code)

    def exit(self, result: int | None = None, return_code: int = 0, message: Any = None) -> None:
        """Quit; the probe's model process goes first, so no worker waiting on a model load
        holds the exit (the collector is stopped in :meth:`shutdown`, after the screen is
        restored)."""
        if self._probe is not None:
            self._probe.close()
        super().exit(result, return_code, message)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.notify(f"{event.worker.name}: {event.worker.error}", severity="error")

    def shutdown(self) -> None:
        """Stop the collector (killed after the grace time) and join its reader thread,
        then close the index."""
        self.collection.close(STOP_GRACE_SECONDS)
        if self._probe is not None:
            self._probe.close()
        self.source.close()


def run_app(
    index_path: str | Path,
    collect: CollectConfig | None = None,
    model_loader: Callable[[], Any] | None = None,
    feature: int | None = None,
    compare: Path | None = None,
) -> int:
    """Run the TUI on ``index_path``; with ``collect`` the collection runs in a child
    process meanwhile; ``model_loader`` returns the probe's model, SAE and hook (default:
    from the run config stored in the index); ``compare`` opens the compare screen against
    that second index. Returns the exit code after printing one line on what the index
    holds and how to go on; every thread is joined first."""
    index_path = Path(index_path)
    if collect is None:
        check_openable(index_path, feature)
    if compare is not None:
        check_openable(compare, None)
    app = SaetuiApp(
        index_path, collect=collect, model_loader=model_loader, feature=feature, compare=compare
    )
    try:
        app.run()
    finally:
        app.shutdown()
    if app.input_error is not None:
        raise SaetuiInputError(app.input_error)
    code = app.return_code or 0
    if collect is not None:
        _print_summary(app, index_path, code)
    return code


def check_openable(index_path: Path, feature: int | None) -> None:
    """A missing or non-index path, or a feature out of range: one sentence, exit 2."""
    from saetui.index import open_index

    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
    if feature is not None and not 0 <= feature < d_sae:
        raise SaetuiInputError(
            f"--feature {feature} is out of range: {index_path} has features 0-{d_sae - 1}."
        )


def _print_summary(app: SaetuiApp, index_path: Path, code: int) -> None:
    with contextlib.suppress(OSError):  # the terminal is gone
        print(app.collection.final_line(index_path, code), file=sys.stderr, flush=True)
