"""The saetui Textual app: run & metrics, feature table, feature view, context view, probe.

The app only arranges and displays. Data comes from :class:`saetui.tui.source.IndexSource`
(the index reader), the collection runs in a thread worker through the callable it is
given, and model work (probe, logit effects) runs in thread workers too: nothing slow ever
runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import Footer, Input, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState, get_current_worker

from saetui.analysis.service import InProcessProbe, ProbeProcess, ProbeService
from saetui.collect.job import CollectConfig, finished_result
from saetui.collect.process import CollectionProcess
from saetui.errors import SaetuiInputError
from saetui.tui.bindings import bindings, entry, load_keymap
from saetui.tui.commands import SaetuiCommands
from saetui.tui.history import History, Visit
from saetui.tui.model import FeatureDetail, RunState, parse_density_range
from saetui.tui.render import format_density, format_value
from saetui.tui.screens.context import ContextScreen
from saetui.tui.screens.help import HelpScreen
from saetui.tui.screens.label import LabelScreen
from saetui.tui.screens.path import PathScreen
from saetui.tui.screens.query import QueryScreen
from saetui.tui.source import IndexNotReady, IndexSource
from saetui.tui.widgets.feature_table import FeatureTable, format_header
from saetui.tui.widgets.feature_view import FeatureView
from saetui.tui.widgets.probe_pane import ProbePane
from saetui.tui.widgets.run_pane import RunPane

POLL_SECONDS = 1.0
PLOT_SECONDS = 5.0
STOP_GRACE_SECONDS = 3.0  # a stopped collector that has not ended by then is killed


class CollectionEvent(Message):
    """What the collection process reported (see saetui.collect.process); a newer progress
    update replaces an unprocessed older one."""

    def __init__(self, kind: str, payload: Any) -> None:
        super().__init__()
        self.kind = kind
        self.payload = payload

    def can_replace(self, message: Message) -> bool:
        return (
            self.kind == "progress"
            and isinstance(message, CollectionEvent)
            and message.kind == "progress"
        )


class SaetuiApp(App[int]):
    """Browse an index (optionally while a collection fills it)."""

    TITLE = "saetui"
    CSS_PATH = "styles.tcss"
    BINDINGS = [*bindings("app"), entry("compare.show").binding()]
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
        self.collect: CollectConfig | None = collect
        self.model_loader = model_loader
        self.watch_terminal = watch_terminal
        self.history = History()
        self.run_state: RunState | None = None
        self.label_cache: dict[int, str] = {}
        self.current_feature: int | None = None
        self.current_detail: FeatureDetail | None = None
        self._generation: int | None = None
        self._last_plot = 0.0
        self.job: CollectionProcess | None = None
        self.collecting = False
        self.collection_error: str | None = None
        self.input_error: str | None = None  # a bad command-line input found by the collector
        self.outcome: tuple[int, str, str, int] | None = None  # exit code, status, phase, tokens
        self.paused = False
        self._quit_when_stopped = False
        self._last_total: int | None = None
        self._probe_lock = threading.Lock()
        self._probe: ProbeService | None = None
        self._progress: Any = None
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

    def on_mount(self) -> None:
        if self.user_keymap:
            self.set_keymap(self.user_keymap)
        if self._keymap_error:
            self.notify(self._keymap_error, severity="error", timeout=15)
        self.query_one("#density", Input).display = False
        self.query_one(FeatureView).show_message(
            "Choose a feature in the table (2), search with /, or use ctrl+p → feature N."
        )
        self._update_table_header()
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
            self._focus_tab(self.query_one(TabbedContent).active)

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

    # ------------------------------------------------------------------ polling

    def poll(self) -> None:
        self._poll_worker()

    @work(thread=True, exclusive=True, exit_on_error=False, group="poll")
    def _poll_worker(self) -> None:
        try:
            state = self.source.run_state()
            labels = self.source.labels_of_all()
        except IndexNotReady as waiting:
            self.call_from_thread(self._show_waiting, str(waiting))
            return
        except Exception as error:
            self.call_from_thread(self._show_index_error, str(error))
            return
        plots = None
        if time.monotonic() - self._last_plot > PLOT_SECONDS and state.generation != getattr(
            self, "_plot_generation", None
        ):
            try:
                plots = self.source.run_plots()
                self._last_plot = time.monotonic()
                self._plot_generation = state.generation
            except Exception:
                plots = None
        if not get_current_worker().is_cancelled:
            self.call_from_thread(self._show_state, state, labels, plots)

    def _show_waiting(self, text: str) -> None:
        message = "waiting for the first commit of the index…"
        if self.collect is None:
            message = text
        self.query_one("#status-line", Static).update(Text(f"saetui · {message}", style="yellow"))

    def _show_index_error(self, text: str) -> None:
        self.query_one("#status-line", Static).update(
            Text(f"saetui · cannot read the index: {text}", style="bold red")
        )
        self.query_one(FeatureView).show_message(f"The index cannot be read: {text}")
        table = self.query_one(FeatureTable)
        table.error = text
        table.refresh()

    def _show_state(self, state: RunState, labels: dict[int, str], plots: Any) -> None:
        first = self.run_state is None
        self.run_state = state
        self.label_cache = labels
        run_pane = self.query_one(RunPane)
        run_pane.show_state(state)
        if plots is not None:
            self._plots = plots
            run_pane.show_plots(plots, state.history)
        if getattr(self, "_plots", None) is not None:
            run_pane.show_counts(self._plots, state.d_sae, state.metrics)
        if not self.collecting:
            run_pane.show_progress(
                phase="done" if state.finished else ("paused" if self.paused else "stored"),
                tokens=state.tokens,
                tokens_total=None,
                paused=self.paused,
            )
        self._update_status_line()
        if first or state.generation != self._generation:
            self._generation = state.generation
            table = self.query_one(FeatureTable)
            if first:
                table.reload()
            else:
                table.reload()
                if self.current_feature is not None:
                    self.load_feature(self.current_feature, keep_position=True)

    def _update_status_line(self) -> None:
        state = self.run_state
        parts = [Text("saetui", style="bold")]
        if state is not None:
            parts.append(Text(f" · {state.tokens:,} tokens · d_sae {state.d_sae:,}"))
        progress = self._progress
        if self.collecting and progress is not None:
            phase = progress.phase
            if phase == "collecting":
                parts.append(Text(f" · collecting {progress.tokens_per_s:,.0f} tok/s", "green"))
            elif phase == "metrics" and progress.tokens_total:
                done = f"{progress.tokens_done:,}/{progress.tokens_total:,}"
                parts.append(Text(f" · metrics {done} tokens", style="green"))
            else:
                parts.append(Text(f" · {phase}", style="green"))
        elif self.paused:
            parts.append(Text(" · paused (p resumes)", style="yellow"))
        elif state is not None and not state.finished:
            parts.append(Text(" · incomplete", style="yellow"))
        parts.append(Text(f" · {self.index_path.name}", style="dim"))
        self.query_one("#status-line", Static).update(Text.assemble(*parts))

    # ------------------------------------------------------------------ collection

    def start_collection(self) -> None:
        """Run the collection in a child process (saetui.collect.process)."""
        if self.collect is None or self.collecting:
            return
        self.collecting = True
        self.paused = False
        self.outcome = None
        self.collection_error = None
        self.job = CollectionProcess(
            self.collect, lambda kind, payload: self.post_message(CollectionEvent(kind, payload))
        )
        self._launch_collector(self.job)
        self._update_status_line()

    @work(thread=True, exclusive=True, exit_on_error=False, group="collect")
    def _launch_collector(self, job: CollectionProcess) -> None:
        """Start the child, unless this very request already finished (no model load).
        With postings requested the child runs anyway: it builds what the postings lack
        (nothing when they are complete) and loads no model either."""
        assert self.collect is not None
        done = None if self.collect.postings else finished_result(self.collect)
        if done is not None:
            job.on_message("outcome", (0, "finished", "done", done.tokens))
            job.on_message("exit", 0)
            return
        try:
            job.start()
        except OSError as error:
            job.on_message("error", f"the collector could not start: {error}")
            job.on_message("exit", 1)

    def on_collection_event(self, event: CollectionEvent) -> None:
        kind, payload = event.kind, event.payload
        if kind == "progress":
            self._show_progress(payload)
        elif kind == "say":
            self.query_one(RunPane).show_note(str(payload))
        elif kind == "outcome":
            self.outcome = tuple(payload)
        elif kind == "input_error":
            self.input_error = str(payload)
        elif kind == "error":
            log = self.job.log_path if self.job is not None else None
            self.collection_error = f"{payload} (details in {log})"
        elif kind == "exit":
            self._collection_ended(int(payload))

    def _show_progress(self, progress: Any) -> None:
        self._progress = progress
        if progress.tokens_total:
            self._last_total = progress.tokens_total
        self.query_one(RunPane).show_progress(
            phase=progress.phase,
            tokens=int(progress.tokens_done or 0),
            tokens_total=progress.tokens_total,
            tokens_per_s=float(progress.tokens_per_s or 0.0),
            eta_s=progress.eta_s,
            message=progress.message or "",
            running=True,
        )
        self._update_status_line()

    def _collection_ended(self, exit_code: int) -> None:
        self.collecting = False
        if self.input_error is not None:
            self.exit(return_code=SaetuiInputError.exit_code)
            return
        finished = self.outcome is not None and self.outcome[1] == "finished"
        if (
            self.collection_error is None
            and self.outcome is None
            and exit_code
            not in (
                130,
                143,
                -9,
                -15,
            )
        ):
            self.collection_error = f"the collector ended with exit code {exit_code}"
        self.paused = not finished and self.collection_error is None
        tokens = self.outcome[3] if self.outcome else getattr(self.run_state, "tokens", 0)
        if self.collection_error:
            self.notify(f"Collection failed: {self.collection_error}", severity="error", timeout=20)
        elif finished:
            self.notify("Collection finished.")
            if self.collect is not None and self.collect.overwrite:
                self.source.reopen()  # the new index was swapped in at the end
        else:
            phase = self.outcome[2] if self.outcome else "running"
            self.notify(f"Collection stopped while {phase} at {tokens:,} tokens; p resumes.")
        self.query_one(RunPane).show_progress(
            phase="failed" if self.collection_error else ("done" if finished else "paused"),
            tokens=tokens,
            tokens_total=None if finished else self._last_total,
            message=self.collection_error or "",
            paused=self.paused,
        )
        self._update_status_line()
        self.poll()
        if self._quit_when_stopped:
            self.exit(return_code=self.exit_code())

    def _enforce_stop(self, job: CollectionProcess) -> None:
        """A stop request ``job`` has not honoured within the grace time: kill it (the
        index keeps everything up to its last commit)."""
        if job.running:
            job.kill()

    def action_toggle_collection(self) -> None:
        if self.collect is None:
            self.notify("No collection in this session (saetui open only browses).")
            return
        if self.collecting and self.job is not None:
            self.job.request_stop()
            self.set_timer(STOP_GRACE_SECONDS, partial(self._enforce_stop, self.job))
            self.notify("Pausing: the collector stops at its next safe point (resumable).")
        else:
            self.start_collection()
            self.notify("Collection resumed from the last commit.")

    def exit_code(self) -> int:
        """0 when nothing was collected here or the collection finished; 130 when it was
        stopped (it resumes from the index); 1 when it failed."""
        if self.collect is None:
            return 0
        if self.collection_error is not None:
            return 1
        if self.outcome is not None and self.outcome[1] == "finished":
            return 0
        state = self.run_state
        if not self.collecting and self.outcome is None and state is not None and state.finished:
            return 0  # an index that was already finished when the app opened
        return 130

    # ------------------------------------------------------------------ navigation

    def _focus_tab(self, tab: str) -> None:
        targets = {
            "run": RunPane,
            "features": FeatureTable,
            "feature": FeatureView,
            "probe": ProbePane,
        }
        widget = self.query_one(targets[tab])
        if tab == "probe":
            # back on the probe with a result: keys act on it (i edits the text), so j/t/l
            # never overwrite the text box
            pane = self.query_one(ProbePane)
            widget = pane.query_one("#probe-tokens") if pane.result is not None else None
            widget = widget or self.query_one("#probe-input", Input)
        widget.focus()

    def action_show_tab(self, tab: str) -> None:
        if isinstance(self.screen, (ContextScreen,)):
            self.pop_screen()
        self.query_one(TabbedContent).active = tab
        self._focus_tab(tab)
        self.call_after_refresh(self._focus_tab, tab)  # once the pane is visible

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        focused = self.focused
        if focused is not None and event.pane in focused.ancestors:
            return  # e.g. "/" focused the search box before the tab switch landed
        if event.pane.id:
            self._focus_tab(event.pane.id)

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
            try:
                detail.promoted, detail.suppressed = service.logit_effects(feature)
            except SaetuiInputError:
                pass  # logit effects are optional decoration
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

    def action_back(self) -> None:
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

    # ------------------------------------------------------------------ messages

    @on(Input.Submitted, "#search")
    def _search(self, event: Input.Submitted) -> None:
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

    def on_key(self, event: Any) -> None:
        if event.key != "escape" or not isinstance(self.focused, Input):
            return
        if self.focused.id in ("search", "density"):
            self.query_one("#density", Input).display = False
            self.query_one(FeatureTable).focus()
            event.stop()
        elif self.focused.id == "probe-input":  # leave the text box: keys act again
            self.query_one("#probe-tokens").focus()
            event.stop()

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

    @on(Input.Submitted, "#density")
    def _density(self, event: Input.Submitted) -> None:
        try:
            low, high = parse_density_range(event.value)
        except SaetuiInputError as error:
            self.notify(str(error), severity="warning")
            return
        event.input.display = False
        table = self.query_one(FeatureTable)
        table.apply_query(replace(table.query_state, density_min=low, density_max=high))
        table.focus()

    def on_feature_table_open_feature(self, message: FeatureTable.OpenFeature) -> None:
        self.open_feature(message.feature)

    def on_feature_view_open_feature(self, message: FeatureView.OpenFeature) -> None:
        self.open_feature(message.feature)

    def on_probe_pane_open_feature(self, message: ProbePane.OpenFeature) -> None:
        self.open_feature(message.feature)

    def on_feature_view_step(self, message: FeatureView.Step) -> None:
        self._step(message.feature, message.delta)

    @work(thread=True, exclusive=True, exit_on_error=False, group="step")
    def _step(self, feature: int, delta: int) -> None:
        query = self.query_one(FeatureTable).query_state
        target = self.source.step(query, feature, delta)
        if target == feature:
            self.call_from_thread(self.notify, "no further feature in the table's order")
        elif not get_current_worker().is_cancelled:
            self.call_from_thread(self.open_feature, target)

    def on_feature_view_ablate(self, message: FeatureView.Ablate) -> None:
        self.notify(f"Ablating #{message.feature} on its top contexts (loads the model once)…")
        self._ablate(message.feature)

    @work(thread=True, exclusive=True, exit_on_error=False, group="ablate")
    def _ablate(self, feature: int, contexts: int = 10) -> None:
        """Each top context re-run with the feature removed (results kept in the index)."""
        view = self.query_one(FeatureView)
        deltas: dict[tuple[int, int], float] = {}
        effects: dict[tuple[int, int], Any] = {}
        means = []
        try:
            inputs = self.source.ablation_inputs(feature, contexts)
            for done, (where, token_ids) in enumerate(inputs, 1):
                summary = self.source.cached_ablation(feature, where)
                if summary is None:
                    result = self.probe_service().ablate(token_ids, feature)
                    position = where[1]
                    summary = {
                        "delta": result.delta_loss[position],
                        "mean": result.mean_delta_where_fires,
                        "next": result.tokens[position + 1]
                        if position + 1 < len(token_ids)
                        else "",
                        "promoted": result.promoted[position][:3],
                        "suppressed": result.suppressed[position][:3],
                    }
                    self.source.keep_ablation(feature, where, summary)
                if get_current_worker().is_cancelled:
                    return
                deltas[where] = float(summary["delta"])
                effects[where] = summary
                means.append(float(summary["mean"]))
                note = (
                    f"  ablation ({done}/{len(inputs)}): loss where it fires "
                    f"{sum(means) / len(means):+.3f} on average; Δ = next-token loss change"
                )
                self.call_from_thread(view.show_ablations, feature, deltas, note, effects)
        except Exception as error:
            if not get_current_worker().is_cancelled:
                self.call_from_thread(self.notify, f"Ablation failed: {error}", severity="error")

    def on_feature_view_probe_feature(self, message: FeatureView.ProbeFeature) -> None:
        pane = self.query_one(ProbePane)
        self.action_show_tab("probe")
        pane.shade_by(message.feature)

    def action_next_tab(self, delta: int) -> None:
        """Tab / shift+tab: the next / previous pane."""
        if self.screen is not self.screen_stack[0]:
            return
        order = ["run", "features", "feature", "probe"]
        current = self.query_one(TabbedContent).active
        index = order.index(current) if current in order else 0
        self.action_show_tab(order[(index + delta) % len(order)])

    def action_copy_reference(self, feature: int) -> None:
        """A reference a colleague can open: the command and the index path."""
        reference = f"saetui open {shlex.quote(str(self.index_path.resolve()))} --feature {feature}"
        self.copy_to_clipboard(reference)
        self.notify(f"Copied (OSC 52): {reference}")

    def on_feature_view_open_context(self, message: FeatureView.OpenContext) -> None:
        def opened(feature: int | None) -> None:
            if feature is not None:
                self.open_feature(feature)

        self.push_screen(ContextScreen(message.feature, message.context), opened)

    def on_feature_table_query_changed(self, message: FeatureTable.QueryChanged) -> None:
        self._update_table_header()

    def on_feature_table_highlighted(self, message: FeatureTable.Highlighted) -> None:
        try:
            table = self.query_one(FeatureTable)
        except NoMatches:  # a page that arrived while the app closed
            return
        # the rows' width is known only once a page is laid out (a scrollbar may appear)
        self.call_after_refresh(self._update_table_header)
        status = Text.assemble(
            (f" {message.index + 1 if message.total else 0:,}/{message.total:,}", "bold"),
            ("  " + table.query_state.describe(), "dim"),
            ("   s sort · S reverse · x filter · m bookmark · e label", "dim"),
        )
        self.query_one("#table-status", Static).update(status)

    def _update_table_header(self) -> None:
        try:
            table = self.query_one(FeatureTable)
        except NoMatches:  # called after a refresh that came after the app closed
            return
        width = max(20, (table.scrollable_content_region.width or self.size.width) - 0)
        self.query_one("#table-header", Static).update(
            Text(format_header(width, table.query_state), style="bold")
        )

    def on_resize(self) -> None:
        self.call_after_refresh(self._update_table_header)

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

    # ------------------------------------------------------------------ probe model

    def probe_service(self) -> ProbeService:
        """The probe's model and SAE: a child process started on first use (or the
        in-process ``model_loader`` given to the app). Blocking: call from a worker."""
        with self._probe_lock:
            if self._probe is None:
                if self.model_loader is not None:
                    self._probe = InProcessProbe(self.model_loader)
                else:
                    from saetui.analysis.probe import probe_spec_from_run

                    self._probe = ProbeProcess(probe_spec_from_run(self.source.run_state().config))
            return self._probe

    # ------------------------------------------------------------------ exports

    def export_feature(self, feature: int) -> None:
        self._ask_path(
            "export",
            f"Export feature #{feature} as JSON",
            f"saetui-feature-{feature}.json",
            feature,
        )

    def export_labels(self) -> None:
        self._ask_path("labels", "Export labels as JSON", "saetui-labels.json")

    def export_table(self) -> None:
        self._ask_path("table", "Export the table's rows as JSON", "saetui-features.json")

    def _ask_path(self, kind: str, title: str, name: str, feature: int | None = None) -> None:
        """Ask where to write (default: the current directory), then export in a worker."""

        def chosen(path: str | None) -> None:
            if path:
                self._export(kind, feature, path)

        self.push_screen(PathScreen(title, str(Path.cwd() / name)), chosen)

    @work(thread=True, exit_on_error=False, group="export")
    def _export(self, kind: str, feature: int | None, path: str) -> None:
        from saetui.export.files import feature_json, labels_json, write_json

        try:
            if kind == "export" and feature is not None:
                payload: Any = feature_json(self.source.reader, feature)
            elif kind == "labels":
                payload = labels_json(self.source.reader)
            else:
                payload = self.source.export_table(self.query_one(FeatureTable).query_state)
            written = write_json(path, payload)
        except Exception as error:
            self.call_from_thread(self.notify, f"Export failed: {error}", severity="error")
            return
        self.call_from_thread(self.notify, f"Wrote {written}", timeout=10)

    def set_table_query(self, **changes: Any) -> None:
        table = self.query_one(FeatureTable)
        table.apply_query(replace(table.query_state, **changes))
        self.action_show_tab("features")

    # ------------------------------------------------------------------ quitting

    def action_quit_app(self) -> None:
        if self.collecting and self.job is not None and not self._quit_when_stopped:
            self._quit_when_stopped = True
            self.job.request_stop()
            self.set_timer(STOP_GRACE_SECONDS, partial(self._enforce_stop, self.job))
            self.notify(
                "Stopping the collection at its next safe point; it stays resumable (run the "
                "same command again). Press q again to quit at once.",
                timeout=30,
            )
            return
        if self.job is not None and self.job.running:
            self.job.kill()  # the index survives a kill: it resumes after its last commit
        self.exit(return_code=self.exit_code())

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
        if self.job is not None:
            self.job.close(STOP_GRACE_SECONDS)
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
    from saetui.collect.headless import _tokens_in
    from saetui.collect.job import resume_command

    tokens = _tokens_in(index_path)
    if app.collection_error is not None:
        line = f"saetui: internal error in the collector: {app.collection_error}"
    elif code == 0:
        line = (
            f"the index {index_path} holds {tokens:,} tokens; browse it again with: "
            f"saetui open {shlex.quote(str(index_path))}"
        )
    else:
        line = (
            f"stopped with {tokens:,} tokens in the index {index_path}; it is resumable: "
            f"run `{resume_command()}` again to continue."
        )
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass  # the terminal is gone
